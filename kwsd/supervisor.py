"""The daemon: builds the parts from the config, reloads them as a transaction, handles signals, talks to systemd.

Parts and their threads: each capture input and the PulseAudio watcher (``AudioHub``), the pipeline
(``kwsd.pipeline``) and the MQTT publisher, each on a supervised loop (``kwsd.lifecycle``) that beats into one
``Liveness`` registry. The main thread handles signals (TERM/INT stop, HUP reload), sd_notify (READY after the
model's warm-up, STATUS, WATCHDOG only while no part is overdue), input health (journal, metrics, site
availability) and reloads: new parts are built and validated here, swapped into the pipeline between two passes,
and the old ones closed after. The daemon owns what must outlive a reload: the metrics, the Hermes toggle state
(in the pipeline), the outbox and the remote sites. The review archive (``kwsd.review``) is one more sink of the
pipeline, with a tap in the pipeline's parts that cuts clips for near misses; its writer thread beats into the same
``Liveness``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType

import numpy as np

from kwsd import settings as settings_mod
from kwsd.audio.hub import AudioHub, RemoteLimits, RemoteRefused, check_sites
from kwsd.kws.detector import Detector
from kwsd.kws.session import ModelError, ModelSession
from kwsd.lifecycle import Backoff, Liveness, describe, release_freed_memory, supervise
from kwsd.metrics import Metrics
from kwsd.mqtt.messages import MessageError, WakeEvent
from kwsd.mqtt.outbox import Outbox
from kwsd.mqtt.publisher import Publisher
from kwsd.pipeline import BEAT_WITHIN, SAMPLE_RATE, Parts, Pipeline, Sink
from kwsd.review.archive import Archive, model_version
from kwsd.review.tap import ReviewTap
from kwsd.segments import Segment, SegmentRecorder
from kwsd.settings import DetectorSettings, ModelSettings, MqttSettings, SegmentSettings, Settings
from kwsd.systemd import Notifier, Watchdog
from kwsd.toggles import ToggleState
from kwsd.wyoming import WyomingError, WyomingServer

log = logging.getLogger(__name__)

START_TIMEOUT_EXTENSION = 60.0
"""Seconds of start-up (or reload) time asked for before loading and warming up a model."""
TICK = 1.0
"""Longest time between turns of the main loop (watchdog, periodic STATUS); a signal, a reload request or an input
changing state turns it at once."""


class _Signal(threading.Event):
    """An event whose ``set`` also wakes the main loop."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._main = wake

    def set(self) -> None:
        super().set()
        self._main.set()


class StartupError(RuntimeError):
    """The daemon cannot start with this configuration; the message names what is wrong."""


def open_session(s: ModelSettings) -> ModelSession:
    """Load the model and warm it up (the first steps are slow); ``StartupError`` naming ``model.path``."""
    try:
        session = ModelSession(s.path, s.providers, s.intra_op_threads, s.max_batch)
    except ModelError as exc:
        raise StartupError(f"model.path: {exc}") from exc
    warm = session.warm_up()
    log.info("model %s on %s (warm-up %.0f ms)", s.path, session.describe(), warm * 1000)
    return session


def make_recorder(s: SegmentSettings) -> SegmentRecorder:
    return SegmentRecorder(s, SAMPLE_RATE)


def make_publisher(settings: MqttSettings, outbox: Outbox, sites: Sequence[str], stop: threading.Event,
                   liveness: Liveness) -> Publisher:
    return Publisher(settings, sites=sites, stop=stop, outbox=outbox, liveness=liveness)


@dataclass
class Factories:
    """Where the daemon creates its parts: the seams at which tests inject faults."""

    session: Callable[[ModelSettings], ModelSession] = open_session
    detector: Callable[[ModelSession, DetectorSettings], Detector] = Detector
    recorder: Callable[[SegmentSettings], SegmentRecorder] = make_recorder
    outbox: Callable[[Path, int], Outbox] = Outbox
    publisher: Callable[[MqttSettings, Outbox, Sequence[str], threading.Event, Liveness], Publisher] = \
        make_publisher
    pipeline_backoff: Callable[[], Backoff] = field(default=lambda: Backoff(0.5, 30.0))
    archive: Callable[..., Archive] = Archive
    """Called as ``Archive(settings, root, metrics=, segments=, model_version=, keywords=, liveness=)``."""


