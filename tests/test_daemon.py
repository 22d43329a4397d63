"""``kwsd run`` end to end: a real PulseAudio pipe source, a real mosquitto, a NOTIFY_SOCKET like systemd's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from kwsd.audio.wavfile import read_wav
from tests.fixtures_broker import Broker, Subscriber, wait_until
from tests.fixtures_pulse import PulseServer
from tests.fixtures_systemd import NotifySocket

REPO = Path(__file__).resolve().parent.parent


class Daemon:
    def __init__(self, config: Path, notify: NotifySocket, log: Path) -> None:
        env = {**os.environ, **notify.env(WATCHDOG_USEC="2000000"), "PYTHONUNBUFFERED": "1"}
        self.log = log
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "kwsd", "run", "--config", str(config)],
                                     stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._fh.close()


def _config(model_path: Path, broker: Broker, state: Path, **overrides: object) -> dict:
    cfg: dict = {
        "model": {"path": str(model_path), "providers": ["CPUExecutionProvider"]},
        "inputs": [{"device": "kwsd_e2e", "kind": "pulse", "sites": {0: "kitchen"}, "stall_timeout": 1.0,
                    "reopen_backoff": [0.5, 2.0]}],
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "reconnect_min": 0.2, "reconnect_max": 1.0},
        "segments": {"silence_timeout": 0.7, "max_length": 8.0},
        "service": {"state_dir": str(state), "status_interval": 1.0},
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture
def notify(notify_socket: NotifySocket) -> NotifySocket:
    notify_socket.collect()  # the daemon runs a while: read every message as it comes, as systemd does
    return notify_socket


def _wait_for(predicate, timeout: float, what: str, daemon: Daemon) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if daemon.proc.poll() is not None:
            pytest.fail(f"kwsd exited ({daemon.proc.returncode}) while waiting for {what}:\n{daemon.text()}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}; kwsd log:\n{daemon.text()[-4000:]}")


def test_daemon_end_to_end(pulse_server: PulseServer, broker: Broker, notify: NotifySocket, model_path: Path,
                           audio_dir: Path, tmp_path: Path) -> None:
    src = pulse_server.pipe_source("kwsd_e2e", rate=16000, channels=1)
    src.play(np.zeros(1600, dtype=np.int16))  # silence, then more silence until told otherwise
    config = tmp_path / "config.yaml"
    good = _config(model_path, broker, tmp_path / "state")
    config.write_text(yaml.safe_dump(good, allow_unicode=True))
    sub = Subscriber(broker, "kwsd/#", "hermes/hotword/#")
    daemon = Daemon(config, notify, tmp_path / "kwsd.log")
    try:
        t0 = time.monotonic()
        _wait_for(lambda: notify.lines("READY=1"), 60, "READY=1", daemon)
        ready_s = time.monotonic() - t0
        print(f"start-up to READY: {ready_s:.2f} s")
        wait_until(lambda: any(m.topic == "kwsd/status" and m.payload == b"online" for m in sub.messages),
                   what="retained online status")

        # A positive: exactly one wake on the site, Hermes too, and a segment around the keyword.
        clip = read_wav(audio_dir / "positive/20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_15.wav")
        src.stop_feeding()
        src.play(clip.astype(np.int16)).done.wait(20)
        _wait_for(lambda: [m for m in sub.messages if m.topic == "kwsd/kitchen/segment"], 20, "segment", daemon)
        wakes = [json.loads(m.payload) for m in sub.messages if m.topic == "kwsd/kitchen/wake"]
        assert len(wakes) == 1, wakes
        wake = wakes[0]
        assert wake["siteId"] == "kitchen" and wake["keyword"] == "小云小云" and wake["score"] >= 0.25
        assert wake["device"] == "kwsd_e2e" and -90 < wake["energy"] < 0 and 0 < wake["latency"] < 2000
        assert [m.topic for m in sub.messages if m.topic.startswith("hermes/hotword/")][:1] == [
            f"hermes/hotword/{wake['wakewordId']}/detected"]
        announce = json.loads(next(m.payload for m in sub.messages if m.topic == "kwsd/kitchen/segment"))
        audio = next(m.payload for m in sub.messages if m.topic == f"kwsd/kitchen/segment/{wake['sessionId']}")
        assert audio[:4] == b"RIFF" and announce["sessionId"] == wake["sessionId"]
        assert announce["reason"] in ("silence", "max_length")

        # A negative: nothing.
        before = len(sub.messages)
        neg = read_wav(next((audio_dir / "negative").glob("*.wav")))
        src.stop_feeding()
        src.play(neg.astype(np.int16)).done.wait(20)
        time.sleep(1.5)
        assert not [m for m in sub.messages[before:] if m.topic.endswith("/wake")]

        # Unplug and replug: capture resumes by name without a restart, the stream starts afresh, and the
        # keyword said after the replug is heard.
        pulse_server.unload(src)
        _wait_for(lambda: "input kwsd_e2e: reopening" in daemon.text(), 15, "the unplug to be noticed", daemon)
        src.reload()
        src.play(np.zeros(1600, dtype=np.int16))
        _wait_for(lambda: "device reopened; detector restarts" in daemon.text(), 20, "capture to resume", daemon)
        before = len(sub.messages)
        src.stop_feeding()
        src.play(clip.astype(np.int16)).done.wait(20)
        _wait_for(lambda: [m for m in sub.messages[before:] if m.topic == "kwsd/kitchen/wake"], 15,
                  "a wake after the replug", daemon)
        assert daemon.proc.poll() is None

        # SIGHUP with a broken config: reported, the old one keeps running.
        config.write_text("model: [unclosed\n")
        mark = time.monotonic()
        daemon.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "reload of" in daemon.text(), 10, "reload failure log", daemon)
        assert daemon.proc.poll() is None
        assert notify.lines("RELOADING=1", mark) and notify.lines("READY=1", mark)
        # ... and with a good one: applied.
        good["detector"] = {"keywords": [{"phrase": "小云小云", "threshold": 0.3}]}
        config.write_text(yaml.safe_dump(good, allow_unicode=True))
        daemon.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "configuration reloaded" in daemon.text(), 15, "reload", daemon)

        # Watchdog: pings while audio flows, none once the source stalls.
        mark = time.monotonic()
        _wait_for(lambda: len(notify.lines("WATCHDOG=1", mark)) >= 2, 6, "watchdog pings", daemon)
        src.stop_feeding()
        time.sleep(2.5)  # one interval for the last ping to drain
        stalled = time.monotonic()
        time.sleep(3.0)
        assert notify.lines("WATCHDOG=1", stalled) == [], "watchdog kept pinging with the audio source stalled"

        # SIGTERM: exit 0 within 5 s, STOPPING=1 sent.
        t_stop = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0, daemon.text()
        assert time.monotonic() - t_stop < 5.0
        assert notify.lines("STOPPING=1")
        assert any(m.topic == "kwsd/status" and m.payload == b"offline" for m in sub.messages)
    finally:
        daemon.stop()
        sub.close()
        src.stop_feeding()
