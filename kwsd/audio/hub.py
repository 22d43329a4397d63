"""AudioHub: all inputs of the config, each channel a site, read as 16 kHz int16 mono by absolute sample index.

Capture never waits for the detector (rings overwrite the oldest audio and count it) and the detector never waits
for capture (``read`` returns whatever is new, possibly nothing). A failing or stalled input is reopened on its own
supervised thread and never affects the others. The reader says how much audio it wants next (``wait``'s
targets), so it is woken once per detector step rather than once per capture block.

Remote sites (MQTT satellites, Wyoming clients) are inputs of the hub too: ``remote(site, origin)`` returns a
``RemoteInput`` whose ``write(samples, rate)`` resamples to 16 kHz into a ring of its own, bounded in bytes, with
overruns counted like a local input's. A site that sends faster than ``max_speed`` times real time loses the
excess (counted), so a flood on one site cannot starve the others; at most ``max_sites`` remote sites exist at once,
and one that stays silent for ``idle_timeout`` seconds is dropped (``on_sites_changed`` tells the owner, which
withdraws its discovery).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kwsd.audio.capture import RATE, InputStatus, InputWorker
from kwsd.audio.resample import StreamResampler
from kwsd.audio.ring import Ring, rings_reached
from kwsd.lifecycle import Liveness
from kwsd.settings import InputSettings

log = logging.getLogger(__name__)

__all__ = ["RATE", "REMOTE_RATES", "AudioHub", "InputStatus", "RemoteInput", "RemoteLimits", "RemoteRefused"]

REMOTE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)
"""Sample rates a remote site may send (others would need impractically long resampling filters)."""
MAX_SITE_ID = 64
"""Longest remote siteId, in characters."""
_BAD_SITE_CHARS = frozenset("/+#")


class RemoteRefused(ValueError):
    """A remote site cannot be added (limit reached, bad or clashing siteId); the message says why."""


@dataclass(frozen=True)
class RemoteLimits:
    """Bounds on remote sites, shared by every origin (MQTT satellites, Wyoming clients)."""

    max_sites: int = 16
    """Remote sites at once; a new site beyond this is refused until one is dropped."""
    idle_timeout: float = 30.0
    """Seconds without audio after which a remote site is dropped."""
    buffer_seconds: float = 2.0
    """16 kHz audio held per remote site (its ring: 32 kB per second); also the burst accepted at once."""
    max_speed: float = 2.0
    """Audio accepted per second of wall time, in seconds of audio, beyond the burst; the excess is dropped."""


def check_site_id(site: object) -> str:
    """A remote siteId usable as one MQTT topic level and a metric label; ``RemoteRefused`` naming the problem."""
    if not isinstance(site, str) or not site:
        raise RemoteRefused(f"siteId must be a non-empty string, got {site!r:.80}")
    if len(site) > MAX_SITE_ID:
        raise RemoteRefused(f"siteId {site[:32]!r}... is {len(site)} characters long (at most {MAX_SITE_ID})")
    if any(c in _BAD_SITE_CHARS or not c.isprintable() or c.isspace() for c in site):
        raise RemoteRefused(f"siteId {site!r} contains '/', '+', '#', a space or a control character")
    return site


class RemoteInput:
    """One remote site's audio: any supported rate in, 16 kHz mono int16 out into a bounded ring.

    ``write`` may be called from any one thread at a time (the protocol handler of that site); the hub's reader
    reads the ring by absolute index like a local site's.
    """

    def __init__(self, hub: AudioHub, site: str, origin: str, limits: RemoteLimits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.site = site
        self.origin = origin
        self.device = f"{origin}:{site}"
        self._hub = hub
        self._clock = clock
        self._limits = limits
        self.capacity = max(RATE // 10, int(limits.buffer_seconds * RATE))
        self.ring = Ring(self.capacity, 1, np.int16)
        self.rings = {site: self.ring}
        self.cursors = {site: 0}
        self.status = InputStatus(self.device, self.device, "remote", [site], state="running", rate=0, channels=1)
        self.flood_drops = 0
        """Blocks dropped because the site sent faster than ``max_speed`` times real time."""
        self._lock = threading.Lock()
        self._resampler: StreamResampler | None = None
        self._tokens = float(self.capacity)  # samples that may be accepted now
        self._refilled = clock()
        self.last_write = clock()
        self.closing = False
        """``close()`` was called: no more audio is accepted; the pipeline ends the stream after what is held."""
        self.closed = False
        """Removed from the hub."""
        self._done: Callable[[], None] | None = None

    @property
    def bytes(self) -> int:
        """Memory held by the ring."""
        return self.capacity * 2

    def end(self, site: str) -> int:
        """Absolute 16 kHz index after the newest sample of the site."""
        return self.ring.end

    def reached(self, targets: dict[str, int]) -> bool:
        """Whether the site has audio up to its target (without one: any unread audio)."""
        return rings_reached(self.rings, self.cursors, targets)

    @property
    def backlog(self) -> int:
        """16 kHz samples written and not yet read (a writer that can wait, such as a TCP client's handler, keeps
        this below ``capacity`` instead of overrunning the ring)."""
        return self.ring.end - self.cursors[self.site]

    def write(self, samples: np.ndarray, rate: int) -> bool:
        """Add a block of mono int16 samples at ``rate`` Hz; False when it was dropped (input closed, flood).

        Raises ``ValueError`` for a rate outside ``REMOTE_RATES`` or samples that are not one channel.
        """
        if rate not in REMOTE_RATES:
            raise ValueError(f"remote site {self.site!r}: unsupported sample rate {rate!r} "
                             f"(supported: {', '.join(map(str, REMOTE_RATES))})")
        block = np.asarray(samples)
        if block.ndim != 1:
            raise ValueError(f"remote site {self.site!r}: expected mono samples, got shape {block.shape}")
        if block.dtype != np.int16:
            block = np.clip(np.rint(block.astype(np.float64)), -32768, 32767).astype(np.int16)
        with self._lock:
            if self.closing or self.closed:
                return False
            now = self._clock()
            self.last_write = now
            if block.size == 0:
                return True
            refill = (now - self._refilled) * RATE * self._limits.max_speed
            self._tokens = min(float(self.capacity), self._tokens + refill)
            self._refilled = now
            if self._resampler is None or self._resampler.rate_in != rate:
                self._resampler = StreamResampler(rate, RATE, 1)
                self.status.rate = rate
            needed = block.size * RATE / rate
            if needed > self._tokens:
                self.flood_drops += 1
                self.status.overruns = self.ring.overruns + self.flood_drops
                return False
            self._tokens -= needed
            out = self._resampler.process(block)
            self.ring.write(out)
            self.status.samples += out.shape[0]
        self._hub._notify(self)
        return True

    def read(self, site: str) -> tuple[np.ndarray, int]:
        data, start = self.ring.read(self.cursors[site])
        self.cursors[site] = start + data.shape[0]
        return data[:, 0], start

    def snapshot(self) -> InputStatus:
        st = self.status
        return InputStatus(
            name=st.name, device=st.device, kind=st.kind, sites=list(st.sites),
            state="stopped" if self.closed else "running", rate=st.rate, channels=1,
            overruns=self.ring.overruns + self.flood_drops, reopens=0, samples=st.samples,
            last_error=st.last_error, since=st.since,
        )

    def close(self, done: Callable[[], None] | None = None) -> None:
        """The remote end is gone: no more audio is accepted. The pipeline still decodes what was written (and
        the model's look-ahead after it), hands on the last detections, removes the site and then calls ``done``
        on its own thread. Any thread; closing twice is harmless."""
        with self._lock:
            if self.closing or self.closed:
                call_now = self.closed
            else:
                self.closing, self._done, call_now = True, done, False
        if call_now and done is not None:
            done()
        self._hub.wake()


class AudioHub:
    """Owns every input; ``sites()`` lists the streams the detector reads (local ones first, then remote)."""

    def __init__(
        self,
        inputs: Sequence[InputSettings],
        stop: threading.Event,
        liveness: Liveness | None = None,
        remote_limits: RemoteLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_sites(inputs)
        self._stop = stop
        self.liveness = liveness if liveness is not None else Liveness()
        self.remote_limits = remote_limits or RemoteLimits()
        self._clock = clock
        self._cond = threading.Condition()
        self._lock = threading.RLock()  # the worker and remote lists (update vs. readers)
        self._workers: list[InputWorker] = []
        for s in inputs:
            self._workers.append(self._make(s, self._workers))
        self._remotes: dict[str, RemoteInput] = {}
        self._by_site: dict[str, InputWorker | RemoteInput] = self._index()
        self._started = False
        self._watcher: object | None = None
        self._watcher_stop = threading.Event()
        self._targets: dict[str, int] = {}  # site -> absolute index the reader waits for (under _cond)
        self._woken = False  # wake() was called since the last wait (under _cond)
        self.generation = 0
        """Raised whenever the set of sites changes (reload, a remote site joined or was dropped)."""
        self.refused = 0
        """Remote sites refused (limit, bad siteId)."""
        self.on_sites_changed: Callable[[], None] | None = None
        """Called (on the thread that made the change) after sites were added or removed."""
        self.on_input_state: Callable[[], None] | None = None
        """Called (on the input's thread) after a local input changed state (running, reopening, ...)."""

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def _make(self, settings: InputSettings, others: Sequence[InputWorker]) -> InputWorker:
        taken = {w.part_name for w in others}
        name, n = f"input:{settings.label}", 2
        while name in taken:
            name = f"input:{settings.label}#{n}"
            n += 1
        worker = InputWorker(settings, self._stop, self._notify, self.liveness, name)
        worker.on_state = self._input_state
        return worker

    def _index(self) -> dict[str, InputWorker | RemoteInput]:
        out: dict[str, InputWorker | RemoteInput] = {site: w for w in self._workers for site in w.rings}
        out.update(self._remotes)
        return out

    def _inputs(self) -> list[InputWorker | RemoteInput]:
        return [*self._workers, *self._remotes.values()]

    def start(self) -> None:
        """Start capturing on every input (devices that are missing are retried in the background)."""
        self._started = True
        for w in self._workers:
            w.start()
        self._ensure_watcher()

    def stop(self) -> None:
        """Abort every input and wait for their threads (bounded; streams are aborted, never drained)."""
        self._watcher_stop.set()
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            w.halt()
        for w in workers:
            if w.is_alive():
                w.join(timeout=3.0)
                if w.is_alive():
                    log.error("input %s did not stop within 3 s", w.status.name)
        watcher = self._watcher
        if watcher is not None:
            watcher.join(timeout=2.0)  # type: ignore[attr-defined]
        self._notify()

    def _ensure_watcher(self) -> None:
        watcher = self._watcher
        if watcher is not None and watcher.is_alive():  # type: ignore[attr-defined]
            return
        if not any(w.kind == "pulse" for w in self._workers):
            return
        from kwsd.audio.pulse import SourceWatcher

        self._watcher_stop = threading.Event()
        new = SourceWatcher(self._sources_changed, self._watcher_stop, self.liveness)
        self._watcher = new
        new.start()

    def _sources_changed(self, present: set[str]) -> None:
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            w.source_changed(present)

    def update(self, inputs: Sequence[InputSettings]) -> None:
        """Apply a new list of inputs: unchanged ones keep capturing (and their sites' indices), removed ones
        stop, new ones start. A list whose siteIds clash (also with a remote site) raises ``ValueError`` and
        changes nothing."""
        check_sites(inputs)
        with self._lock:
            remote = set(self._remotes)
            for inp in inputs:
                for site in inp.site_map().values():
                    if site in remote:
                        raise ValueError(f"siteId {site!r} of input {inp.label} is in use by a remote site")
            old = list(self._workers)
            keep: list[InputWorker] = []
            new: list[InputWorker] = []
            for settings in inputs:
                match = next((w for w in old if w.settings == settings and w not in keep), None)
                if match is not None:
                    keep.append(match)
                else:
                    new.append(self._make(settings, [*old, *new]))
            gone = [w for w in old if w not in keep]
            self._workers = [*keep, *new]
            self._by_site = self._index()
            self.generation += 1
        for w in gone:
            log.info("input %s removed", w.status.name)
            w.halt()
        for w in gone:
            w.join(timeout=3.0)
            self.liveness.forget(w.part_name)
        if self._started:
            for w in new:
                log.info("input %s added", w.settings.label)
                w.start()
            self._ensure_watcher()
        self._sites_changed()

    # ---- remote sites ------------------------------------------------------------------------------------
    def remote(self, site: str, origin: str) -> RemoteInput:
        """The remote input of ``site`` (created on first use); ``RemoteRefused`` when the siteId is bad, taken
        by a local input or another origin, or ``max_sites`` remote sites exist already."""
        existing = self._remotes.get(site) if isinstance(site, str) else None
        if existing is not None and existing.origin == origin and not existing.closing:
            return existing
        with self._lock:
            try:
                check_site_id(site)
            except RemoteRefused:
                self.refused += 1
                raise
            existing = self._remotes.get(site)
            if existing is not None:
                if existing.origin != origin:
                    self.refused += 1
                    raise RemoteRefused(f"siteId {site!r} is already used by {existing.origin}")
                if existing.closing:
                    raise RemoteRefused(f"siteId {site!r} is closing; its stream is being finished")
                return existing
            try:
                if site in self._by_site:
                    raise RemoteRefused(f"siteId {site!r} is a local input's site")
                if len(self._remotes) >= self.remote_limits.max_sites:
                    raise RemoteRefused(f"siteId {site!r} refused: {len(self._remotes)} remote sites already "
                                        f"(the limit, max_sites)")
            except RemoteRefused:
                self.refused += 1
                raise
            remote = RemoteInput(self, site, origin, self.remote_limits, self._clock)
            self._remotes[site] = remote
            self._by_site = self._index()
            self.generation += 1
        log.info("site %s: remote %s joined", site, origin)
        self._sites_changed()
        return remote

    def remote_sites(self) -> list[str]:
        return list(self._remotes)

    def is_remote(self, site: str) -> bool:
        return site in self._remotes

    def closing_sites(self) -> list[str]:
        """Remote sites whose input was closed and whose stream the reader must finish."""
        return [site for site, r in list(self._remotes.items()) if r.closing]

    def finish_remote(self, site: str) -> Callable[[], None] | None:
        """The reader finished a closing remote site: remove it; returns the callback its ``close`` was given."""
        remote = self._remotes.get(site)
        if remote is None:
            return None
        self._remove_remote(remote, "stream ended")
        return remote._done

    def expire_idle(self) -> list[str]:
        """Drop remote sites silent for longer than ``idle_timeout``; returns their siteIds."""
        now = self._clock()
        limit = self.remote_limits.idle_timeout
        idle = [r for r in list(self._remotes.values()) if now - r.last_write > limit and not r.closing]
        for r in idle:
            self._remove_remote(r, f"no audio for {now - r.last_write:.0f} s")
        return [r.site for r in idle]

    def _remove_remote(self, remote: RemoteInput, why: str) -> None:
        with self._lock:
            if self._remotes.get(remote.site) is not remote:
                return
            with remote._lock:
                remote.closed = True
            del self._remotes[remote.site]
            self._by_site = self._index()
            self.generation += 1
        log.info("site %s: remote %s dropped (%s)", remote.site, remote.origin, why)
        self._sites_changed()

    def _input_state(self) -> None:
        callback = self.on_input_state
        if callback is not None:
            callback()

    def _sites_changed(self) -> None:
        callback = self.on_sites_changed
        if callback is not None:
            try:
                callback()
            except Exception as exc:  # the owner's problem must not break the hub
                log.error("handling a change of sites failed: %s", exc)
        self.wake()

    # ---- reading -----------------------------------------------------------------------------------------
    def sites(self) -> list[str]:
        """Site ids in config order (input order, then channel order), then remote sites as they joined."""
        return list(self._by_site)

    def device(self, site: str) -> str:
        """What ``site`` listens to: the input's device, or ``<origin>:<siteId>`` for a remote site."""
        src = self._by_site[site]
        return src.device if isinstance(src, RemoteInput) else src.settings.device

    def read(self, site: str) -> tuple[np.ndarray, int]:
        """New 16 kHz int16 mono samples of ``site`` since the last read, and the absolute index of the first.

        Never blocks. If the reader fell more than ``buffer_seconds`` behind, the oldest samples are skipped (the
        index says where the data really starts) and counted as overruns.
        """
        src = self._by_site.get(site)
        if src is None:
            raise KeyError(f"unknown site {site!r} (sites: {', '.join(self._by_site) or 'none'})")
        return src.read(site)

    def history(self, site: str, start: int, frames: int) -> tuple[np.ndarray, int]:
        """Up to ``frames`` 16 kHz samples of ``site`` from absolute index ``start`` (still in the ring), without
        moving the read cursor; for cutting pre-roll and follow-up segments."""
        data, actual = self._by_site[site].rings[site].read(start, frames)
        return data[:, 0], actual

    def end(self, site: str) -> int:
        """Absolute 16 kHz index after the newest sample of ``site``."""
        return self._by_site[site].end(site)

    def reopens(self, site: str) -> int:
        """How many times the input of ``site`` has been reopened. The count rises only after the old stream's
        last sample was delivered, so a reader that checks it before ``read`` knows where the new stream starts."""
        return self._by_site[site].status.reopens

    def _notify(self, worker: InputWorker | RemoteInput | None = None) -> None:
        """An input delivered audio (or something changed): wake the reader if it has what it waits for."""
        with self._cond:
            if worker is None or worker.reached(self._targets):
                self._cond.notify_all()

    def wake(self) -> None:
        """Make the current or next ``wait`` return at once (other work for the reader: a reload, new sites)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def wait(self, timeout: float, targets: dict[str, int] | None = None) -> bool:
        """Block until a site has audio up to its target index (``targets``, absolute 16 kHz indices; a site
        without one: any unread audio), until ``wake``, or ``timeout`` seconds / stop. True when woken early."""
        with self._cond:
            self._targets = dict(targets or {})
            for w in self._workers:  # each input wakes its own thread only once its sites have that much
                w.want({site: self._targets[site] for site in w.rings if site in self._targets})

            def ready() -> bool:
                return self._stop.is_set() or self._woken or any(w.reached(self._targets) for w in self._inputs())

            woken = self._cond.wait_for(ready, timeout)
            self._woken = False
            self._targets = {}
            return woken and not self._stop.is_set()

    def status(self, remote: bool = False) -> dict[str, InputStatus]:
        """Per input (by name): state, rate, channels, overruns, reopens, samples delivered, last error; remote
        sites too with ``remote=True``."""
        out: dict[str, InputStatus] = {}
        sources: list[InputWorker | RemoteInput] = [*self._workers, *(self._remotes.values() if remote else ())]
        for w in sources:
            snap = w.snapshot()
            name = snap.name
            n = 2
            while name in out:
                name = f"{snap.name}#{n}"
                n += 1
            out[name] = snap
        return out

    def site_inputs(self) -> dict[str, InputStatus]:
        """Per local site, the status of the input it belongs to."""
        return {site: snap for snap in self.status().values() for site in snap.sites}


def check_sites(inputs: Sequence[InputSettings]) -> None:
    """``ValueError`` naming both inputs when two of them claim the same siteId."""
    owner: dict[str, int] = {}
    for i, inp in enumerate(inputs):
        for site in inp.site_map().values():
            if site in owner:
                raise ValueError(
                    f"inputs[{i}].sites: siteId {site!r} is already used by inputs[{owner[site]}] "
                    f"({inputs[owner[site]].label})"
                )
            owner[site] = i