def remote_limits(s: Settings) -> RemoteLimits:
    """Bounds on remote sites: MQTT satellites' ``max_sites`` plus one per Wyoming client (``max_clients``)."""
    sat = s.mqtt.satellites
    wyoming = s.wyoming.max_clients if s.wyoming.enabled else 0
    return RemoteLimits(max_sites=sat.max_sites + wyoming, idle_timeout=sat.idle_timeout,
                        buffer_seconds=sat.buffer_seconds)


class SiteFilter:
    """A sink that hands on only the wakes and segments of sites ``keep`` accepts (the MQTT publisher does not
    get Wyoming clients' events unless ``wyoming.publish_mqtt``)."""

    def __init__(self, sink: Sink, keep: Callable[[str], bool]) -> None:
        self.sink = sink
        self.keep = keep

    def put_wake(self, event: WakeEvent) -> None:
        if self.keep(event.site_id):
            self.sink.put_wake(event)

    def put_segment(self, segment: Segment) -> None:
        if self.keep(segment.site):
            self.sink.put_segment(segment)


@dataclass
class _Plan:
    """The parts a reload will swap in, built and validated before anything changes."""

    settings: Settings
    parts: Parts | None = None
    outbox: Outbox | None = None
    publisher: Publisher | None = None
    replace_publisher: bool = False
    archive: Archive | None = None
    """Built, not started: it starts once the old archive has written everything and stopped."""
    replace_archive: bool = False

    def discard(self, current: Parts | None, current_outbox: Outbox | None) -> None:
        """The reload failed after building some parts: close them."""
        if self.publisher is not None:
            self.publisher.stop(timeout=0.0)
        if self.outbox is not None and self.outbox is not current_outbox:
            self.outbox.close()
        if self.parts is not None:
            self.parts.close(keep_session=current is not None and self.parts.session is current.session)


