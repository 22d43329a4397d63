"""Faults injected at the daemon's seams: a failing pipeline, reloads to bad configs, satellites that flood or send
garbage. The real model, real recordings, a real mosquitto and a NOTIFY_SOCKET like systemd's; the fault enters
where the part is created (``Factories``) or where the outside world answers (satellite audio)."""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kwsd import settings as settings_mod
from kwsd.audio.hub import AudioHub, RemoteLimits, RemoteRefused
from kwsd.audio.wavfile import read_wav
from kwsd.kws.detector import Detector
from kwsd.kws.session import ModelSession
from kwsd.lifecycle import Backoff, Liveness
from kwsd.metrics import Metrics
from kwsd.mqtt.messages import WakeEvent
from kwsd.mqtt.outbox import Outbox
from kwsd.mqtt.publisher import Publisher
from kwsd.pipeline import Parts, Pipeline
from kwsd.segments import Segment, SegmentRecorder
from kwsd.settings import DetectorSettings, ModelSettings, MqttSettings, Settings
from kwsd.supervisor import Daemon, Factories, StartupError, open_session
from kwsd.systemd import Notifier
from tests.fixtures_broker import Broker, Subscriber, wait_until
from tests.fixtures_systemd import NotifySocket

POSITIVE = "positive/20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_15.wav"
RATE = 16000


class ListSink:
    def __init__(self) -> None:
        self.wakes: list[WakeEvent] = []
        self.segments: list[Segment] = []

    def put_wake(self, event: WakeEvent) -> None:
        self.wakes.append(event)

    def put_segment(self, segment: Segment) -> None:
        self.segments.append(segment)


class FaultyDetector(Detector):
    """The real detector, whose ``step`` raises on the calls ``fail(n)`` says (n counts from 1)."""

    def __init__(self, session: ModelSession, settings: DetectorSettings, fail: Callable[[int], bool]) -> None:
        super().__init__(session, settings)
        self.calls = 0
        self._fail = fail

    def step(self) -> list[Any]:
        self.calls += 1
        if self._fail(self.calls):
            raise RuntimeError("injected fault in a detector step")
        return super().step()


def _cfg(model_path: Path, tmp_path: Path, broker: Broker | None = None, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": {"path": str(model_path), "providers": ["CPUExecutionProvider"]},
        "inputs": [],
        "mqtt": ({"host": "127.0.0.1", "port": broker.port, "reconnect_min": 0.2, "reconnect_max": 1.0,
                  "satellites": {"enabled": True, "buffer_seconds": 30.0}}
                 if broker is not None else {"enabled": False, "satellites": {"buffer_seconds": 30.0}}),
        "service": {"state_dir": str(tmp_path / "state"), "status_interval": 0.5},
    }
    cfg.update(over)
    return cfg


