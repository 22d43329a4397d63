"""A host without a sound card: one clear line instead of alsa-lib's noise; repeated warnings held back."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kwsd.audio import portaudio
from kwsd.logs import RepeatFilter, setup_logging
from tests.fixtures_pulse import PulseServer

NO_DEVICE = ("no capture device 'default': no sound card and no PulseAudio server; `kwsd devices` lists what can "
             "be named")


def no_pulse_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment with no PulseAudio server to be found (none named, an empty runtime dir)."""
    run = tmp_path / "xdg"
    run.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "KWSD_", "NOTIFY_SOCKET"))}
    return {**env, "XDG_RUNTIME_DIR": str(run), "HOME": str(tmp_path)}


def test_run_without_a_sound_card_says_so_in_one_line(model_path: Path, tmp_path: Path) -> None:
    assert portaudio.sound_cards() == [], "this test needs a host without a sound card (CI has none)"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(model_path)},
        "inputs": [{"device": "default", "sites": {0: "desk"}, "reopen_backoff": [0.2, 0.4]}],
        "mqtt": {"host": "127.0.0.1", "port": 9},
        "service": {"state_dir": str(tmp_path / "state")},
    }))
    log = tmp_path / "log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "kwsd", "run", "--config", str(config)], stdout=fh,
                                stderr=subprocess.STDOUT, env=no_pulse_env(tmp_path), cwd=tmp_path)
        try:
            time.sleep(6.0)  # the model loads, then about ten attempts to open the device
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    lines = log.read_text(errors="replace").splitlines()
    assert proc.returncode == 0, "\n".join(lines)
    assert [line.split(" ", 3)[3] for line in lines if "no capture device" in line] == [
        f"kwsd.audio.capture: input default: reopening: {NO_DEVICE}"]
    assert not [line for line in lines if line.startswith(("ALSA lib", "Expression"))]
    assert not [line for line in lines if "listening on" in line]
    assert len(lines) < 12, "\n".join(lines)


def test_alsa_lib_messages_go_to_one_debug_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in no_pulse_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PULSE_SERVER", raising=False)
    with caplog.at_level(logging.DEBUG, logger="kwsd.audio.portaudio"):
        for _ in range(3):
            assert portaudio.capture_problem("default") == NO_DEVICE
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")  # alsa-lib printed nothing of its own
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("alsa-lib on 'default'")]
    assert len(said) == 3 and "Unknown PCM" in said[0]


@pytest.mark.pulse
def test_missing_card_with_a_pulseaudio_server(pulse_server: PulseServer) -> None:
    assert portaudio.capture_problem("hw:CARD=Nope,DEV=0") == (
        "no capture device 'hw:CARD=Nope,DEV=0': no sound card, and ALSA has no 'hw:CARD=Nope,DEV=0' (No such "
        "device); `kwsd devices` lists what can be named")
    assert portaudio.capture_problem("pulse") is None  # PulseAudio's ALSA plugin opens: PortAudio may try it


def test_repeated_warnings_are_held_back() -> None:
    now = [0.0]
    out = io.StringIO()
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    handler = setup_logging("info", force_journal=True, stream=out)
    handler.removeFilter(handler.filters[0])
    handler.addFilter(RepeatFilter(window=60.0, clock=lambda: now[0]))
    log = logging.getLogger("kwsd.test.repeat")
    other = logging.getLogger("kwsd.test.other")
    try:
        for step in range(10):  # every 10 s for 100 s: the same warning
            now[0] = step * 10.0
            log.warning("input %s: reopening: %s", "hall", "no device")
            other.warning("unrelated")  # another logger's lines do not interfere
        now[0] = 100.0
        log.warning("input %s: reopening: %s", "hall", "no device")  # 40 s after the last one shown: held
        log.info("input hall: running")  # the device came back ...
        log.warning("input %s: reopening: %s", "hall", "no device")  # ... and went: logged at once
        log.error("input %s: reopening: %s", "hall", "no device")  # another level is another line
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)
    lines = [line for line in out.getvalue().splitlines() if "kwsd.test.repeat" in line]
    assert lines == [
        "<4>kwsd.test.repeat: input hall: reopening: no device",
        "<4>kwsd.test.repeat: input hall: reopening: no device (and 5 times more in the last 60 s)",
        "<6>kwsd.test.repeat: input hall: running",
        "<4>kwsd.test.repeat: input hall: reopening: no device",
        "<3>kwsd.test.repeat: input hall: reopening: no device",
    ]
    assert sum("unrelated" in line for line in out.getvalue().splitlines()) == 2
