"""Shared fixtures: where the real recordings, the model mirror and the exported model are.

The model files are the ones ``scripts/setup`` fetched and verified (``models/upstream``, upstream paths) and the
ONNX it exported (KWSD_MODEL; default models/kwsd-xiaoyun.onnx). Tests that need a fetch source build their own
mirror folders or serve these files themselves, so no test depends on what a particular mirror holds. The
recordings are in the folder KWSD_TEST_AUDIO names (positive/, negative/, index.tsv). A missing one fails the test
with what to do: a skipped test would check nothing.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest_plugins: list[str] = ["tests.fixtures_fetch", "tests.fixtures_broker", "tests.fixtures_pulse",
                             "tests.fixtures_systemd"]


def _env_dir(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the tests with scripts/test (it fetches the recordings into "
                    "models/recordings), or point it at a folder of them (positive/, negative/, index.tsv)")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"{name}={value} is not a folder")
    return path


@pytest.fixture(scope="session")
def audio_dir() -> Path:
    """The real recordings: positive/*.wav say 小云小云, negative/*.wav are other Mandarin speech."""
    return _env_dir("KWSD_TEST_AUDIO")


@pytest.fixture(scope="session")
def positives(audio_dir: Path) -> list[Path]:
    return sorted((audio_dir / "positive").glob("*.wav"))


@pytest.fixture(scope="session")
def negatives(audio_dir: Path) -> list[Path]:
    return sorted((audio_dir / "negative").glob("*.wav"))


@pytest.fixture(scope="session")
def audio_index(audio_dir: Path) -> list[dict[str, str]]:
    with open(audio_dir / "index.tsv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="session")
def model_mirror() -> Path:
    """The upstream model files ``scripts/setup`` fetched and verified (``models/upstream``, upstream paths).

    Read only. Whether it holds the optional example recording depends on the source setup used; tests that
    care build their own folder (``tests.fixtures_fetch``).
    """
    path = REPO / "models" / "upstream"
    if not (path / "kwsr.net").is_file():
        pytest.fail(f"{path} lacks the model files: run scripts/setup (it fetches them)")
    return path


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The exported, verified streaming ONNX (scripts/setup makes it)."""
    path = Path(os.environ.get("KWSD_MODEL") or REPO / "models" / "kwsd-xiaoyun.onnx")
    if not path.is_file():
        pytest.fail(f"exported model {path} is missing: run scripts/setup (or kwsd model export)")
    return path