class Running:
    """A Daemon serving on a thread, as ``kwsd run`` does (without signal handlers)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._serve, name="test-daemon", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.rc = self.daemon.serve(handle_signals=False)

    def stop(self) -> int | None:
        self.daemon.stop_event.set()
        self.thread.join(20)
        assert not self.thread.is_alive()
        return self.rc


@pytest.fixture
def notify(notify_socket: NotifySocket) -> NotifySocket:
    notify_socket.collect()
    return notify_socket


@pytest.fixture(scope="module")
def positive(audio_dir: Path) -> np.ndarray:
    return np.concatenate([read_wav(audio_dir / POSITIVE), np.zeros(RATE)]).astype(np.int16)


def _pings(notify: NotifySocket, since: float) -> list[float]:
    return [t for t, m in list(notify.messages) if t >= since and m.get("WATCHDOG") == "1"]


def _start(settings: Settings, notify: NotifySocket, factories: Factories | None = None, usec: int = 1000000,
           config: Path | None = None) -> tuple[Running, ListSink]:
    daemon = Daemon(config, settings, Notifier(notify.env(WATCHDOG_USEC=str(usec))), factories)
    sink = ListSink()
    daemon.add_sink(sink)
    running = Running(daemon)
    wait_until(lambda: notify.lines("READY=1") or running.rc is not None, 60, "READY=1")
    assert running.rc is None, "the daemon did not start"
    return running, sink


def test_a_pipeline_exception_restarts_the_part(model_path: Path, tmp_path: Path, notify: NotifySocket,
                                                positive: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    """One step raises: the error is logged once, the pipeline restarts on its own thread, the watchdog never
    misses a ping, and the keyword said afterwards is heard."""
    caplog.set_level(logging.INFO)
    settings = settings_mod.from_dict(Settings, _cfg(model_path, tmp_path))
    factories = Factories(detector=lambda session, s: FaultyDetector(session, s, lambda n: n == 3))
    running, sink = _start(settings, notify, factories)
    daemon = running.daemon
    try:
        t0 = time.monotonic()
        wait_until(lambda: (daemon.liveness.get("pipeline") or daemon.liveness.get("x")).restarts == 1,  # type: ignore[union-attr]
                   10, "the injected failure")
        wait_until(lambda: daemon.liveness.get("pipeline").state == "running", 10, "the restart")  # type: ignore[union-attr]
        daemon.satellite_audio("hall", positive, RATE)
        wait_until(lambda: sink.wakes, 20, "a wake after the restart")
        assert [w.site_id for w in sink.wakes] == ["hall"]
        pings = _pings(notify, t0)
        gaps = np.diff([t0, *pings])
        print(f"pipeline failed once and restarted: {len(pings)} pings, longest gap {gaps.max():.2f} s "
              f"(WatchdogSec 1 s)")
        assert len(pings) >= 2 and gaps.max() < 1.0
        assert caplog.text.count("injected fault in a detector step") == 1
        assert "pipeline: RuntimeError: injected fault in a detector step (restart 1 in 0.5 s)" in caplog.text
    finally:
        assert running.stop() == 0


def test_a_pipeline_that_cannot_recover_stops_the_watchdog(model_path: Path, tmp_path: Path,
                                                           notify: NotifySocket,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Every step raises: after its restarts give up, the pipeline is overdue, the pings stop (systemd restarts
    the service) and STATUS names the part; the journal has the error once."""
    settings = settings_mod.from_dict(Settings, _cfg(model_path, tmp_path))
    factories = Factories(detector=lambda session, s: FaultyDetector(session, s, lambda n: True),
                          pipeline_backoff=lambda: Backoff(0.05, 0.4))
    running, _ = _start(settings, notify, factories, usec=400000)
    daemon = running.daemon
    try:
        wait_until(lambda: "pipeline" in daemon.liveness.overdue(), 15, "the pipeline to give up")
        time.sleep(0.3)  # a ping already under way lands
        quiet = time.monotonic()
        time.sleep(1.5)
        assert _pings(notify, quiet) == [], "watchdog kept pinging with a dead pipeline"
        assert any("pipeline not responding" in line for line in notify.lines("STATUS=", quiet))
        assert caplog.text.count("pipeline: RuntimeError: injected fault in a detector step") == 1
        assert "withholding the watchdog ping: pipeline (failed: RuntimeError: injected fault" in caplog.text
    finally:
        running.stop()


