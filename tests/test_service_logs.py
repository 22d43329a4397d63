"""Log lines for journald (priority prefixes, no timestamps) versus a terminal (timestamps)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kwsd.logs import journal_stream, setup_logging

REPO = Path(__file__).resolve().parent.parent
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in ("paho", "paho.mqtt", "urllib3")}
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)
    logging.captureWarnings(False)


def _emit() -> None:
    log = logging.getLogger("kwsd.test")
    log.debug("debug line")
    log.info("wake on %s", "kitchen")
    log.warning("device %s overran", "hw:1")
    try:
        raise RuntimeError("broker gone")
    except RuntimeError:
        log.exception("publisher failed")
    logging.getLogger("paho.mqtt.client").info("paho chatter")
    logging.getLogger("urllib3.connectionpool").warning("urllib3 warning")


def _journal_env(path: Path) -> dict[str, str]:
    st = os.stat(path)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_journal_lines_carry_priorities_and_no_timestamps(tmp_path: Path) -> None:
    out = tmp_path / "stderr"
    with open(out, "w", encoding="utf-8") as stream:
        setup_logging("debug", stream=stream, env=_journal_env(out))
        _emit()
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[:3] == [
        "<7>kwsd.test: debug line",
        "<6>kwsd.test: wake on kitchen",
        "<4>kwsd.test: device hw:1 overran",
    ]
    assert lines[3] == "<3>kwsd.test: publisher failed"
    traceback = lines[4 : lines.index("<3>RuntimeError: broker gone") + 1]
    assert traceback[0] == "<3>Traceback (most recent call last):"
    assert all(line.startswith("<3>") for line in traceback)  # journald files each line: keep the priority
    assert lines[-1] == "<4>urllib3.connectionpool: urllib3 warning"
    assert not any("paho chatter" in line for line in lines)
    assert not any(TIMESTAMP.search(line) for line in lines)


def test_terminal_lines_have_timestamps(tmp_path: Path) -> None:
    out = tmp_path / "stderr"
    other = tmp_path / "other"
    other.write_text("")
    with open(out, "w", encoding="utf-8") as stream:
        # JOURNAL_STREAM inherited from a parent whose stderr was the journal: it does not match this stream.
        setup_logging("INFO", stream=stream, env=_journal_env(other))
        _emit()
    lines = out.read_text(encoding="utf-8").splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    kwsd\.test: wake on kitchen", lines[0])
    assert "WARNING kwsd.test: device hw:1 overran" in lines[1]
    assert not any(line.startswith("<") for line in lines)
    assert not any("debug line" in line for line in lines)


def test_detection_rules(tmp_path: Path) -> None:
    out = tmp_path / "stderr"
    with open(out, "w", encoding="utf-8") as stream:
        assert journal_stream(_journal_env(out), stream)
        assert not journal_stream({"JOURNAL_STREAM": "1:2"}, stream)
        assert not journal_stream({"JOURNAL_STREAM": "garbage"}, stream)
        assert not journal_stream({}, stream)
        # Under a unit with StandardError= to a file: INVOCATION_ID, not a terminal.
        assert journal_stream({"INVOCATION_ID": "0123abcd"}, stream)


def test_invocation_id_on_a_terminal_is_not_the_journal() -> None:
    """A shell started from a desktop's terminal service inherits INVOCATION_ID; its stderr is a terminal."""
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert not journal_stream({"INVOCATION_ID": "0123abcd"}, tty)
    finally:
        os.close(master)
        os.close(slave)


def test_force_journal_and_bad_level(tmp_path: Path) -> None:
    out = tmp_path / "stderr"
    with open(out, "w", encoding="utf-8") as stream:
        setup_logging("warning", force_journal=True, stream=stream, env={})
        logging.getLogger("kwsd.test").error("stopped")
    assert out.read_text(encoding="utf-8") == "<3>kwsd.test: stopped\n"
    with pytest.raises(ValueError, match="'loud'"):
        setup_logging("loud")


def test_real_stderr_of_a_child_process(tmp_path: Path) -> None:
    """The process's own stderr is what is checked, as systemd passes it (here: a file)."""
    out = tmp_path / "stderr"
    out.touch()
    code = (
        "import logging; from kwsd.logs import setup_logging; setup_logging('info'); "
        "logging.getLogger('kwsd.app').info('ready')"
    )
    env = {**os.environ, **_journal_env(out), "PYTHONPATH": str(REPO)}
    with open(out, "w", encoding="utf-8") as stream:
        subprocess.run([sys.executable, "-c", code], stderr=stream, env=env, check=True, timeout=30)
    assert out.read_text(encoding="utf-8") == "<6>kwsd.app: ready\n"