class Daemon:
    """``kwsd run``: build the parts from the config, run until TERM/INT, reload on HUP."""

    def __init__(self, config_path: Path | None, settings: Settings, notifier: Notifier | None = None,
                 factories: Factories | None = None) -> None:
        self.config_path = config_path
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.factories = factories or Factories()
        self._main_wake = threading.Event()
        self.stop_event: threading.Event = _Signal(self._main_wake)
        self.liveness = Liveness()
        self.watchdog = Watchdog(self.notifier, self.liveness)
        self.metrics = Metrics()
        self.toggles = ToggleState()
        self.extra_sinks: list[Sink] = []
        """Sinks besides the publisher (review archive, Wyoming server); see ``add_sink``."""
        self._reload_requested: threading.Event = _Signal(self._main_wake)
        self._reload_lock = threading.Lock()
        self.hub: AudioHub | None = None
        self.pipeline: Pipeline | None = None
        self.outbox: Outbox | None = None
        self.publisher: Publisher | None = None
        self.archive: Archive | None = None
        self._thread: threading.Thread | None = None
        self._ready = False
        self._last_status = 0.0
        self._status_text = ""
        self._input_up: dict[str, bool] = {}
        self._site_available: dict[str, bool] = {}
        self._seen: dict[str, tuple[int, int]] = {}  # counter -> (id of its source object, last value seen)
        self._remote_refusals = 0
        self._last_refusal_log = 0.0
        self.wyoming: WyomingServer | None = None

    # -- building -------------------------------------------------------------------------------------------

    def _build_parts(self, s: Settings, session: ModelSession, archive: Archive | None) -> Parts:
        try:
            detector = self.factories.detector(session, s.detector)
            if archive is not None and s.review.near_miss_ratio > 0:
                detector.report_near_misses(s.review.near_miss_ratio)
        except ValueError as exc:  # KeywordError and friends: a keyword the model cannot spell, ...
            raise StartupError(f"detector: {exc}") from exc
        tap = ReviewTap(archive, s.review.margin, s.segments.enabled) if archive is not None else None
        return Parts(session, detector, self.factories.recorder(s.segments), tap)

    def _new_archive(self, s: Settings, session: ModelSession) -> Archive | None:
        """The review archive of ``s`` (None when ``review.enabled`` is false), not started yet."""
        if not s.review.enabled:
            return None
        c = session.contract
        return self.factories.archive(
            s.review, s.service.state_path() / "review", metrics=self.metrics, segments=s.segments.enabled,
            model_version=model_version(c.source, c.source_sha256),
            keywords=[k.wakeword_id for k in s.detector.keywords], liveness=self.liveness)

    def _open_outbox(self, s: Settings) -> Outbox:
        directory = s.service.state_path() / "outbox"
        try:
            return self.factories.outbox(directory, s.mqtt.outbox.max_bytes)
        except OSError as exc:
            raise StartupError(f"service.state_dir: cannot open the outbox in {directory}: "
                               f"{exc.strerror or exc}") from exc

    def _new_publisher(self, s: Settings, outbox: Outbox, sites: Sequence[str]) -> Publisher:
        pub = self.factories.publisher(s.mqtt, outbox, sites, self.stop_event, self.liveness)
        pub.on_toggle = self._on_toggle
        pub.satellite_audio = self.satellite_audio
        pub.on_feedback = self._on_feedback
        return pub

    def add_sink(self, sink: Sink) -> None:
        """Hand every wake and segment to ``sink`` as well (review archive, Wyoming server); any time."""
        self.extra_sinks.append(sink)
        if self.pipeline is not None:
            self.pipeline.set_sinks(self._sinks())

    def _sinks(self, publisher: Publisher | None = None, archive: Archive | None = None,
               replace: bool = False) -> list[Sink]:
        """The sink list: the publisher (for the sites that go to MQTT), the review archive, the Wyoming server
        and the extra sinks (``replace``: the given publisher and archive instead of the running ones)."""
        pub, arch = (publisher, archive) if replace else (self.publisher, self.archive)
        sinks: list[Sink] = [SiteFilter(pub, self.mqtt_site)] if pub is not None else []
        if arch is not None:
            sinks.append(arch)
        if self.wyoming is not None:
            sinks.append(self.wyoming)
        return [*sinks, *self.extra_sinks]

    def mqtt_site(self, site: str) -> bool:
        """Whether a site's wakes, segments and discovery go to MQTT (a Wyoming client's only with
        ``wyoming.publish_mqtt``)."""
        wyoming = self.wyoming
        return wyoming is None or wyoming.mqtt_site(site)

    def _mqtt_sites(self) -> list[str]:
        return [site for site in self.hub.sites() if self.mqtt_site(site)] if self.hub is not None else []

    def start(self) -> None:
        s = self.settings
        self.notifier.extend_timeout(START_TIMEOUT_EXTENSION)
        session = self.factories.session(s.model)
        self.archive = self._new_archive(s, session)
        parts = self._build_parts(s, session, self.archive)
        try:
            check_sites(s.inputs)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
        self.hub = AudioHub(s.inputs, self.stop_event, self.liveness, remote_limits(s))
        self.hub.on_sites_changed = self._sites_changed
        self.hub.on_input_state = self._main_wake.set  # the main loop follows input health at once
        if s.mqtt.enabled:
            self.outbox = self._open_outbox(s)
            self.publisher = self._new_publisher(s, self.outbox, self._mqtt_sites())
        self.pipeline = Pipeline(self.hub, parts, self._sinks(), self.metrics, self.toggles)
        self.metrics.read_broker_connected(lambda: self.publisher is not None and self.publisher.connected)
        if s.service.metrics.enabled:
            try:
                host, port = self.metrics.serve(s.service.metrics.address, s.service.metrics.port)
            except OSError as exc:
                raise StartupError(f"service.metrics: {exc}") from exc
            log.info("metrics on http://%s:%d/metrics", host, port)
        if self.archive is not None:
            self.archive.start()
        if self.publisher is not None:
            self.publisher.start()
        self.hub.start()
        self.pipeline.sync_sites()
        self._thread = supervise("pipeline", self.pipeline.run, stop=self.stop_event, liveness=self.liveness,
                                 backoff=self.factories.pipeline_backoff(), beat_within=BEAT_WITHIN, logger=log)
        self._start_wyoming(s)

    def _start_wyoming(self, s: Settings) -> None:
        """Start the Wyoming service (a sink of the pipeline, its thread beating into the daemon's liveness);
        ``StartupError`` naming the setting when it cannot listen."""
        if not s.wyoming.enabled:
            return
        server = WyomingServer(self, s.wyoming, self.liveness)
        try:
            server.start()
        except WyomingError as exc:
            raise StartupError(str(exc)) from exc
        self.wyoming = server
        if self.pipeline is not None:
            self.pipeline.set_sinks(self._sinks())

    def _stop_wyoming(self) -> None:
        server, self.wyoming = self.wyoming, None
        if server is not None:
            server.stop()  # its clients' streams end; the pipeline finishes them
            if self.pipeline is not None:
                self.pipeline.set_sinks(self._sinks())

    # -- callbacks from other threads -----------------------------------------------------------------------

    def _on_toggle(self, site: str, enabled: bool, reason: str) -> None:
        """A Hermes ``toggleOn`` (``enabled``) or ``toggleOff`` arrived; the pipeline keeps the state."""
        if self.pipeline is not None:
            self.pipeline.toggle(site, enabled, reason)
        else:
            self.toggles.apply(site, enabled, reason)

    def satellite_audio(self, site: str, samples: np.ndarray, rate: int) -> None:
        """Remote audio for ``site`` (mono int16 at ``rate``), from the MQTT side's thread; refusals are counted
        and logged at most every 10 s (a flood of new siteIds must not flood the journal)."""
        hub = self.hub
        if hub is None:
            return
        try:
            hub.remote(site, "satellite").write(samples, rate)
        except (RemoteRefused, ValueError, TypeError) as exc:
            self._remote_refusals += 1
            now = time.monotonic()
            level = logging.WARNING if now - self._last_refusal_log > 10.0 else logging.DEBUG
            if level == logging.WARNING:
                self._last_refusal_log = now
            log.log(level, "satellite audio refused: %s (%d refused so far)", exc, self._remote_refusals)

    def _on_feedback(self, site: str, payload: bytes) -> None:
        """A verdict on ``<prefix>/<site>/feedback`` (MQTT thread); a MessageError is answered on the error
        topic."""
        archive = self.archive
        if archive is None:
            raise MessageError("feedback: the review archive is off (review.enabled: false)")
        archive.feedback(site, payload)

    def _sites_changed(self) -> None:
        if self.publisher is not None and self.hub is not None:
            self.publisher.update_sites(self._mqtt_sites())

    # -- health (main thread) -------------------------------------------------------------------------------

    def _check_inputs(self) -> bool:
        """Follow each input's state: metrics, and the availability of its sites; True when one changed."""
        if self.hub is None:
            return False
        changed = False
        for name, st in self.hub.status().items():
            if st.state == "starting":
                continue
            up = st.state == "running"
            if self._input_up.get(name) != up:
                self._input_up[name] = up
                self.metrics.set_input_up(name, up)
                changed = True
            for site in st.sites:
                if self._site_available.get(site, True) != up:
                    self._site_available[site] = up
                    if self.publisher is not None:
                        self.publisher.set_site_available(site, up)
                    log.info("site %s: %s", site, "available again" if up else
                             f"unavailable while input {name} is {st.state}")
        return changed

    def _count(self, key: str, source: object, value: int, add: Callable[[int], None]) -> None:
        """Add what ``value`` grew by since last seen; a new source object (after a reload), or a count that went
        down (its input was replaced), counts from zero."""
        last_source, last = self._seen.get(key, (id(source), 0))
        if last_source != id(source) or value < last:
            last = 0
        add(value - last)
        self._seen[key] = (id(source), value)

    def _update_metrics(self) -> None:
        if self.pipeline is not None:
            self.metrics.set_provider(self.pipeline.parts.session.provider)
        if self.hub is not None:
            inputs = self.hub.status(remote=True)
            for name, st in inputs.items():
                self._count(f"overruns:{name}", self.hub, st.overruns, partial(self.metrics.overrun, name))
                self._count(f"reopens:{name}", self.hub, st.reopens, partial(self.metrics.reopen, name))
            # Remote sites come and go (idle timeout, new siteIds): forget the last counts of those that left,
            # so this table stays bounded by the inputs that exist now.
            for key in [k for k in self._seen if k.partition(":")[0] in ("overruns", "reopens")
                        and k.partition(":")[2] not in inputs]:
                del self._seen[key]
        pub = self.publisher
        if pub is not None:
            c = pub.counters
            self._count("reconnects", pub, c.reconnects, self.metrics.broker_reconnect)
            self._count("published", pub, c.published, self.metrics.add_published)
            self._count("dropped", pub.outbox, c.dropped, self.metrics.add_dropped)
            self.metrics.set_outbox_depth(c.outbox_depth)

    def waiting_for(self) -> list[str]:
        """Devices of local inputs that are not delivering (missing, reopening, failed)."""
        if self.hub is None:
            return []
        return [f"{st.device}" for st in self.hub.status().values() if st.state not in ("running", "finished")]

    def status_line(self) -> str:
        p, pub = self.pipeline, self.publisher
        overruns = sum(st.overruns for st in self.hub.status(remote=True).values()) if self.hub else 0
        broker = pub.state if pub is not None else "disabled"
        provider = p.parts.session.provider.replace("ExecutionProvider", "") if p else "-"
        text = (f"{provider}; {len(p.sites) if p else 0} sites; {p.detections if p else 0} detections; "
                f"{overruns} overruns; broker {broker}")
        waiting = self.waiting_for()
        if waiting:
            text = f"waiting for {', '.join(waiting)}; {text}"
        if self.archive is not None:
            review = self.archive.summary()
            rate = review.effective_wake_rate
            text += f"; {review.false_wakes} false wakes, effective {'-' if rate is None else f'{rate:.0%}'}"
            if self.archive.errors:
                text += f", {self.archive.errors} not archived"
        late = self.liveness.overdue()
        if late:
            text = f"{', '.join(late)} not responding; {text}"
        return text

    # -- reload ---------------------------------------------------------------------------------------------

    def request_reload(self) -> None:
        self._reload_requested.set()

    def _prepare(self, new: Settings) -> _Plan:
        """Build and validate everything the new config needs, changing nothing that runs."""
        old = self.settings
        assert self.pipeline is not None and self.hub is not None
        plan = _Plan(new)
        current = self.pipeline.parts
        try:
            check_sites(new.inputs)
            local = {site for inp in new.inputs for site in inp.site_map().values()}
            clash = local & set(self.hub.remote_sites())
            if clash:
                raise ValueError(f"siteId {sorted(clash)[0]!r} is in use by a remote site")
            review_changed = (new.review != old.review or new.service.state_dir != old.service.state_dir
                              or new.segments.enabled != old.segments.enabled
                              or new.detector.keywords != old.detector.keywords)
            if (new.model != old.model or new.detector != old.detector or new.segments != old.segments
                    or review_changed):
                session = current.session
                if new.model != old.model:
                    self.notifier.extend_timeout(START_TIMEOUT_EXTENSION)
                    session = self.factories.session(new.model)
                    self.watchdog.poll()
                try:
                    if review_changed:
                        plan.replace_archive = True
                        plan.archive = self._new_archive(new, session)
                    plan.parts = self._build_parts(new, session, plan.archive if review_changed else self.archive)
                except BaseException:
                    if session is not current.session:
                        session.close()
                    raise
                self.watchdog.poll()
            if new.mqtt != old.mqtt or new.service.state_dir != old.service.state_dir:
                plan.replace_publisher = True
                if new.mqtt.enabled:
                    same_dir = new.service.state_path() == old.service.state_path() and self.outbox is not None
                    plan.outbox = self.outbox if same_dir else self._open_outbox(new)
                    assert plan.outbox is not None
                    plan.publisher = self._new_publisher(new, plan.outbox, self._mqtt_sites())
        except BaseException:
            plan.discard(current, self.outbox)
            raise
        return plan

    def _commit(self, plan: _Plan) -> None:
        """Swap the prepared parts in; the pipeline pauses for at most one pass."""
        assert self.pipeline is not None and self.hub is not None
        new, old = plan.settings, self.settings
        if new.inputs != old.inputs:
            self.hub.update(new.inputs)
            for name in [n for n in self._input_up if n not in self.hub.status()]:
                del self._input_up[name]
                self.metrics.forget_input(name)
        self.hub.remote_limits = remote_limits(new)
        if plan.outbox is not None:
            plan.outbox.max_bytes = new.mqtt.outbox.max_bytes
        sinks = self._sinks(plan.publisher if plan.replace_publisher else self.publisher,
                            plan.archive if plan.replace_archive else self.archive, replace=True)
        if plan.parts is not None:
            # Segments in progress and pending clips reach the old archive; the new one gets what follows.
            retired = self.pipeline.swap(plan.parts, sinks)
            retired.close(keep_session=retired.session is plan.parts.session)
        else:
            self.pipeline.set_sinks(sinks)
        if plan.replace_archive:
            old_archive, self.archive = self.archive, plan.archive
            if old_archive is not None:
                old_archive.stop()
            if self.archive is not None:
                self.archive.start()
        if plan.replace_publisher:
            old_pub, old_outbox = self.publisher, self.outbox
            self.publisher = plan.publisher
            self.outbox = plan.outbox
            if old_pub is not None:
                old_pub.stop(timeout=1.0)  # on this thread: detection goes on meanwhile
            if old_outbox is not None and old_outbox is not self.outbox:
                old_outbox.close()
            if self.publisher is not None:
                for site, up in self._site_available.items():
                    if not up:
                        self.publisher.set_site_available(site, False)
                self.publisher.start()
        if new.wyoming != old.wyoming:
            self._stop_wyoming()
            try:
                self._start_wyoming(new)
            except StartupError as exc:
                log.error("%s; the Wyoming service stays off until the next reload", exc)
        self._sites_changed()
        self.settings = new

    def reload(self) -> bool:
        """Re-read the config file; a bad one (or parts that cannot be built) is reported and the running
        configuration stays, untouched."""
        self._reload_requested.clear()
        if self.config_path is None:
            log.warning("reload requested, but kwsd was started without a config file")
            return False
        with self._reload_lock:
            self.notifier.reloading("reloading configuration")
            try:
                new = settings_mod.load_for_run(self.config_path, self.settings)
                plan = self._prepare(new)
            except Exception as exc:  # whatever it is, the running configuration must survive it
                message = str(exc) if isinstance(exc, settings_mod.ConfigError | StartupError) else describe(exc)
                log.error("reload of %s failed, keeping the running configuration: %s", self.config_path, message)
                log.debug("reload failure", exc_info=exc)
                self.notifier.ready(self.status_line())
                return False
            self._commit(plan)
            assert self.pipeline is not None
            log.info("configuration reloaded: %d sites", len(self.hub.sites()) if self.hub else 0)
            release_freed_memory()
            self.notifier.ready(self.status_line())
            return True

    # -- main thread ----------------------------------------------------------------------------------------

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
        except Exception as exc:
            log.error("cannot start: %s", describe(exc))
            log.debug("start-up failure", exc_info=exc)
            self.shutdown()
            return 1
        # READY does not wait for audio (a missing mic must not fail the start), but it does wait a moment for
        # each input's first open, so its STATUS says truthfully which devices are missing.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and self.hub is not None and any(
                st.state == "starting" for st in self.hub.status().values()):
            time.sleep(0.02)
        release_freed_memory()
        self._ready = True
        self._check_inputs()
        status = self.status_line()
        log.info("ready: %s", status)
        self.notifier.ready(status)
        self._last_status = time.monotonic()
        interval = min(self.settings.service.status_interval, 5.0)
        ping = self.watchdog.interval
        tick = TICK if ping is None else min(TICK, ping / 2)
        while True:
            self._main_wake.wait(tick)
            self._main_wake.clear()
            if self.stop_event.is_set():
                break
            if self._reload_requested.is_set():
                self.reload()
                interval = min(self.settings.service.status_interval, 5.0)
            self.watchdog.poll()
            changed = self._check_inputs()
            now = time.monotonic()
            if changed or now - self._last_status >= interval:
                self._update_metrics()
                status = self.status_line()
                if status != self._status_text or now - self._last_status >= interval:
                    self.notifier.status(status)
                    self._status_text = status
                if self.publisher is not None:
                    self.publisher.set_summary({"status": status, **self.metrics.summary()})
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
        self._stop_wyoming()
        self.stop_event.set()
        if self.hub is not None:
            self.hub.wake()
        if self._thread is not None:
            self._thread.join(timeout=3.0)
        if self.hub is not None:
            self.hub.stop()
        if self.publisher is not None:
            self.publisher.stop(timeout=2.0)
        if self.archive is not None:
            self.archive.stop()  # after the pipeline's last segments and clips
        if self.outbox is not None:
            self.outbox.close()
        if self.pipeline is not None:
            self.pipeline.parts.close(keep_session=False)
        self.metrics.close()
        log.info("stopped")


def run(config_path: Path | None, settings: Settings,
        notifier_factory: Callable[[], Notifier] = Notifier) -> int:
    return Daemon(config_path, settings, notifier_factory()).serve()