def test_reload_is_a_transaction(model_path: Path, tmp_path: Path, notify: NotifySocket, broker: Broker,
                                 positive: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    """Bad configs (clashing siteIds, a keyword the model cannot spell, a model that fails to load) leave the
    running parts untouched; a good one swaps detector and publisher, closes the old ones, keeps the one outbox,
    the toggle reasons and the pipeline thread."""
    config = tmp_path / "config.yaml"
    good = _cfg(model_path, tmp_path, broker)
    config.write_text(yaml.safe_dump(good, allow_unicode=True))

    def session(s: ModelSettings) -> ModelSession:
        if s.path != model_path:
            raise StartupError(f"model.path: {s.path} could not be loaded (injected)")
        return open_session(s)

    running, sink = _start(settings_mod.load(config), notify, Factories(session=session), config=config)
    daemon = running.daemon
    sub = Subscriber(broker, "kwsd/#")
    try:
        assert daemon.pipeline is not None and daemon.publisher is not None
        wait_until(lambda: daemon.publisher is not None and daemon.publisher.connected, 10, "broker connected")
        parts, publisher, outbox = daemon.pipeline.parts, daemon.publisher, daemon.outbox
        daemon.satellite_audio("hall", positive, RATE)
        wait_until(lambda: sink.wakes, 20, "a wake before the reloads")
        daemon.pipeline.toggle("hall", False, "tts")
        clash = dict(good, inputs=[{"device": "a.wav", "sites": {0: "x"}}, {"device": "b.wav", "sites": {0: "x"}}])
        unspellable = dict(good, detector={"keywords": [{"phrase": "小云\U00020000"}]})
        copy = tmp_path / "other.onnx"
        copy.write_bytes(model_path.read_bytes())
        broken_model = dict(good, model={"path": str(copy), "providers": ["CPUExecutionProvider"]})
        for bad in (clash, unspellable, broken_model):
            config.write_text(yaml.safe_dump(bad, allow_unicode=True))
            assert daemon.reload() is False
            assert daemon.pipeline.parts is parts and daemon.publisher is publisher and daemon.outbox is outbox
        assert caplog.text.count("keeping the running configuration") == 3
        assert "'x'" in caplog.text and "injected" in caplog.text

        good["detector"] = {"keywords": [{"phrase": "小云小云", "threshold": 0.3}]}
        good["mqtt"]["reconnect_min"] = 0.3
        config.write_text(yaml.safe_dump(good, allow_unicode=True))
        t0 = time.monotonic()
        assert daemon.reload() is True
        print(f"reload swapping detector and publisher: {1000 * (time.monotonic() - t0):.0f} ms on the main thread")
        assert daemon.pipeline.parts is not parts and daemon.pipeline.parts.session is parts.session
        assert parts.detector._pool is None and parts.detector.threads == 1  # closed
        assert daemon.publisher is not publisher and daemon.outbox is outbox
        assert not publisher.connection.alive  # stopped and joined
        assert daemon.toggles.reasons("hall") == frozenset({"tts"})
        assert daemon.liveness.get("pipeline").restarts == 0  # type: ignore[union-attr]

        daemon.pipeline.toggle("hall", True, "tts")
        time.sleep(1.0)  # a satellite that keeps to real time (the test sends each clip in one burst)
        daemon.satellite_audio("hall", positive, RATE)
        wait_until(lambda: len(sink.wakes) == 2, 20, "a wake after the reload")
        wait_until(lambda: len([m for m in sub.messages if m.topic == "kwsd/hall/wake"]) == 2, 10,
                   "both wakes on the broker (the first queued before the publisher was replaced)")
        # Counts go on across reloads: STATUS and the metrics.
        assert "2 detections" in daemon.status_line()
        assert sum(daemon.metrics.summary()["detections"]["hall"].values()) == 2
        assert daemon.notifier is not None and notify.lines("RELOADING=1") and len(notify.lines("READY=1")) >= 5
    finally:
        sub.close()
        assert running.stop() == 0


def _pipeline(model_path: Path, limits: RemoteLimits, clock: Callable[[], float] = time.monotonic,
              ) -> tuple[AudioHub, Pipeline, ListSink]:
    cfg = settings_mod.from_dict(Settings, {"model": {"path": str(model_path),
                                                      "providers": ["CPUExecutionProvider"]}})
    session = ModelSession(cfg.model.path, cfg.model.providers)
    hub = AudioHub((), threading.Event(), remote_limits=limits, clock=clock)
    sink = ListSink()
    parts = Parts(session, Detector(session, cfg.detector), SegmentRecorder(cfg.segments))
    return hub, Pipeline(hub, parts, [sink], Metrics()), sink


def test_toggle_on_restarts_the_stream(model_path: Path, positive: np.ndarray) -> None:
    """A keyword that ended while its site was toggled off does not fire right after toggleOn."""
    hub, pipeline, sink = _pipeline(model_path, RemoteLimits(buffer_seconds=30.0, max_speed=1e6))
    hub.remote("probe", "test").write(positive, RATE)
    pipeline.run_once()
    [probe] = sink.wakes
    cut = int((probe.end + 0.05) * RATE)  # the keyword has ended; the model's look-ahead has not yet seen it

    def said_while_off(toggle_on: Callable[[], object]) -> list[WakeEvent]:
        sink.wakes.clear()
        remote = hub.remote("hall", "test")
        pipeline.toggle("hall", False, "dialogue")
        remote.write(positive[:cut], RATE)
        pipeline.run_once()
        toggle_on()
        remote.write(positive[cut:], RATE)
        pipeline.run_once()
        remote.close()
        pipeline.run_once()
        return list(sink.wakes)

    # Without the restart (the state alone switched back) the keyword fires just after toggleOn ...
    assert [w.site_id for w in said_while_off(lambda: pipeline.toggles.on("hall", "dialogue"))] == ["hall"]
    # ... with it, as the pipeline does on toggleOn, it does not.
    assert said_while_off(lambda: pipeline.toggle("hall", True, "dialogue")) == []
    assert pipeline.suppressed == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _garbage_site(rng: random.Random) -> object:
    kind = rng.randrange(8)
    if kind < 3:
        return f"sat{rng.randrange(12)}"
    if kind == 3:
        return "x" * rng.randrange(65, 400)
    if kind == 4:
        return "".join(rng.choice("ab/+#\0 \n\t云🙂") for _ in range(rng.randrange(0, 12)))
    if kind == 5:
        return rng.choice([None, 5, b"bytes", "", ["a"], {"siteId": "x"}])
    if kind == 6:
        return f"云{rng.randrange(1000)}"
    return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(1, 64)))


