"""Shared fixtures: where the real recordings, the model mirror and the exported model are.

The data lives outside the repo. ``.ci/run`` (and ``scripts/test``) point at it with environment variables:
KWSD_TEST_AUDIO (folder with positive/, negative/, index.tsv), KWSD_MODEL_MIRROR (a local copy of the upstream model
repository) and KWSD_MODEL (the exported ONNX; default models/kwsd-xiaoyun.onnx). A missing one fails the test with
the variable's name: a skipped test would check nothing.
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
        pytest.fail(f"{name} is not set: point it at the folder (scripts/test sets it from ../shared)")
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
    """A local mirror of the upstream ModelScope repository (same relative paths)."""
    return _env_dir("KWSD_MODEL_MIRROR")


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The exported, verified streaming ONNX (scripts/setup makes it)."""
    path = Path(os.environ.get("KWSD_MODEL") or REPO / "models" / "kwsd-xiaoyun.onnx")
    if not path.is_file():
        pytest.fail(f"exported model {path} is missing: run scripts/setup (or kwsd model export)")
    return path
