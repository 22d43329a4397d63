"""The pipeline: every site's new audio -> segment recorder and detector -> wake events and segments to the sinks.

One supervised thread (``run`` is its body) waits until some site can complete a detector step, reads every site's
new audio from the hub by absolute index, feeds the recorder and the detector, runs ONE batched detector step and
hands what it finds to every sink (``put_wake``/``put_segment``: non-blocking, never raising). Per site the
pipeline keeps a ``SiteStream``; local and remote sites are alike (both are hub inputs).

A reload builds new ``Parts`` (session, detector, recorder) on the main thread and ``swap``s them in under the
pipeline's lock, between two passes: the new detector starts every stream where the old one stopped, so detection
pauses for no longer than one step. The Hermes toggle state belongs to the pipeline and survives reloads and
publisher restarts. Time is counted in samples, never wall clock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from kwsd.audio.hub import AudioHub
from kwsd.kws.detector import Detection, Detector
from kwsd.kws.session import ModelSession
from kwsd.lifecycle import ErrorOnce, Part
from kwsd.metrics import Metrics
from kwsd.mqtt.messages import WakeEvent
from kwsd.segments import Segment, SegmentRecorder
from kwsd.toggles import ToggleState

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# Most audio per site fed before a detector step. A backlog (fast file replay, a burst of remote audio) is cut
# into rounds of this size, so a wake is found while its keyword is still in the segment recorder's look-back.
ROUND_SAMPLES = SAMPLE_RATE // 2
PASS_WAIT = 1.0
"""Longest sleep between passes (seconds) when no site's next step is complete; the pipeline beats at least this
often."""
BEAT_WITHIN = 10.0
"""The pipeline promises a beat within this many seconds: a pass stuck longer stops the watchdog."""
SWAP_REPLAY = 3 * SAMPLE_RATE
"""Audio before a swap that the new detector hears again (the longest keyword and then some), so a keyword said
while the parts were swapped is still detected."""


class Sink(Protocol):
    """Where wakes and segments go (the MQTT publisher, the review archive, the Wyoming server).

    Both calls run on the pipeline thread: they must only hand the object over (a bounded queue) and return, and
    they must not raise (the pipeline logs and carries on if one does).
    """

    def put_wake(self, event: WakeEvent) -> None: ...

    def put_segment(self, segment: Segment) -> None: ...


class Tap(Protocol):
    """Sees the audio, wakes and near misses of every site on the pipeline thread (the review archive's clip
    cutter); like a sink it only copies and hands over, and never raises."""

    def feed(self, site: str, samples: np.ndarray, first: int) -> None: ...

    def wake(self, event: WakeEvent, start_sample: int, end_sample: int) -> None: ...

    def near_miss(self, miss: Detection, device: str) -> None: ...

    def drop(self, site: str) -> None: ...

    def flush(self) -> None: ...


def energy_dbfs(samples: np.ndarray) -> float:
    """RMS level of int16-scale audio in dB relative to full scale (-120 for silence)."""
    if samples.size == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(samples.astype(np.float64)))))
    return max(-120.0, 20.0 * math.log10(rms / 32768.0)) if rms > 0 else -120.0


@dataclass
class Parts:
    """What a reload may replace; built (and so validated) on the main thread before the swap."""

    session: ModelSession
    detector: Detector
    recorder: SegmentRecorder
    tap: Tap | None = None
    """The review archive's clip cutter (None: no archive); it goes with the detector that reports near misses."""

    def close(self, keep_session: bool) -> None:
        """Stop the thread pools of a replaced detector (and of its session unless the new parts share it)."""
        self.detector.close()
        if not keep_session:
            self.session.close()


@dataclass
class SiteStream:
    """What the pipeline knows about one site's stream."""

    site: str
    device: str
    next_sample: int
    """The absolute 16 kHz index the detector expects next."""
    reopens: int
    """The input's reopen count last seen (a change means a new capture stream)."""
    remote: bool = False
    restart: str = ""
    """Why the stream must start afresh with its next audio (empty: it need not)."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Wake word id -> rejected candidates last counted (the detector's count since the stream began)."""
    last_wake_end: int = 0
    """Absolute index where the last detected keyword ended (a replay after a swap starts after it)."""

    def reset(self, detector: Detector, start: int) -> None:
        """Start the stream afresh at absolute index ``start``: new features, model cache and decoder."""
        detector.reset_stream(self.site, start)
        self.next_sample = start
        self.restart = ""
        self.rejected.clear()


