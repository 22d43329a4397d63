"""The daemon: wires capture, detection, follow-up segments and MQTT, and speaks to systemd.

Threads: each capture input has its own (``AudioHub``), the publisher has its network thread, and one pipeline
thread reads every site's new audio, feeds the segment recorder and the detector, runs one batched detector step
and publishes what it finds. The main thread handles signals (TERM/INT stop, HUP reload), sd_notify (READY after
warm-up and first audio, WATCHDOG only while capture and pipeline both progress, STATUS) and metrics.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import numpy as np

from kwsd import settings as settings_mod
from kwsd.audio.hub import AudioHub
from kwsd.audio.resample import StreamResampler
from kwsd.kws.decoder import KeywordError
from kwsd.kws.detector import Detection, Detector
from kwsd.kws.session import ModelError, ModelSession
from kwsd.metrics import Metrics
from kwsd.mqtt.messages import WakeEvent
from kwsd.mqtt.publisher import Publisher
from kwsd.segments import Segment, SegmentRecorder
from kwsd.settings import ConfigError, Settings
from kwsd.systemd import Notifier, Watchdog
from kwsd.toggles import ToggleState

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
SATELLITE_QUEUE_BLOCKS = 2000  # per site; a satellite that floods faster than real time loses its oldest blocks
# Most audio per site fed before a detector step. A backlog (fast file replay, a burst of satellite frames) is cut
# into rounds of this size, so a wake is found while its keyword is still in the segment recorder's look-back.
ROUND_SAMPLES = SAMPLE_RATE // 2


class StartupError(RuntimeError):
    """The daemon cannot start with this configuration; the message names what is wrong."""


def energy_dbfs(samples: np.ndarray) -> float:
    """RMS level of int16-scale audio in dB relative to full scale (-120 for silence)."""
    if samples.size == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(samples.astype(np.float64)))))
    return max(-120.0, 20.0 * math.log10(rms / 32768.0)) if rms > 0 else -120.0


@dataclasses.dataclass
class _SiteState:
    """What the pipeline knows about one stream."""

    device: str
    next_sample: int  # the absolute index the detector expects next
    satellite: bool = False


class Pipeline:
    """Owns the detector, the segment recorder and the per-site bookkeeping; runs on its own thread."""

    def __init__(self, daemon: Daemon, settings: Settings, session: ModelSession) -> None:
        self.daemon = daemon
        self.settings = settings
        self.session = session
        self.detector = Detector(session, settings.detector)
        self.recorder = SegmentRecorder(settings.segments, SAMPLE_RATE)
        self.sites: dict[str, _SiteState] = {}
        self.satellite_audio: dict[str, collections.deque[np.ndarray]] = {}
        self.satellite_lock = threading.Lock()
        self._satellite_rates: dict[str, StreamResampler] = {}  # publisher thread only
        self.detections = 0
        self.suppressed = 0
        self.audio_seconds = 0.0
        self.busy_seconds = 0.0
        self._rejected: dict[tuple[str, str], int] = {}  # (site, wakeword id): the count last seen
        self._site_reopens: dict[str, int] = {}
        self._restart: set[str] = set()  # sites whose device was reopened: the next audio starts a new stream

    # -- streams --------------------------------------------------------------------------------------------

    def sync_local_sites(self, hub: AudioHub) -> None:
        devices = {site: st.device for st in hub.status().values() for site in st.sites}
        for site in hub.sites():
            if site not in self.sites:
                start = hub.end(site)
                self.sites[site] = _SiteState(device=devices.get(site, ""), next_sample=start)
                self.detector.add_stream(site, start)
                log.info("site %s: listening on %s", site, devices.get(site, "?"))
        for site in [s for s, st in self.sites.items() if not st.satellite and s not in hub.sites()]:
            self._drop(site)

    def _drop(self, site: str) -> None:
        self.sites.pop(site, None)
        self.detector.remove_stream(site)
        for key in [k for k in self._rejected if k[0] == site]:
            del self._rejected[key]
        for seg in self.recorder.flush(site):
            self.daemon.publish_segment(seg)
        log.info("site %s: removed", site)

    def satellite_frame(self, site: str, samples: np.ndarray) -> None:
        """Called on the publisher's thread: queue a remote satellite's 16 kHz audio for the pipeline."""
        with self.satellite_lock:
            q = self.satellite_audio.get(site)
            if q is None:
                q = self.satellite_audio[site] = collections.deque(maxlen=SATELLITE_QUEUE_BLOCKS)
            q.append(samples)
        self.daemon.wake_pipeline()

    def satellite_input(self, site: str, samples: np.ndarray, rate: int) -> None:
        """``Publisher.satellite_audio``: mono int16 at ``rate`` Hz, resampled to 16 kHz with the filter state
        of the site's earlier frames (a change of rate starts the site's resampler over)."""
        rs = self._satellite_rates.get(site)
        if rs is None or rs.rate_in != rate:
            if rs is None and len(self._satellite_rates) >= 256:
                del self._satellite_rates[next(iter(self._satellite_rates))]
            rs = self._satellite_rates[site] = StreamResampler(rate, SAMPLE_RATE, 1)
        out = rs.process(samples)
        if len(out):
            self.satellite_frame(site, out)

    # -- one pass -------------------------------------------------------------------------------------------

    def run_once(self, hub: AudioHub) -> bool:
        """Read every site's new audio, run one batched detector step, publish; returns whether audio came."""
        new: dict[str, tuple[np.ndarray, int]] = {}
        for site in hub.sites():
            # The capture index runs on across a device reopen (the gap is not counted), so a reopen is read
            # before the audio: the hub raises the count only after the old stream's last sample.
            reopens = hub.reopens(site)
            if reopens != self._site_reopens.setdefault(site, reopens):
                self._site_reopens[site] = reopens
                if site in self.sites:
                    self._restart.add(site)
            samples, first = hub.read(site)
            if samples.size:
                new[site] = (samples, first)
        captured = bool(new)
        with self.satellite_lock:
            pending = {site: list(q) for site, q in self.satellite_audio.items() if q}
            for q in self.satellite_audio.values():
                q.clear()
        for site, blocks in pending.items():
            if site not in self.sites:
                self.sites[site] = _SiteState(device=f"satellite:{site}", next_sample=0, satellite=True)
                self.detector.add_stream(site, 0)
                self.daemon.publisher_sites_changed()
                log.info("site %s: remote satellite joined", site)
            new[site] = (np.concatenate(blocks), self.sites[site].next_sample)
        got_audio = bool(new)
        if captured:
            self.daemon.watchdog.beat("capture")
        offset = 0
        while True:
            for site, (samples, first) in new.items():
                if offset < samples.size:
                    self._feed(site, samples[offset:offset + ROUND_SAMPLES], first + offset)
            t0 = time.perf_counter()
            hits = self.detector.step()
            step = time.perf_counter() - t0
            if got_audio:
                self.busy_seconds += step
                self.daemon.metrics.observe_step(step)
            for hit in hits:
                self._wake(hit, hub)
            offset += ROUND_SAMPLES
            if not any(offset < samples.size for samples, _ in new.values()):
                break
        self._count_rejections()
        return got_audio

    def targets(self) -> dict[str, int]:
        """Per local site, the absolute capture index up to which audio completes the detector's next step."""
        return {site: st.next_sample + self.detector.samples_needed(site)
                for site, st in self.sites.items() if not st.satellite}

    def _feed(self, site: str, samples: np.ndarray, first: int) -> None:
        state = self.sites.get(site)
        if state is None:
            return
        if site in self._restart:
            self._restart.discard(site)
            log.info("site %s: device reopened; detector restarts at sample %d", site, first)
            self.detector.reset_stream(site, first)
        elif first != state.next_sample:
            # Audio was lost (the reader fell behind the ring): start the stream afresh at the new index,
            # so no keyword is stitched together across the gap and stream time stays right.
            log.info("site %s: %d samples missing; detector restarts at sample %d",
                     site, first - state.next_sample, first)
            self.detector.reset_stream(site, first)
        state.next_sample = first + samples.size
        self.audio_seconds += samples.size / SAMPLE_RATE
        for seg in self.recorder.feed(site, samples, first):
            self.daemon.publish_segment(seg)
        self.detector.accept(site, samples)

    def _wake(self, hit: Detection, hub: AudioHub) -> None:
        state = self.sites[hit.stream]
        if not self.daemon.detection_enabled(hit.stream):
            self.suppressed += 1
            log.info("site %s: %s (score %.3f) ignored: detection toggled off", hit.stream, hit.keyword, hit.score)
            return
        session_id = uuid.uuid4().hex
        now_sample = state.next_sample if state.satellite else max(state.next_sample, hub.end(hit.stream))
        keyword_audio = self.recorder.audio(hit.stream, hit.start_sample, hit.end_sample)
        event = WakeEvent(
            site_id=hit.stream,
            wakeword_id=hit.wakeword_id,
            keyword=hit.keyword,
            score=round(hit.score, 4),
            threshold=hit.threshold,
            start=round(hit.start, 3),
            end=round(hit.end, 3),
            session_id=session_id,
            device=state.device,
            energy=round(energy_dbfs(keyword_audio), 1),
            latency=round((now_sample - hit.end_sample) * 1000 / SAMPLE_RATE, 1),
        )
        self.detections += 1
        self.daemon.metrics.detection(hit.stream, hit.wakeword_id)
        log.info("wake: site %s heard %s (score %.3f >= %.3f) at %.2f-%.2f s, %.1f dBFS, %.0f ms after it ended",
                 hit.stream, hit.keyword, hit.score, hit.threshold, hit.start, hit.end, event.energy, event.latency)
        self.daemon.publish_wake(event)
        self.recorder.start(hit.stream, session_id, hit.start_sample, hit.end_sample)

    def _count_rejections(self) -> None:
        for site in self.sites:
            for wakeword_id, n in self.detector.rejected(site).items():
                old = self._rejected.get((site, wakeword_id), 0)
                # A count below the last one seen means the stream was restarted (device reopened, audio lost):
                # its decoder counts from zero again.
                new = n - old if n >= old else n
                if new:
                    self.daemon.metrics.rejection(site, wakeword_id, new)
                self._rejected[(site, wakeword_id)] = n

    def flush_segments(self) -> None:
        for seg in self.recorder.flush():
            self.daemon.publish_segment(seg)


