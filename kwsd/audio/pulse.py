"""PulseAudio sources by name (pulsectl): listing with rate and channels, and a watcher for plug/unplug
events."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pulsectl
from pulsectl import _pulsectl as _c

from kwsd.lifecycle import WAITING, Backoff, Liveness, Part, supervise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PulseSource:
    name: str
    description: str
    rate: int
    channels: int
    monitor: bool


class _SourceInfo(pulsectl.PulseSourceInfo):
    """pulsectl keeps ``sample_spec`` as a view into freed memory; copy rate and channels while it is
    valid."""

    def __init__(self, struct: Any) -> None:
        self.rate = int(struct.sample_spec.rate)
        self.nchannels = int(struct.sample_spec.channels)
        super().__init__(struct)


class _Pulse(pulsectl.Pulse):
    source_list_spec = pulsectl.Pulse._pulse_get_list(
        _c.PA_SOURCE_INFO_CB_T, _c.pa.context_get_source_info_list, _SourceInfo
    )


def connect(client: str = "kwsd") -> pulsectl.Pulse:
    """A pulsectl connection (to ``PULSE_SERVER`` or the user's server); raises ``PulseError`` naming the
    problem."""
    try:
        return _Pulse(client)
    except pulsectl.PulseError as exc:
        raise PulseError(f"cannot connect to the PulseAudio server: {exc}") from exc


class PulseError(RuntimeError):
    """The PulseAudio server cannot be reached."""


def list_sources(pulse: Any | None = None) -> list[PulseSource]:
    """Capture sources of the PulseAudio server, monitors of outputs included (flagged)."""
    own = pulse is None
    p = connect("kwsd-list") if pulse is None else pulse
    try:
        return [
            PulseSource(s.name, s.description, s.rate, s.nchannels, s.monitor_of_sink != 0xFFFFFFFF)
            for s in p.source_list_spec()
        ]
    finally:
        if own:
            p.close()


def find_source(name: str) -> PulseSource:
    """The source called ``name``; ``LookupError`` naming it (and what exists) if the server has no such
    source."""
    sources = list_sources()
    for s in sources:
        if s.name == name:
            return s
    known = ", ".join(s.name for s in sources) or "none"
    raise LookupError(f"PulseAudio source {name!r} not found (sources now: {known})")


class SourceWatcher:
    """Calls ``on_change(names)`` with the set of source names now present whenever sources come or go.

    Runs on a supervised thread (``lifecycle.supervise``, part ``pulse-watch``): it beats while connected and
    waits on schedule, with backoff, while the server is unreachable; ``stop`` ends it within about half a
    second.
    """

    PART = "pulse-watch"

    def __init__(self, on_change: Callable[[set[str]], None], stop: threading.Event,
                 liveness: Liveness | None = None) -> None:
        self._on_change = on_change
        self._stop_event = stop
        self.liveness = liveness if liveness is not None else Liveness()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = supervise(self.PART, self._body, stop=self._stop_event, liveness=self.liveness,
                                     beat_within=10.0, logger=log)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _body(self, part: Part) -> None:
        backoff = Backoff(0.5, 10.0)
        connected_once = False
        while not part.stopping:
            try:
                with _Pulse("kwsd-watch") as pulse:
                    if connected_once:
                        log.info("PulseAudio server reachable again")
                    connected_once = True
                    backoff.reset()
                    self._watch(pulse, part)
            except (pulsectl.PulseError, pulsectl.PulseDisconnected) as exc:
                if part.stopping:
                    break
                log.debug("PulseAudio watcher: %s", exc)
                if connected_once:
                    log.warning("lost the PulseAudio server (%s); retrying", exc)
                    connected_once = False
                delay = backoff.next()
                part.beat(delay + 10.0, WAITING, f"waiting for the PulseAudio server: {exc}")
                part.wait(delay)

    def _watch(self, pulse: Any, part: Part) -> None:
        changed = [True]

        def on_event(ev: Any) -> None:
            changed[0] = True
            raise pulsectl.PulseLoopStop

        pulse.event_mask_set("source", "server")
        pulse.event_callback_set(on_event)
        while not part.stopping:
            part.beat()
            if changed[0]:
                changed[0] = False
                names = {s.name for s in pulse.source_list_spec()}
                self._on_change(names)
            pulse.event_listen(timeout=0.25)