class Pipeline:
    """Owns the per-site streams and the swappable parts; ``run`` is the body of its supervised thread."""

    def __init__(self, hub: AudioHub, parts: Parts, sinks: Sequence[Sink] = (), metrics: Metrics | None = None,
                 toggles: ToggleState | None = None) -> None:
        self.hub = hub
        self.parts = parts
        self.sinks: tuple[Sink, ...] = tuple(sinks)
        self.metrics = metrics if metrics is not None else Metrics()
        self.toggles = toggles if toggles is not None else ToggleState()
        self.sites: dict[str, SiteStream] = {}
        self.detections = 0
        self.suppressed = 0
        self.audio_seconds = 0.0
        self.busy_seconds = 0.0
        self._lock = threading.Lock()  # held for a whole pass; swaps happen between passes
        self._generation = -1
        self._runs = 0
        self._resets: set[str] = set()  # sites whose stream restarts with their next audio (toggleOn)
        self._resets_lock = threading.Lock()
        self._sink_errors = ErrorOnce(log, "pipeline sink")

    @property
    def detector(self) -> Detector:
        return self.parts.detector

    @property
    def recorder(self) -> SegmentRecorder:
        return self.parts.recorder

    # -- changes from other threads -------------------------------------------------------------------------

    def swap(self, parts: Parts, sinks: Sequence[Sink] | None = None) -> Parts:
        """Take new parts (and ``sinks``, if given) into use between two passes; returns the old parts for the
        caller to close.

        Segments in progress end as ``stopped`` and go to the old sinks, the old tap's pending clips to its
        archive. Every stream continues on the new detector, which first hears the last ``SWAP_REPLAY`` samples
        again (from after the last detected keyword on), so a keyword that straddles the swap is detected and one
        already detected is not detected twice.
        """
        with self._lock:
            old = self.parts
            for seg in old.recorder.flush():
                self._emit_segment(seg)
            if old.tap is not None:
                self._tap_call(old.tap.flush)
            if sinks is not None:
                self.sinks = tuple(sinks)
            for site, st in self.sites.items():
                replay = np.zeros(0, dtype=np.int16)
                if not st.restart:
                    start = max(st.next_sample - SWAP_REPLAY, st.last_wake_end)
                    replay = old.recorder.audio(site, start, st.next_sample)
                begin = st.next_sample - replay.size
                parts.detector.add_stream(site, begin)
                if replay.size:
                    parts.recorder.feed(site, replay, begin)
                    parts.detector.accept(site, replay)
                    if parts.tap is not None:
                        self._tap_call(parts.tap.feed, site, replay, begin)
                st.rejected.clear()
            self.parts = parts
        self.hub.wake()
        return old

    def set_sinks(self, sinks: Sequence[Sink]) -> None:
        """Replace the sinks between two passes."""
        with self._lock:
            self.sinks = tuple(sinks)

    def toggle(self, site: str, on: bool, reason: str = "") -> bool:
        """Apply a Hermes ``toggleOn`` (``on``) or ``toggleOff`` for ``site``; returns whether detection is
        enabled afterwards. Any thread."""
        enabled = self.toggles.apply(site, on, reason)
        self.toggled(site, enabled, reason)
        return enabled

    def toggled(self, site: str, enabled: bool, reason: str = "") -> None:
        """``site``'s detection was switched (the state is in ``toggles``). Switching it on restarts the site's
        stream with its next audio, so a keyword heard while it was off cannot fire just after."""
        log.info("site %s: detection %s (%s)", site, "on" if enabled else "off", reason or "no reason given")
        if enabled:
            with self._resets_lock:
                self._resets.add(site)
            self.hub.wake()

    # -- the pipeline thread --------------------------------------------------------------------------------

    def run(self, part: Part) -> None:
        """The supervised body: passes until the daemon stops. A restart after a failure begins every stream
        afresh (whatever state made the pass fail is gone)."""
        with self._lock:
            if self._runs:
                for st in self.sites.values():
                    st.restart = st.restart or "the pipeline restarted"
            self._runs += 1
        last_slow = time.monotonic()
        while not part.stopping:
            self.run_once()  # at once on a (re)start, then whenever a site completes a step
            part.beat()
            now = time.monotonic()
            if now - last_slow >= 1.0:
                last_slow = now
                self.expire_idle()
                if self.audio_seconds > 0:
                    self.metrics.set_real_time_factor(self.busy_seconds / self.audio_seconds)
                self.metrics.set_streams(len(self.sites))
            self.hub.wait(PASS_WAIT, self.targets())
        self.flush_segments()

    def targets(self) -> dict[str, int]:
        """Per site, the absolute index up to which audio completes the detector's next step."""
        det = self.parts.detector
        return {site: st.next_sample + det.samples_needed(site) for site, st in list(self.sites.items())}

    def sync_sites(self) -> None:
        """Follow the hub's sites: a new site gets a stream, a removed one is dropped (its segment flushed)."""
        gen = self.hub.generation
        if gen == self._generation:
            return
        self._generation = gen
        hub, det = self.hub, self.parts.detector
        current = hub.sites()
        for site in current:
            if site in self.sites:
                continue
            try:
                remote = hub.is_remote(site)
                start = 0 if remote else hub.end(site)
                st = SiteStream(site, hub.device(site), start, hub.reopens(site), remote=remote)
            except KeyError:  # removed again meanwhile
                continue
            self.sites[site] = st
            det.add_stream(site, start)
            log.info("site %s: input %s", site, st.device)
        known = set(current)
        for site in [s for s in self.sites if s not in known]:
            self._drop(site)

    def _drop(self, site: str) -> None:
        self.sites.pop(site, None)
        self.parts.detector.remove_stream(site)
        for seg in self.parts.recorder.flush(site):
            self._emit_segment(seg)
        if self.parts.tap is not None:
            self._tap_call(self.parts.tap.drop, site)
        log.info("site %s: removed", site)

    def run_once(self) -> bool:
        """Read every site's new audio, run one batched detector step, hand on what it found; returns whether
        audio came."""
        with self._lock:
            return self._pass()

    def _pass(self) -> bool:
        self.sync_sites()
        hub = self.hub
        with self._resets_lock:
            resets, self._resets = self._resets, set()
        new: dict[str, tuple[np.ndarray, int]] = {}
        for site, st in self.sites.items():
            if site in resets:
                st.restart = st.restart or "detection toggled on"
            try:
                # The capture index runs on across a device reopen (the gap is not counted), so a reopen is
                # read before the audio: the hub raises the count only after the old stream's last sample.
                reopens = hub.reopens(site)
                samples, first = hub.read(site)
            except KeyError:  # a remote site closed on another thread; sync_sites drops it next pass
                continue
            if reopens != st.reopens:
                st.reopens = reopens
                st.restart = "device reopened"
            if samples.size:
                new[site] = (samples, first)
        got_audio = bool(new)
        det = self.parts.detector
        offset = 0
        while True:
            for site, (samples, first) in new.items():
                if offset < samples.size:
                    self._feed(self.sites[site], samples[offset:offset + ROUND_SAMPLES], first + offset)
            t0 = time.perf_counter()
            hits = det.step()
            step = time.perf_counter() - t0
            if got_audio:
                self.busy_seconds += step
                self.metrics.observe_step(step)
            for hit in hits:
                self._wake(hit)
            self._near_misses()
            offset += ROUND_SAMPLES
            if not any(offset < samples.size for samples, _ in new.values()):
                break
        for site in hub.closing_sites():
            if site in self.sites:
                self._finish(site)
        self._count_rejections()
        return got_audio

    def expire_idle(self) -> None:
        """Drop the remote sites the hub found idle (``idle_timeout``), each decoded to its last frame first: the
        model's look-ahead after the last audio, so a keyword said just before the remote end fell silent fires."""
        expired = self.hub.expire_idle()
        if not expired:
            return
        with self._lock:
            for site in expired:
                if site in self.sites:
                    self._finish_stream(site)
                    self._drop(site)

    def _finish_stream(self, site: str) -> None:
        """Decode a site's last frames (the model's look-ahead included) and hand on what they complete."""
        for hit in self.parts.detector.finish(site):
            self._wake(hit)
        self._near_misses()

    def _finish(self, site: str) -> None:
        """A closed remote site: decode the rest of its audio (the model's look-ahead included), hand on the last
        detections and segment, drop the stream, then tell whoever closed it."""
        try:
            samples, first = self.hub.read(site)  # what was written after this pass read the site
        except KeyError:
            samples, first = np.zeros(0, dtype=np.int16), 0
        if samples.size:
            self._feed(self.sites[site], samples, first)
        self._finish_stream(site)
        done = self.hub.finish_remote(site)
        self._drop(site)
        if done is not None:
            try:
                done()
            except Exception as exc:
                self._sink_errors.error(f"after closing site {site}: {exc}", exc)

    def _feed(self, st: SiteStream, samples: np.ndarray, first: int) -> None:
        det = self.parts.detector
        if st.restart:
            log.info("site %s: %s; detector restarts at sample %d", st.site, st.restart, first)
            st.reset(det, first)
        elif first != st.next_sample:
            # Audio was lost (the reader fell behind the ring): start the stream afresh at the new index,
            # so no keyword is stitched together across the gap and stream time stays right.
            log.info("site %s: %d samples missing; detector restarts at sample %d",
                     st.site, first - st.next_sample, first)
            st.reset(det, first)
        st.next_sample = first + samples.size
        self.audio_seconds += samples.size / SAMPLE_RATE
        for seg in self.parts.recorder.feed(st.site, samples, first):
            self._emit_segment(seg)
        if self.parts.tap is not None:
            self._tap_call(self.parts.tap.feed, st.site, samples, first)
        det.accept(st.site, samples)

    def _wake(self, hit: Detection) -> None:
        st = self.sites[hit.stream]
        st.last_wake_end = max(st.last_wake_end, hit.end_sample)
        if not self.toggles.enabled(hit.stream):
            self.suppressed += 1
            log.info("site %s: %s (score %.3f) ignored: detection toggled off", hit.stream, hit.keyword, hit.score)
            return
        session_id = uuid.uuid4().hex
        try:
            now_sample = max(st.next_sample, self.hub.end(hit.stream))
        except KeyError:
            now_sample = st.next_sample
        keyword_audio = self.parts.recorder.audio(hit.stream, hit.start_sample, hit.end_sample)
        latency = (now_sample - hit.end_sample) / SAMPLE_RATE
        event = WakeEvent(
            site_id=hit.stream,
            wakeword_id=hit.wakeword_id,
            keyword=hit.keyword,
            score=round(hit.score, 4),
            threshold=hit.threshold,
            start=round(hit.start, 3),
            end=round(hit.end, 3),
            session_id=session_id,
            device=st.device,
            energy=round(energy_dbfs(keyword_audio), 1),
            latency=round(latency * 1000, 1),
        )
        self.detections += 1
        self.metrics.detection(hit.stream, hit.wakeword_id)
        self.metrics.observe_wake_latency(latency)
        log.info("wake: site %s heard %s (score %.3f >= %.3f) at %.2f-%.2f s, %.1f dBFS, %.0f ms after it ended",
                 hit.stream, hit.keyword, hit.score, hit.threshold, hit.start, hit.end, event.energy, event.latency)
        for sink in self.sinks:
            try:
                sink.put_wake(event)
            except Exception as exc:  # a sink's bug must not stop detection
                self._sink_errors.error(f"{type(sink).__name__}.put_wake: {exc}", exc)
        self.parts.recorder.start(hit.stream, session_id, hit.start_sample, hit.end_sample)
        if self.parts.tap is not None:
            self._tap_call(self.parts.tap.wake, event, hit.start_sample, hit.end_sample)

    def _near_misses(self) -> None:
        """Hand the detector's final near misses to the tap; none are kept while a site is toggled off."""
        misses = self.parts.detector.near_misses()
        tap = self.parts.tap
        if tap is None:
            return
        for miss in misses:
            st = self.sites.get(miss.stream)
            if st is not None and self.toggles.enabled(miss.stream):
                self._tap_call(tap.near_miss, miss, st.device)

    def _tap_call(self, call: Callable[..., None], *args: object) -> None:
        try:
            call(*args)
        except Exception as exc:  # the review archive's bug must not stop detection
            self._sink_errors.error(f"review tap: {exc}", exc)

    def _emit_segment(self, segment: Segment) -> None:
        log.info("segment %s: %.1f s from site %s (%s)", segment.session_id, segment.duration, segment.site,
                 segment.reason)
        for sink in self.sinks:
            try:
                sink.put_segment(segment)
            except Exception as exc:
                self._sink_errors.error(f"{type(sink).__name__}.put_segment: {exc}", exc)

    def _count_rejections(self) -> None:
        det = self.parts.detector
        for site, st in self.sites.items():
            for wakeword_id, n in det.rejected(site).items():
                old = st.rejected.get(wakeword_id, 0)
                # A count below the last one seen means the stream was restarted: its decoder counts from zero.
                new = n - old if n >= old else n
                if new:
                    self.metrics.rejection(site, wakeword_id, new)
                st.rejected[wakeword_id] = n

    def flush_segments(self) -> None:
        """End every segment in progress (stopping) and hand them on."""
        with self._lock:
            for seg in self.parts.recorder.flush():
                self._emit_segment(seg)
            if self.parts.tap is not None:
                self._tap_call(self.parts.tap.flush)