def _heartbeats(s: Settings) -> tuple[str, ...]:
    """Stages the watchdog requires progress from: capture only when there are local inputs."""
    return ("capture", "pipeline") if s.inputs else ("pipeline",)


class Daemon:
    """``kwsd run``: build the parts from the config, run until TERM/INT, reload on HUP."""

    def __init__(self, config_path: Path | None, settings: Settings, notifier: Notifier | None = None) -> None:
        self.config_path = config_path
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self.metrics = Metrics()
        self.watchdog = Watchdog(self.notifier, _heartbeats(settings))
        self._reload_requested = threading.Event()
        self.toggles = ToggleState()
        self._pipeline_lock = threading.Lock()
        self.session: ModelSession | None = None
        self.hub: AudioHub | None = None
        self.publisher: Publisher | None = None
        self.pipeline: Pipeline | None = None
        self._thread: threading.Thread | None = None
        self._ready = False
        self._last_status = 0.0
        self._pending: Settings | None = None
        self._reopens: dict[str, int] = {}
        self._overruns: dict[str, int] = {}
        self._reconnects = 0

    # -- building -------------------------------------------------------------------------------------------

    def _open_session(self, s: Settings) -> ModelSession:
        try:
            session = ModelSession(s.model.path, s.model.providers, s.model.intra_op_threads, s.model.max_batch)
        except ModelError as exc:
            raise StartupError(f"model.path: {exc}") from exc
        warm = session.warm_up()
        log.info("model %s on %s (warm-up %.0f ms)", s.model.path, session.describe(), warm * 1000)
        self.metrics.set_provider(session.provider)
        return session

    def _make_publisher(self, s: Settings, sites: list[str]) -> Publisher | None:
        if not s.mqtt.enabled:
            return None
        outbox = s.service.state_path() / "outbox"
        try:
            outbox.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"service.state_dir: cannot create {outbox}: {exc.strerror or exc}") from exc
        pub = Publisher(s.mqtt, outbox, sites, self.stop_event)
        pub.on_toggle = self._on_toggle
        if self.pipeline is not None:
            pub.satellite_audio = self.pipeline.satellite_input
        return pub

    def start(self) -> None:
        s = self.settings
        self.session = self._open_session(s)
        try:
            self.pipeline = Pipeline(self, s, self.session)
        except KeywordError as exc:
            raise StartupError(str(exc)) from exc
        self.hub = AudioHub(s.inputs, self.stop_event)
        self.publisher = self._make_publisher(s, self.hub.sites())
        if self.publisher is not None:
            self.publisher.satellite_audio = self.pipeline.satellite_input
            self.publisher.start()
        self.hub.start()
        self.pipeline.sync_local_sites(self.hub)
        if s.service.metrics.enabled:
            host, port = self.metrics.serve(s.service.metrics.address, s.service.metrics.port)
            log.info("metrics on http://%s:%d/metrics", host, port)
        self._thread = threading.Thread(target=self._pipeline_loop, name="kwsd-pipeline", daemon=True)
        self._thread.start()

    # -- pipeline thread ------------------------------------------------------------------------------------

    def wake_pipeline(self) -> None:
        """Make the pipeline thread run a pass now (remote audio queued, a reload pending, stopping)."""
        if self.hub is not None:
            self.hub.wake()

    def _pipeline_loop(self) -> None:
        assert self.hub is not None and self.pipeline is not None
        last_rtf = time.monotonic()
        while not self.stop_event.is_set():
            pending, self._pending = self._pending, None
            if pending is not None:
                self._apply(pending)
            hub, pipeline = self.hub, self.pipeline
            # Sleep until some site can complete a detector step (about every 90 ms), not per capture block.
            hub.wait(0.25, pipeline.targets())
            try:
                pipeline.run_once(hub)
            except Exception:  # a bug must not silently kill detection: log it; the watchdog sees no progress
                log.exception("pipeline step failed")
                self.stop_event.wait(1.0)
                continue
            self.watchdog.beat("pipeline")
            now = time.monotonic()
            if now - last_rtf >= 5.0 and pipeline.audio_seconds > 0:
                self.metrics.set_real_time_factor(pipeline.busy_seconds / pipeline.audio_seconds)
                self.metrics.set_streams(len(pipeline.sites))
                last_rtf = now
        if self.pipeline is not None:
            self.pipeline.flush_segments()

    def _apply(self, new: Settings) -> None:
        """Runs on the pipeline thread: take a validated new config into use without stopping capture."""
        old = self.settings
        assert self.hub is not None and self.pipeline is not None
        if new.model != old.model or new.detector != old.detector or new.segments != old.segments:
            session = self.session if new.model == old.model else self._open_session(new)
            assert session is not None
            pipeline = Pipeline(self, new, session)
            self.pipeline.flush_segments()
            self.pipeline = pipeline
            self.session = session
            if self.publisher is not None:
                self.publisher.satellite_audio = pipeline.satellite_input
        if new.inputs != old.inputs:
            self.hub.update(new.inputs)
            self.watchdog.watch(_heartbeats(new))
        self.pipeline.sync_local_sites(self.hub)
        if new.mqtt != old.mqtt or new.service.state_dir != old.service.state_dir:
            old_pub, self.publisher = self.publisher, self._make_publisher(new, self.hub.sites())
            if old_pub is not None:
                old_pub.stop()
            if self.publisher is not None:
                self.publisher.start()
        elif self.publisher is not None:
            self.publisher.update_sites(list(self.pipeline.sites))
        self.settings = new
        log.info("configuration reloaded: %d sites", len(self.pipeline.sites))
        self.notifier.ready(self.status_line())

    # -- callbacks from other threads -----------------------------------------------------------------------

    def _on_toggle(self, site: str, enabled: bool, reason: str) -> None:
        on = self.toggles.apply(site, enabled, reason)
        log.info("site %s: detection %s (%s)", site, "on" if on else "off", reason or "no reason given")

    def detection_enabled(self, site: str) -> bool:
        return self.toggles.enabled(site)

    def publisher_sites_changed(self) -> None:
        if self.publisher is not None and self.pipeline is not None:
            self.publisher.update_sites(list(self.pipeline.sites))

    def publish_wake(self, event: WakeEvent) -> None:
        if self.publisher is not None:
            self.publisher.publish_wake(event)

    def publish_segment(self, segment: Segment) -> None:
        if self.publisher is not None:
            self.publisher.publish_segment(segment)
            log.info("segment %s: %.1f s from site %s (%s)", segment.session_id, segment.duration, segment.site,
                     segment.reason)

    # -- main thread ----------------------------------------------------------------------------------------

    def status_line(self) -> str:
        p, pub = self.pipeline, self.publisher
        overruns = sum(st.overruns for st in self.hub.status().values()) if self.hub else 0
        broker = pub.state if pub is not None else "disabled"
        provider = self.session.provider.replace("ExecutionProvider", "") if self.session else "-"
        return (f"{provider}; {len(p.sites) if p else 0} sites; {p.detections if p else 0} detections; "
                f"{overruns} overruns; broker {broker}")

    def _update_metrics(self) -> None:
        if self.hub is not None:
            for name, st in self.hub.status().items():
                self.metrics.overrun(name, max(0, st.overruns - self._overruns.get(name, 0)))
                for _ in range(st.reopens - self._reopens.get(name, 0)):
                    self.metrics.reopen(name)
                self._overruns[name], self._reopens[name] = st.overruns, st.reopens
        if self.publisher is not None:
            c = self.publisher.counters
            for _ in range(max(0, c.reconnects - self._reconnects)):
                self.metrics.broker_reconnect()
            self._reconnects = max(self._reconnects, c.reconnects)
            self.metrics.set_outbox_depth(c.outbox_depth)

    def _audio_flowing(self) -> bool:
        if not self.settings.inputs:
            return True
        assert self.hub is not None
        return any(st.samples > 0 for st in self.hub.status().values())

    def request_reload(self) -> None:
        self._reload_requested.set()

    def reload(self) -> bool:
        """Re-read the config file; a bad one is reported and the running config stays."""
        self._reload_requested.clear()
        if self.config_path is None:
            log.warning("reload requested, but kwsd was started without a config file")
            return False
        self.notifier.reloading("reloading configuration")
        try:
            new = settings_mod.load(self.config_path)
            if new.model != self.settings.model:
                ModelSession(new.model.path, ("CPUExecutionProvider",))  # validate before switching
            if new.detector != self.settings.detector and self.session is not None:
                Detector(self.session, new.detector)
        except (ConfigError, ModelError, KeywordError) as exc:
            log.error("reload of %s failed, keeping the running configuration: %s", self.config_path, exc)
            self.notifier.ready(self.status_line())
            return False
        self._pending = new
        self.wake_pipeline()
        return True

    def serve(self, handle_signals: bool = True) -> int:
        """Run until stopped; returns the exit code."""
        if handle_signals:
            self._install_signals()
        try:
            self.start()
        except StartupError as exc:
            log.error("%s", exc)
            self.shutdown()
            return 1
        interval = self.settings.service.status_interval
        while not self.stop_event.wait(0.2):
            if self._reload_requested.is_set():
                self.reload()
            if not self._ready and self._audio_flowing():
                self._ready = True
                log.info("ready: %s", self.status_line())
                self.notifier.ready(self.status_line())
                self._last_status = time.monotonic()
            self.watchdog.poll()
            now = time.monotonic()
            if self._ready and now - self._last_status >= min(interval, 5.0):
                self._update_metrics()
                self.notifier.status(self.status_line())
                self._last_status = now
        self.shutdown()
        return 0

    def _install_signals(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("%s received: stopping", signal.Signals(signum).name)
            self.stop_event.set()

        def hup(_signum: int, _frame: FrameType | None) -> None:
            self._reload_requested.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)

    def shutdown(self) -> None:
        self.notifier.stopping("stopping")
        self.stop_event.set()
        self.wake_pipeline()
        if self._thread is not None:
            self._thread.join(timeout=3.0)
        if self.hub is not None:
            self.hub.stop()
        if self.publisher is not None:
            self.publisher.stop(timeout=2.0)
        self.metrics.close()
        log.info("stopped")


def run(config_path: Path | None, settings: Settings,
        notifier_factory: Callable[[], Notifier] = Notifier) -> int:
    return Daemon(config_path, settings, notifier_factory()).serve()
