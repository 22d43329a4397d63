"""The wake archive: a sink of the pipeline that keeps each wake's audio and figures on disk, off the audio path.

The pipeline hands over (``put_wake``, ``put_segment``, ``put_clip``: a bounded queue, never blocking, never
raising); one supervised thread writes the WAVs and sidecars, applies verdicts and enforces the bounds
(``review.max_bytes`` for wakes, ``review.near_miss_max_bytes`` for near misses, ``review.max_days`` for both; oldest
first). A full disk or an unwritable folder is logged once and counted (``kwsd_review_errors_total{reason="write"}``);
detection is never affected.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kwsd import __version__
from kwsd.lifecycle import ErrorOnce, Liveness, Part, supervise
from kwsd.mqtt.messages import MessageError, WakeEvent, to_wav
from kwsd.review.feedback import Feedback
from kwsd.review.store import (
    FOLDERS,
    Entry,
    Figures,
    Kind,
    ReviewError,
    check_verdict,
    ensure_dir,
    figures,
    file_stem,
    read_entry,
    scan,
    set_verdict,
    write_file,
)
from kwsd.segments import Segment
from kwsd.settings import ReviewSettings

if TYPE_CHECKING:
    from kwsd.metrics import Metrics

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
"""Items waiting for the archive thread; beyond this the newest is dropped and counted (the disk is stuck)."""
MAINTENANCE_SECONDS = 30.0
"""How often the thread re-reads sidecars changed by ``kwsd review mark`` and removes entries past max_days."""


@dataclass(frozen=True)
class _Clip:
    event: WakeEvent
    samples: np.ndarray
    start_sample: int
    near_miss: bool
    sample_rate: int


@dataclass(frozen=True)
class _Mark:
    feedback: Feedback
    source: str


_STOP = object()


class Archive:
    """Keeps wakes and near misses under ``root``; implements the pipeline's sink protocol.

    ``put_wake``/``put_segment`` (the sink protocol) and ``put_clip`` run on the pipeline thread, ``feedback`` on
    the MQTT thread: they only check, register and enqueue.
    """

    def __init__(self, settings: ReviewSettings, root: Path, *, metrics: Metrics | None = None,
                 segments: bool = True, model_version: str = "", keywords: Sequence[str] = (),
                 queue_size: int = QUEUE_SIZE, maintenance: float = MAINTENANCE_SECONDS,
                 liveness: Liveness | None = None) -> None:
        self.settings = settings
        self.root = root
        self.metrics = metrics
        self.segments = segments
        """Whether follow-up segments come for wakes (else the pipeline's tap sends a clip)."""
        self.model_version = model_version
        self.keywords = tuple(keywords)
        self.maintenance = maintenance
        """Seconds between looks at sidecars changed on disk (``kwsd review mark``) and at ``max_days``."""
        self.liveness = liveness if liveness is not None else Liveness()
        """Where the writer thread beats (as part ``review``): the daemon's, so its watchdog sees a stuck disk."""
        self.errors = 0
        """Entries or audio that could not be written, plus hand-offs dropped because the queue was full."""
        self.written = 0
        self.evicted = 0
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._known: dict[str, tuple[Kind, str]] = {}  # sessionId -> (kind, site); any thread, under the lock
        self._index: dict[str, Entry] = {}  # archive thread only
        self._mtimes: dict[str, int] = {}
        self._ages: dict[str, OrderedDict[str, int]] = {"wake": OrderedDict(), "near_miss": OrderedDict()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_errors = ErrorOnce(log, "review archive")
        self._queue_full_logged = 0.0
        self._figures_due = True
        self._summary = Figures()
        self._rated: set[tuple[str, str]] = set()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Read what is already archived (so verdicts on old sessions work), then start the writer thread."""
        try:
            ensure_dir(self.root)
            for kind in FOLDERS.values():
                ensure_dir(self.root / kind)
        except OSError as exc:
            self._write_error(f"cannot create {self.root}: {exc.strerror or exc}")
        for entry in scan(self.root):
            self._add(entry)
        self._prune(datetime.now(UTC))
        self._enforce_bounds()
        self._update_figures()
        log.info("review archive %s: %d wakes, %d near misses kept", self.root, len(self._ages["wake"]),
                 len(self._ages["near_miss"]))
        self._thread = supervise("review", self._body, stop=self._stop, liveness=self.liveness, beat_within=5.0,
                                 logger=log)

    def stop(self, timeout: float = 5.0) -> None:
        """Write what was handed over, then stop the thread."""
        if self._thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("review archive: still busy after %.1f s; stopping with %d items unwritten", timeout,
                        self._queue.qsize())
            self._stop.set()
        self._thread.join(timeout + 1.0)
        self._stop.set()
        self._thread = None

    # -- hand-over (other threads) ----------------------------------------------------------------------------

    def put_wake(self, event: WakeEvent) -> None:
        """A wake was published: its sidecar is written now, its audio when the segment (or clip) comes."""
        with self._lock:
            self._known[event.session_id] = ("wake", event.site_id)
        self._put(event)

    def put_segment(self, segment: Segment) -> None:
        """A follow-up segment finished: it becomes the audio of the wake with the same sessionId."""
        self._put(segment)

    def put_clip(self, event: WakeEvent, samples: np.ndarray, start_sample: int, near_miss: bool,
                 sample_rate: int = 16000) -> None:
        """Audio around a keyword cut by the pipeline's tap: a near miss, or a wake when segments are off."""
        if near_miss:
            with self._lock:
                self._known[event.session_id] = ("near_miss", event.site_id)
        self._put(_Clip(event, samples, start_sample, near_miss, sample_rate))

    def feedback(self, site: str, payload: bytes) -> None:
        """A verdict from ``<prefix>/<site>/feedback``; raises MessageError for a bad payload or unknown session
        (the publisher answers it on the error topic)."""
        fb = Feedback.from_payload(payload, site)
        self.check(fb)
        self._put(_Mark(fb, "mqtt"))

    def check(self, fb: Feedback) -> None:
        """Raise MessageError if ``fb`` names a session this archive does not hold or a verdict it cannot take."""
        if fb.session_id is None:
            return
        with self._lock:
            known = self._known.get(fb.session_id)
        if known is None:
            raise MessageError(f"feedback: unknown sessionId {fb.session_id!r} (not in the review archive)")
        kind, heard_on = known
        if heard_on != fb.site_id:
            raise MessageError(f"feedback: session {fb.session_id} was heard on site {heard_on!r}, "
                               f"not {fb.site_id!r}")
        try:
            check_verdict(kind, fb.verdict, fb.session_id)
        except ReviewError as exc:
            raise MessageError(f"feedback: {exc}") from exc

    def _put(self, item: object) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.errors += 1
            if self.metrics is not None:
                self.metrics.review_error("queue_full")
            now = time.monotonic()
            if now - self._queue_full_logged > 10.0:
                self._queue_full_logged = now
                log.warning("review archive: %d items waiting to be written; dropping the newest (%d dropped or "
                            "failed so far)", self._queue.qsize(), self.errors)

    # -- the writer thread -------------------------------------------------------------------------------------

    def _body(self, part: Part) -> None:
        next_maintenance = time.monotonic() + self.maintenance
        while True:
            try:
                item = self._queue.get(timeout=min(1.0, self.maintenance))
            except queue.Empty:
                item = None
            part.beat()
            if item is _STOP:
                if self._figures_due:
                    self._update_figures()
                self._stop.set()
                return
            if item is not None:
                self._handle(item)
            now = time.monotonic()
            if now >= next_maintenance:
                next_maintenance = now + self.maintenance
                self._refresh()
                self._prune(datetime.now(UTC))
            if self._figures_due and self._queue.empty():
                self._update_figures()

    def _handle(self, item: object) -> None:
        if isinstance(item, WakeEvent):
            self._new_entry(item, "wake", None)
        elif isinstance(item, Segment):
            entry = self._index.get(item.session_id)
            if entry is None:
                log.debug("review archive: segment %s has no archived wake", item.session_id)
                return
            self._attach(entry, item.samples, item.start_sample, item.sample_rate,
                         {"preRoll": round(item.pre_roll, 3), "segmentReason": item.reason})
        elif isinstance(item, _Clip):
            if item.near_miss:
                self._new_entry(item.event, "near_miss", item)
            else:
                entry = self._index.get(item.event.session_id)
                if entry is not None:
                    self._attach(entry, item.samples, item.start_sample, item.sample_rate, {})
        elif isinstance(item, _Mark):
            self._mark(item.feedback, item.source)

    def _sidecar(self, event: WakeEvent, kind: Kind) -> dict[str, Any]:
        data = dict(event.to_dict())
        data.update(kind=kind, audio=None, verdict=None, kwsdVersion=__version__, modelVersion=self.model_version)
        return data

    def _new_entry(self, event: WakeEvent, kind: Kind, clip: _Clip | None) -> None:
        folder = self.root / FOLDERS[kind]
        entry = Entry(folder / f"{file_stem(event.timestamp, event.site_id, event.session_id)}.json",
                      self._sidecar(event, kind))
        try:
            ensure_dir(folder)
            if clip is not None:
                self._write_audio(entry, clip.samples, clip.start_sample, clip.sample_rate)
            entry.save()
        except OSError as exc:
            self._failed(entry, folder, exc)
            return
        self.written += 1
        self._add(entry)
        if kind == "near_miss" and self.metrics is not None:
            self.metrics.near_miss(event.site_id, event.wakeword_id)
        self._enforce_bounds()

    def _write_audio(self, entry: Entry, samples: np.ndarray, start_sample: int, rate: int) -> None:
        wav = entry.path.with_suffix(".wav")
        pcm = np.clip(np.rint(np.asarray(samples, dtype=np.float64)), -32768, 32767).astype(np.int16)
        write_file(wav, to_wav(pcm, rate))
        entry.data.update(audio=wav.name, audioStart=round(start_sample / rate, 3),
                          duration=round(len(pcm) / rate, 3), sampleRate=rate)

    def _attach(self, entry: Entry, samples: np.ndarray, start_sample: int, rate: int, extra: dict[str, Any]
                ) -> None:
        with contextlib.suppress(ReviewError):  # keep a verdict written meanwhile by ``kwsd review mark``
            entry.data = read_entry(entry.path).data
        try:
            self._write_audio(entry, samples, start_sample, rate)
            entry.data.update(extra)
            entry.save()
        except OSError as exc:
            self._failed(entry, entry.path.parent, exc, keep_sidecar=True)
            return
        self._touch(entry)
        self._enforce_bounds()

    def _failed(self, entry: Entry, folder: Path, exc: OSError, keep_sidecar: bool = False) -> None:
        """A write failed (disk full, read-only or unwritable folder): log once, count, leave no partial files."""
        with contextlib.suppress(OSError):
            entry.path.with_suffix(".wav").unlink()
        if not keep_sidecar:
            with contextlib.suppress(OSError):
                entry.path.unlink()
            with self._lock:  # feedback on it is answered as unknown
                self._known.pop(entry.session_id, None)
        self._write_error(f"cannot write to {folder}: {exc.strerror or exc}")

    def _write_error(self, message: str) -> None:
        with self._lock:
            self.errors += 1
        if self.metrics is not None:
            self.metrics.review_error("write")
        self._write_errors.error(message, context=f" ({self.errors} not kept so far; detection goes on)")

    def _mark(self, fb: Feedback, source: str) -> None:
        if fb.session_id is None:  # a missed wake reported without a clip
            wakeword = fb.wakeword_id or (self.keywords[0] if self.keywords else "")
            event = WakeEvent(site_id=fb.site_id, wakeword_id=wakeword, keyword=wakeword, score=0.0, threshold=0.0,
                              start=0.0, end=0.0, session_id=uuid.uuid4().hex, device="")
            self._new_entry(event, "report", None)
            entry = self._index.get(event.session_id)
            if entry is None:
                return
        else:
            found = self._index.get(fb.session_id)
            if found is None:
                log.warning("review archive: session %s is gone (removed by the bounds); verdict %s not kept",
                            fb.session_id, fb.verdict)
                return
            entry = found
        try:
            before = entry.verdict if entry.kind != "report" else None
            entry = set_verdict(entry, fb.verdict, source)
        except (OSError, ReviewError) as exc:
            self._write_error(f"cannot record the verdict in {entry.path}: {exc}")
            return
        log.info("review: %s %s on site %s marked %s (%s)", entry.kind.replace("_", " "), entry.session_id,
                 entry.site, fb.verdict, source)
        self._touch(entry)
        self._counted(entry, before)

    def _counted(self, entry: Entry, before: str | None) -> None:
        """Count a verdict that changed, in the verdict counters."""
        verdict = entry.verdict
        if verdict is None or verdict == before or self.metrics is None:
            return
        if entry.kind == "near_miss":
            if verdict == "false_wake":
                return  # a candidate rightly rejected
            verdict = "missed"
        self.metrics.verdict(entry.site, entry.wakeword_id, verdict)
        self._figures_due = True

    # -- index, bounds ------------------------------------------------------------------------------------------

    def _bucket(self, kind: Kind) -> str:
        return "near_miss" if kind == "near_miss" else "wake"

    def _add(self, entry: Entry) -> None:
        sid = entry.session_id
        self._index[sid] = entry
        self._ages[self._bucket(entry.kind)][sid] = entry.size()
        with contextlib.suppress(OSError):
            self._mtimes[sid] = entry.path.stat().st_mtime_ns
        with self._lock:
            self._known[sid] = (entry.kind, entry.site)
        self._figures_due = True

    def _touch(self, entry: Entry) -> None:
        sid = entry.session_id
        self._index[sid] = entry
        bucket = self._ages[self._bucket(entry.kind)]
        if sid in bucket:
            bucket[sid] = entry.size()
        with contextlib.suppress(OSError):
            self._mtimes[sid] = entry.path.stat().st_mtime_ns
        self._figures_due = True

    def _remove(self, sid: str, why: str) -> None:
        entry = self._index.pop(sid, None)
        self._mtimes.pop(sid, None)
        for bucket in self._ages.values():
            bucket.pop(sid, None)
        with self._lock:
            self._known.pop(sid, None)
        if entry is not None:
            with contextlib.suppress(OSError):
                entry.remove()
            self.evicted += 1
            log.debug("review archive: removed %s (%s)", entry.path.name, why)
        self._figures_due = True

    def _enforce_bounds(self) -> None:
        bounds = {"wake": self.settings.max_bytes, "near_miss": self.settings.near_miss_max_bytes}
        for bucket, bound in bounds.items():
            ages = self._ages[bucket]
            total = sum(ages.values())
            while total > bound and ages:
                sid, size = next(iter(ages.items()))
                total -= size
                self._remove(sid, f"over review.{'near_miss_' if bucket == 'near_miss' else ''}max_bytes")
            if self.metrics is not None:
                self.metrics.set_review_bytes(bucket, total)

    def _prune(self, now: datetime) -> None:
        limit = now - timedelta(days=self.settings.max_days)
        for bucket in self._ages.values():
            for sid in list(bucket):
                entry = self._index.get(sid)
                if entry is not None and entry.time < limit:
                    self._remove(sid, "older than review.max_days")

    def _refresh(self) -> None:
        """Take in verdicts written by ``kwsd review mark`` (sidecars whose mtime changed)."""
        for sid, entry in list(self._index.items()):
            try:
                mtime = entry.path.stat().st_mtime_ns
            except FileNotFoundError:
                self._remove(sid, "removed from disk")
                continue
            except OSError:
                continue
            if mtime == self._mtimes.get(sid):
                continue
            try:
                fresh = read_entry(entry.path)
            except ReviewError as exc:
                log.warning("%s", exc)
                continue
            before = entry.verdict
            self._touch(fresh)
            self._counted(fresh, before)

    def _update_figures(self) -> None:
        """The effective wake rate per site and keyword over the window, into the metrics gauges."""
        self._figures_due = False
        since = datetime.now(UTC) - timedelta(days=self.settings.window_days)
        per_site = figures(self._index.values(), since)
        total = Figures()
        rated: set[tuple[str, str]] = set()
        for (site, keyword, _day), fig in per_site.items():
            for name in ("wakes", "false_wakes", "confirmed_wakes", "missed_wakes", "near_misses"):
                setattr(total, name, getattr(total, name) + getattr(fig, name))
            rate = fig.effective_wake_rate
            if rate is not None and self.metrics is not None:
                self.metrics.set_effective_wake_rate(site, keyword, rate)
                rated.add((site, keyword))
        if self.metrics is not None:
            for site, keyword in self._rated - rated:  # out of the window, or evicted
                self.metrics.set_effective_wake_rate(site, keyword, None)
        self._rated = rated
        self._summary = total

    def summary(self) -> Figures:
        """All sites' figures over ``review.window_days``, as of the archive thread's last change (any thread)."""
        return self._summary


def model_version(source: str, digest: str) -> str:
    """``<source>@<first 12 hex digits of its digest>``: which weights heard the wake."""
    return f"{source}@{digest[:12]}" if digest else source

