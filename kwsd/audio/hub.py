"""AudioHub: all inputs of the config, each channel a site, read as 16 kHz int16 mono by absolute sample index.

Capture never waits for the detector (rings overwrite the oldest audio and count it) and the detector never waits
for capture (``read`` returns whatever is new, possibly nothing). A failing or stalled input is reopened on its own
thread and never affects the others. The reader says how much audio it wants next (``wait``'s targets), so it is
woken once per detector step rather than once per capture block.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from kwsd.audio.capture import RATE, InputStatus, InputWorker
from kwsd.settings import InputSettings

log = logging.getLogger(__name__)

__all__ = ["RATE", "AudioHub", "InputStatus"]


def _check_sites(inputs: Sequence[InputSettings]) -> None:
    owner: dict[str, int] = {}
    for i, inp in enumerate(inputs):
        for site in inp.site_map().values():
            if site in owner:
                raise ValueError(
                    f"inputs[{i}].sites: siteId {site!r} is already used by inputs[{owner[site]}] "
                    f"({inputs[owner[site]].label})"
                )
            owner[site] = i


class AudioHub:
    """Owns every input; ``sites()`` lists the streams the detector reads."""

    def __init__(self, inputs: Sequence[InputSettings], stop: threading.Event) -> None:
        _check_sites(inputs)
        self._stop = stop
        self._cond = threading.Condition()
        self._lock = threading.Lock()  # the worker list (update vs. readers)
        self._workers: list[InputWorker] = [self._make(s) for s in inputs]
        self._by_site: dict[str, InputWorker] = self._index()
        self._started = False
        self._watcher: threading.Thread | None = None
        self._watcher_stop = threading.Event()
        self._targets: dict[str, int] = {}  # site -> absolute index the reader waits for (under _cond)
        self._woken = False  # wake() was called since the last wait (under _cond)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def _make(self, settings: InputSettings) -> InputWorker:
        return InputWorker(settings, self._stop, self._notify)

    def _index(self) -> dict[str, InputWorker]:
        return {site: w for w in self._workers for site in w.rings}

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
        if self._watcher is not None:
            self._watcher.join(timeout=2.0)
        self._notify()

    def _ensure_watcher(self) -> None:
        if self._watcher is not None and self._watcher.is_alive():
            return
        if not any(w.kind == "pulse" for w in self._workers):
            return
        from kwsd.audio.pulse import SourceWatcher

        self._watcher_stop = threading.Event()
        watcher = SourceWatcher(self._sources_changed, self._watcher_stop)
        self._watcher = watcher
        stop_all = self._stop

        def relay() -> None:  # the watcher also ends when the daemon stops
            stop_all.wait()
            self._watcher_stop.set()

        threading.Thread(target=relay, name="kwsd-pulse-watch-stop", daemon=True).start()
        watcher.start()

    def _sources_changed(self, present: set[str]) -> None:
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            w.source_changed(present)

    def update(self, inputs: Sequence[InputSettings]) -> None:
        """Apply a new list of inputs: unchanged ones keep capturing (and their sites' indices), removed ones
        stop, new ones start."""
        _check_sites(inputs)
        with self._lock:
            old = list(self._workers)
            keep: list[InputWorker] = []
            new: list[InputWorker] = []
            for settings in inputs:
                match = next((w for w in old if w.settings == settings and w not in keep), None)
                if match is not None:
                    keep.append(match)
                else:
                    new.append(self._make(settings))
            gone = [w for w in old if w not in keep]
            self._workers = [*keep, *new]
            self._by_site = self._index()
        for w in gone:
            log.info("input %s removed", w.status.name)
            w.halt()
        for w in gone:
            w.join(timeout=3.0)
        if self._started:
            for w in new:
                log.info("input %s added", w.settings.label)
                w.start()
            self._ensure_watcher()

    # ---- reading -----------------------------------------------------------------------------------------
    def sites(self) -> list[str]:
        """Site ids in config order (input order, then channel order)."""
        return list(self._by_site)

    def read(self, site: str) -> tuple[np.ndarray, int]:
        """New 16 kHz int16 mono samples of ``site`` since the last read, and the absolute index of the first.

        Never blocks. If the reader fell more than ``buffer_seconds`` behind, the oldest samples are skipped (the
        index says where the data really starts) and counted as overruns.
        """
        worker = self._by_site.get(site)
        if worker is None:
            raise KeyError(f"unknown site {site!r} (sites: {', '.join(self._by_site) or 'none'})")
        return worker.read(site)

    def history(self, site: str, start: int, frames: int) -> tuple[np.ndarray, int]:
        """Up to ``frames`` 16 kHz samples of ``site`` from absolute index ``start`` (still in the ring), without
        moving the read cursor; for cutting pre-roll and follow-up segments."""
        worker = self._by_site[site]
        data, actual = worker.rings[site].read(start, frames)
        return data[:, 0], actual

    def end(self, site: str) -> int:
        """Absolute 16 kHz index after the newest sample of ``site``."""
        return self._by_site[site].rings[site].end

    def reopens(self, site: str) -> int:
        """How many times the input of ``site`` has been reopened. The count rises only after the old stream's
        last sample was delivered, so a reader that checks it before ``read`` knows where the new stream starts."""
        return self._by_site[site].status.reopens

    def _notify(self, worker: InputWorker | None = None) -> None:
        """An input delivered audio (or something changed): wake the reader if it has what it waits for."""
        with self._cond:
            if worker is None or self._reached(worker):
                self._cond.notify_all()

    def _reached(self, worker: InputWorker) -> bool:
        for site, ring in worker.rings.items():
            target = self._targets.get(site)
            if ring.end >= (worker.cursors[site] + 1 if target is None else target):
                return True
        return False

    def wake(self) -> None:
        """Make the current or next ``wait`` return at once (other work for the reader: a reload, remote audio)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def wait(self, timeout: float, targets: dict[str, int] | None = None) -> bool:
        """Block until a site has audio up to its target index (``targets``, absolute 16 kHz indices; a site
        without one: any unread audio), until ``wake``, or ``timeout`` seconds / stop. True when woken early."""
        with self._cond:
            self._targets = dict(targets or {})

            def ready() -> bool:
                return self._stop.is_set() or self._woken or any(self._reached(w) for w in self._workers)

            woken = self._cond.wait_for(ready, timeout)
            self._woken = False
            self._targets = {}
            return woken and not self._stop.is_set()

    def status(self) -> dict[str, InputStatus]:
        """Per input (by name): state, rate, channels, overruns, reopens, samples delivered, last error."""
        out: dict[str, InputStatus] = {}
        for w in list(self._workers):
            snap = w.snapshot()
            name = snap.name
            n = 2
            while name in out:
                name = f"{snap.name}#{n}"
                n += 1
            out[name] = snap
        return out