def test_fuzzed_satellites_stay_bounded(model_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """3000 seeded frames with random siteIds (long, empty, topic wildcards, control characters, not strings),
    rates and block shapes through the daemon's satellite handler: nothing escapes it, the journal gets a line per
    10 s rather than per frame, remote sites and detector streams never exceed max_sites, memory stays bounded,
    and idle sites are dropped with the owner told."""
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    limits = RemoteLimits(max_sites=8, idle_timeout=5.0, buffer_seconds=1.0, max_speed=2.0)
    hub, pipeline, _ = _pipeline(model_path, limits, clock)
    daemon = Daemon(None, settings_mod.from_dict(Settings, {}), Notifier({}))
    daemon.hub = hub  # the daemon's handler in front of this hub, as start() wires it
    changes: list[list[str]] = []
    hub.on_sites_changed = lambda: changes.append(hub.sites())
    rng = random.Random(12)
    tracemalloc.start()
    try:
        pipeline.run_once()
        base = tracemalloc.get_traced_memory()[0]
        most = 0
        for i in range(3000):
            clock.now += 0.02
            site = _garbage_site(rng)
            rate = rng.choice([16000, 16000, 48000, 8000, 44100, 0, -1, 44101, 10**12])
            n = rng.choice([0, 1, 160, 1600, 4800, 20000])
            shape: tuple[int, ...] = (n,) if rng.random() < 0.9 else (n, 2)
            samples = np.zeros(shape, dtype=rng.choice([np.int16, np.float32, np.float64]))
            daemon.satellite_audio(site, samples, rate)  # type: ignore[arg-type]
            if i % 20 == 0:
                pipeline.run_once()
            if i % 1000 == 999:  # a quiet spell: every site goes idle and is dropped
                clock.now += limits.idle_timeout + 1.0
                assert hub.expire_idle() and hub.remote_sites() == []
            most = max(most, len(hub.remote_sites()), len(pipeline.sites))
        pipeline.run_once()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    joined = caplog.text.count("remote satellite joined")
    refused = daemon._remote_refusals
    warnings = [r for r in caplog.records
                if "satellite audio refused" in r.getMessage() and r.levelno >= logging.WARNING]
    ring_bytes = sum(hub._remotes[s].bytes for s in hub.remote_sites())
    print(f"fuzz: 3000 frames, {refused} refused ({len(warnings)} warnings logged), {joined} sites joined, at most "
          f"{most} at once; rings {ring_bytes / 1024:.0f} KiB; traced memory grew {grown / 2**20:.1f} MiB")
    assert most <= 8 and refused > 500 and joined >= 16
    assert len(warnings) <= 2
    assert 0 < hub.refused <= refused  # siteIds refused by the hub (the rest: bad rates and shapes)
    assert ring_bytes <= 8 * 2 * RATE * 1.0
    assert grown < 32 * 2**20
    clock.now += 6.0
    hub.expire_idle()
    pipeline.run_once()
    assert hub.remote_sites() == [] and pipeline.sites == {} and changes[-1] == []


def test_a_flooding_satellite_cannot_starve_another(model_path: Path, positive: np.ndarray) -> None:
    """One site sends 100 times faster than real time, another speaks the keyword at real time: the calm one
    loses nothing and is heard; the flood is cut at max_speed and counted."""
    clock = FakeClock()
    hub, pipeline, sink = _pipeline(model_path, RemoteLimits(buffer_seconds=2.0, max_speed=2.0), clock)
    flood, calm = hub.remote("flood", "satellite"), hub.remote("calm", "satellite")
    noise = np.random.default_rng(3).integers(-3000, 3000, 100 * RATE // 10).astype(np.int16)  # 10 s per 100 ms
    frame = RATE // 10
    for i in range(0, positive.size, frame):
        clock.now += 0.1
        flood.write(noise, RATE)
        calm.write(positive[i:i + frame], RATE)
        pipeline.run_once()
    elapsed = positive.size / RATE
    assert [w.site_id for w in sink.wakes] == ["calm"]
    assert hub.status(remote=True)["satellite:calm"].overruns == 0
    assert flood.flood_drops > 0 and hub.status(remote=True)["satellite:flood"].overruns >= flood.flood_drops
    heard = pipeline.sites["flood"].next_sample / RATE
    assert heard <= 2.0 * elapsed + 2.0 + 10.0, heard  # max_speed x elapsed + the burst (+ one block)


def test_an_idle_satellite_is_dropped_and_its_discovery_withdrawn(model_path: Path, tmp_path: Path,
                                                                   notify: NotifySocket, broker: Broker,
                                                                   positive: np.ndarray) -> None:
    cfg = _cfg(model_path, tmp_path, broker)
    cfg["mqtt"]["satellites"]["idle_timeout"] = 1.0
    cfg["mqtt"]["home_assistant"] = {"enabled": True}
    sub = Subscriber(broker, "homeassistant/#", "kwsd/#")
    running, _ = _start(settings_mod.from_dict(Settings, cfg), notify)
    daemon = running.daemon
    try:
        wait_until(lambda: daemon.publisher is not None and daemon.publisher.connected, 10, "broker connected")
        daemon.satellite_audio("porch", positive[:RATE], RATE)

        def discovery() -> list[bytes]:
            return [bytes(m.payload) for m in list(sub.messages)
                    if m.topic.startswith("homeassistant/event/") and "porch" in m.topic]

        def status() -> bytes | None:
            found = [bytes(m.payload) for m in list(sub.messages) if m.topic == "kwsd/porch/status"]
            return found[-1] if found else None

        wait_until(lambda: discovery() and discovery()[-1], 10, "the satellite's discovery")
        wait_until(lambda: status() == b"online", 10, "the satellite's status online")
        wait_until(lambda: discovery()[-1] == b"", 10, "the discovery withdrawn after the idle timeout")
        assert daemon.hub is not None and daemon.hub.remote_sites() == []
        wait_until(lambda: daemon.pipeline is not None and "porch" not in daemon.pipeline.sites, 5, "stream gone")
        wait_until(lambda: status() == b"offline", 10, "the satellite's status offline")
    finally:
        sub.close()
        running.stop()


def test_a_keyword_said_across_a_swap_is_heard_once(model_path: Path, positive: np.ndarray) -> None:
    """A reload swaps the detector while a keyword is being said: it is still detected (the new detector hears
    the last seconds again), and a keyword detected before a swap is not detected a second time after it."""
    hub, pipeline, sink = _pipeline(model_path, RemoteLimits(buffer_seconds=30.0, max_speed=1e6))
    hub.remote("probe", "test").write(positive, RATE)
    pipeline.run_once()
    [probe] = sink.wakes
    sink.wakes.clear()
    session = pipeline.parts.session

    def swap() -> None:
        detector = Detector(session, DetectorSettings())
        pipeline.swap(Parts(session, detector, SegmentRecorder(pipeline.recorder.settings))).close(True)

    hall = hub.remote("hall", "test")
    middle = int((probe.start + probe.end) / 2 * RATE)
    hall.write(positive[:middle], RATE)
    pipeline.run_once()
    swap()
    hall.write(positive[middle:], RATE)
    pipeline.run_once()
    assert [w.site_id for w in sink.wakes] == ["hall"]
    assert abs(sink.wakes[0].start - probe.start) < 0.1  # the same keyword (the LFR phase may differ)

    swap()  # the keyword was detected: hearing the last seconds again must not fire it twice
    hall.write(np.zeros(2 * RATE, dtype=np.int16), RATE)
    pipeline.run_once()
    assert len(sink.wakes) == 1


def test_a_dead_mqtt_thread_is_not_hidden(model_path: Path, tmp_path: Path, notify: NotifySocket,
                                          broker: Broker) -> None:
    """The MQTT thread keeps dying of an outbox error once connected: it is restarted, and when it cannot
    recover the pings stop and STATUS names it, instead of "broker connected" over a thread that publishes
    nothing."""

    def publisher(s: MqttSettings, outbox: Outbox, sites: Sequence[str], stop: threading.Event,
                  liveness: Liveness) -> Publisher:
        pub = Publisher(s, sites=sites, stop=stop, outbox=outbox, liveness=liveness,
                        restart_backoff=Backoff(0.05, 0.1))

        def broken_pump(session: Any) -> None:
            raise sqlite3.OperationalError("disk I/O error (injected)")

        pub.connection._pump = broken_pump  # type: ignore[method-assign]
        return pub

    settings = settings_mod.from_dict(Settings, _cfg(model_path, tmp_path, broker))
    running, _ = _start(settings, notify, Factories(publisher=publisher), usec=1000000)
    daemon = running.daemon
    try:
        wait_until(lambda: "mqtt" in daemon.liveness.overdue(), 20, "the dead MQTT thread to be noticed")
        part = daemon.liveness.get("mqtt")
        assert part is not None and part.restarts >= 5 and "disk I/O error" in part.last_error
        time.sleep(0.6)
        quiet = time.monotonic()
        time.sleep(1.5)
        assert _pings(notify, quiet) == []
        assert any("mqtt not responding" in line for line in notify.lines("STATUS=", quiet))
    finally:
        running.stop()


def test_a_closed_remote_site_is_decoded_to_its_end(model_path: Path, positive: np.ndarray) -> None:
    """A remote stream that ends right after its keyword (a Wyoming client's audio-stop) still gets its wake:
    closing decodes the rest, look-ahead included, then drops the site and calls back on the pipeline thread."""
    hub, pipeline, sink = _pipeline(model_path, RemoteLimits(buffer_seconds=30.0, max_speed=1e6))
    hub.remote("probe", "test").write(positive, RATE)
    pipeline.run_once()
    [probe] = sink.wakes
    sink.wakes.clear()
    remote = hub.remote("hall", "wyoming")
    remote.write(positive[:int((probe.end + 0.03) * RATE)], RATE)
    pipeline.run_once()
    assert sink.wakes == []  # without the end of the stream the model still waits for its look-ahead
    done: list[str] = []
    remote.close(lambda: done.append(threading.current_thread().name))
    assert remote.write(positive, RATE) is False  # nothing more after close
    with pytest.raises(RemoteRefused, match="closing"):
        hub.remote("hall", "wyoming")
    pipeline.run_once()
    assert [w.site_id for w in sink.wakes] == ["hall"] and done == [threading.current_thread().name]
    assert hub.remote_sites() == ["probe"] and "hall" not in pipeline.sites
    again = hub.remote("hall", "wyoming")  # the site can come back at once, as a new stream
    assert again is not remote and again.ring.end == 0


def test_a_remote_site_dropped_as_idle_is_decoded_to_its_last_frame(model_path: Path, positive: np.ndarray) -> None:
    """A satellite that falls silent right after the keyword (before the model's look-ahead has seen its end)
    still wakes: the idle site is finished, not just dropped."""
    clock = FakeClock()
    limits = RemoteLimits(idle_timeout=5.0, buffer_seconds=30.0, max_speed=1e6)
    hub, pipeline, sink = _pipeline(model_path, limits, clock)
    probe = hub.remote("probe", "test")
    probe.write(positive, RATE)
    pipeline.run_once()
    [heard] = sink.wakes
    probe.close()
    pipeline.run_once()
    cut = int((heard.end + 0.05) * RATE)  # the keyword has ended; the look-ahead has not yet seen it
    sink.wakes.clear()
    hub.remote("hall", "test").write(positive[:cut], RATE)
    pipeline.run_once()
    assert sink.wakes == []
    clock.now += limits.idle_timeout + 1.0
    pipeline.expire_idle()
    assert [w.site_id for w in sink.wakes] == ["hall"]
    assert hub.remote_sites() == [] and "hall" not in pipeline.sites
    pipeline.run_once()
    assert pipeline.sites == {} and len(sink.wakes) == 1
