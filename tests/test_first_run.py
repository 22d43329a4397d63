"""The README's first screen, run as written in a fresh copy of the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kwsd.model.manifest import load_manifest
from tests.conftest import REPO
from tests.fixtures_fetch import ModelServer, build_mirror, closed_port
from tests.recordings import MANIFEST as RECORDINGS_MANIFEST

# Variables a new user's shell has; nothing of this test run's (KWSD_TEST_AUDIO, KWSD_MODEL, ...) leaks in.
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


def fresh_copy(dest: Path) -> Path:
    """The tracked and untracked-but-not-ignored files of this checkout (what ``git clone`` of a commit of
    this tree gives), modification times kept; without git, the tree minus the ignored folders."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True, check=True, timeout=60,
        ).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        ignore = shutil.ignore_patterns(".venv", ".git", "upstream", "recordings", "*.onnx", "__pycache__",
                                        ".*_cache", "*.egg-info")
        shutil.copytree(REPO, dest, ignore=ignore, copy_function=shutil.copy2)
        return dest
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def test_readme_test_command_in_a_fresh_checkout(
    model_server: ModelServer, model_mirror: Path, audio_dir: Path, tmp_path: Path
) -> None:
    """``scripts/test`` with no variable but the model source: it fetches the model and the test recordings
    from the model repository (a local server with ModelScope's API stands in for it), exports the model and
    runs the linters and tests that read the fetched files.

    The environment is the one ``scripts/setup --dev`` built for this checkout (``KWSD_VENV``): the fresh copy's
    pyproject.toml keeps its time stamp, so set-up finds the packages installed and installs nothing.
    """
    upstream = build_mirror(tmp_path / "upstream", model_mirror, audio_dir / "positive/kws_xiaoyunxiaoyun.wav")
    for entry in load_manifest(RECORDINGS_MANIFEST).files:
        (upstream / entry.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(audio_dir / entry.local_path, upstream / entry.path)
    model_server.root = upstream
    stamp = Path(sys.prefix) / ".kwsd-installed[dev,cpu]"
    assert stamp.is_file() and stamp.stat().st_mtime >= (REPO / "pyproject.toml").stat().st_mtime, (
        f"{stamp} is missing or older than pyproject.toml: run scripts/setup --dev first")
    clone = fresh_copy(tmp_path / "kwsd")
    assert not (clone / "models" / "upstream").exists() and not (clone / "models" / "recordings").exists()

    env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
    env.update(KWSD_MODEL_SOURCE=model_server.url, KWSD_VENV=str(Path(sys.prefix)))
    selected = "test_parser_reads_the_real_network or test_detect_command or test_cli_fetch_twice"
    run = subprocess.run(
        ["scripts/test", "-q", "-p", "no:cacheprovider", "-k", selected],
        cwd=clone, env=env, capture_output=True, text=True, timeout=900,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "3 passed" in out, out[-3000:]
    assert "test: 59 recordings (14.9 MB, verified) in models/recordings" in out
    assert (clone / "models" / "kwsd-xiaoyun.onnx").is_file()
    assert (clone / "models" / "recordings" / "index.tsv").is_file()
    fetched = {r.file_path for r in model_server.requests}
    assert "kwsr.net" in fetched and "unittest/example_kws/wav/1330806238146100615.wav" in fetched


def test_setup_again_needs_no_network(bare_mirror: Path, audio_dir: Path, tmp_path: Path) -> None:
    """Set up from a mirror without the example recording (given by KWSD_MODEL_EXAMPLE), then again with no
    variable at all and a ModelScope that refuses connections: nothing is fetched and nothing fails."""
    clone = fresh_copy(tmp_path / "kwsd")
    env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
    env["KWSD_VENV"] = str(Path(sys.prefix))
    example = audio_dir / "positive/kws_xiaoyunxiaoyun.wav"
    first = subprocess.run(
        ["scripts/setup", "--dev"], cwd=clone, capture_output=True, text=True, timeout=300,
        env=dict(env, KWSD_MODEL_SOURCE=str(bare_mirror), KWSD_MODEL_EXAMPLE=str(example)),
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("exported models/kwsd-xiaoyun.onnx") == 1  # the summary, once
    assert "not in source    example/kws_xiaoyunxiaoyun.wav" in first.stdout

    port = closed_port()
    start = time.monotonic()
    again = subprocess.run(
        ["scripts/setup", "--dev"], cwd=clone, capture_output=True, text=True, timeout=300,
        env=dict(env, MODELSCOPE_DOMAIN=f"127.0.0.1:{port}"),
    )
    took = time.monotonic() - start
    assert again.returncode == 0, again.stdout + again.stderr
    lines = again.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-3]] == ["already"] * 10
    assert lines[-3:] == ["not fetched      example/kws_xiaoyunxiaoyun.wav (optional; every required file is present)",
                          "models/kwsd-xiaoyun.onnx is up to date",
                          "setup: ready (models/kwsd-xiaoyun.onnx)"]
    assert again.stderr == "" and took < 20
