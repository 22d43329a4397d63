"""``kwsd run`` end to end: a real PulseAudio pipe source, a real mosquitto, a NOTIFY_SOCKET like systemd's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from kwsd.audio.wavfile import read_wav
from tests.fixtures_broker import Broker, Subscriber, free_port, wait_until
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
        # the notify socket is read on its own thread: the datagrams may land just after the log line
        _wait_for(lambda: notify.lines("RELOADING=1", mark) and notify.lines("READY=1", mark), 5,
                  "RELOADING=1 then READY=1 around the failed reload", daemon)
        # ... and with a good one: applied.
        good["detector"] = {"keywords": [{"phrase": "小云小云", "threshold": 0.3}]}
        config.write_text(yaml.safe_dump(good, allow_unicode=True))
        daemon.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "configuration reloaded" in daemon.text(), 15, "reload", daemon)

        # Watchdog: pings while audio flows, and on while the source is stalled: the input waits for it on
        # schedule, a known state. STATUS and the site's availability say so.
        mark = time.monotonic()
        _wait_for(lambda: len(notify.lines("WATCHDOG=1", mark)) >= 2, 6, "watchdog pings", daemon)
        src.stop_feeding()
        _wait_for(lambda: notify.lines("STATUS=waiting for kwsd_e2e", mark), 10, "STATUS=waiting for", daemon)
        _wait_for(lambda: _retained(sub, "kwsd/kitchen/status") == b"offline", 10, "the site's status offline",
                  daemon)
        stalled = time.monotonic()
        time.sleep(3.0)
        assert len(notify.lines("WATCHDOG=1", stalled)) >= 2, "watchdog stopped with the audio source stalled"

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


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode("utf-8")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _retained(sub: Subscriber, topic: str) -> bytes | None:
    found = [m.payload for m in list(sub.messages) if m.topic == topic]
    return bytes(found[-1]) if found else None


def test_the_only_mic_absent_under_the_watchdog(pulse_server: PulseServer, broker: Broker, notify: NotifySocket,
                                                model_path: Path, audio_dir: Path, tmp_path: Path) -> None:
    """The only microphone is unplugged when kwsd starts and stays away for more than three watchdog periods
    (WatchdogSec=2 s): READY comes anyway, the pings go on without a gap systemd would act on, STATUS, the metric
    and the site's retained status (also Home Assistant's availability) say it is missing; when it is plugged in,
    detection resumes and the site is online again, without a restart."""
    metrics_port = free_port()
    cfg = _config(model_path, broker, tmp_path / "state",
                  inputs=[{"device": "kwsd_late", "kind": "pulse", "sites": {0: "hall"}, "stall_timeout": 1.0,
                           "reopen_backoff": [0.5, 2.0]}])
    cfg["service"]["metrics"] = {"enabled": True, "port": metrics_port}
    cfg["mqtt"]["home_assistant"] = {"enabled": True}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    sub = Subscriber(broker, "kwsd/#", "homeassistant/#")
    daemon = Daemon(config, notify, tmp_path / "kwsd.log")
    src = None
    try:
        t0 = time.monotonic()
        _wait_for(lambda: notify.lines("READY=1"), 60, "READY=1", daemon)
        print(f"READY=1 {time.monotonic() - t0:.2f} s after start with the mic absent")
        ready = notify.lines("STATUS=", t0)
        assert any("waiting for kwsd_late" in line for line in ready), ready
        extend = [t for t, m in list(notify.messages) if "EXTEND_TIMEOUT_USEC" in m]
        first_ready = min(t for t, m in list(notify.messages) if m.get("READY") == "1")
        assert extend and extend[0] < first_ready, "more start-up time is asked for before the model loads"
        _wait_for(lambda: _retained(sub, "kwsd/hall/status") == b"offline", 10, "kwsd/hall/status offline", daemon)
        discovery = next(json.loads(m.payload) for m in sub.messages
                         if m.topic.startswith("homeassistant/event/") and m.payload)
        assert "kwsd/hall/status" in [a["topic"] for a in discovery["availability"]]
        assert _scrape(metrics_port)[("kwsd_input_up", (("input", "kwsd_late"),))] == 0

        absent_from = time.monotonic()
        time.sleep(6.5)  # > 3 x WatchdogSec
        pings = [t for t, m in list(notify.messages) if t >= absent_from and m.get("WATCHDOG") == "1"]
        gaps = [b - a for a, b in zip([absent_from, *pings], pings, strict=False)]
        print(f"mic absent {time.monotonic() - absent_from:.1f} s: {len(pings)} pings, longest gap "
              f"{max(gaps):.2f} s (WatchdogSec 2 s)")
        assert len(pings) >= 5 and max(gaps) < 2.0, gaps
        assert daemon.proc.poll() is None
        assert notify.lines("STATUS=waiting for kwsd_late", absent_from)
        assert daemon.text().count("input kwsd_late: reopening") == 1, "one journal line per change, not per retry"

        # Plugged in: the keyword is heard, the site is online, the metric says up.
        src = pulse_server.pipe_source("kwsd_late", rate=16000, channels=1)
        src.play(np.zeros(1600, dtype=np.int16))
        _wait_for(lambda: _retained(sub, "kwsd/hall/status") == b"online", 20, "kwsd/hall/status online", daemon)
        assert _scrape(metrics_port)[("kwsd_input_up", (("input", "kwsd_late"),))] == 1
        clip = read_wav(audio_dir / "positive/20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_15.wav")
        src.stop_feeding()
        src.play(clip.astype(np.int16)).done.wait(20)
        _wait_for(lambda: [m for m in sub.messages if m.topic == "kwsd/hall/wake"], 15, "a wake", daemon)
        got = _scrape(metrics_port)
        assert got[("kwsd_wake_latency_seconds_count", ())] == 1
        assert got[("kwsd_broker_connected", ())] == 1
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0, daemon.text()
    finally:
        daemon.stop()
        sub.close()
        if src is not None:
            pulse_server.remove(src)
