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


class SourceWatcher(threading.Thread):
    """Calls ``on_change(names)`` with the set of source names now present whenever sources come or go.

    Reconnects to the server with backoff if it goes away; ``stop`` ends it within about half a second.
    """

    def __init__(self, on_change: Callable[[set[str]], None], stop: threading.Event) -> None:
        super().__init__(name="kwsd-pulse-watch", daemon=True)
        self._on_change = on_change
        self._stop_event = stop
        self._halt = threading.Event()

    def halt(self) -> None:
        self._halt.set()

    def _stopping(self) -> bool:
        return self._halt.is_set() or self._stop_event.is_set()

    def run(self) -> None:
        backoff = 0.5
        connected_once = False
        while not self._stopping():
            try:
                with _Pulse("kwsd-watch") as pulse:
                    if connected_once:
                        log.info("PulseAudio server reachable again")
                    connected_once = True
                    backoff = 0.5
                    self._watch(pulse)
            except pulsectl.PulseError as exc:
                log.debug("PulseAudio watcher: %s", exc)
                if connected_once:
                    log.warning("lost the PulseAudio server (%s); retrying", exc)
                    connected_once = False
                self._halt.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _watch(self, pulse: Any) -> None:
        changed = [True]

        def on_event(ev: Any) -> None:
            changed[0] = True
            raise pulsectl.PulseLoopStop

        pulse.event_mask_set("source", "server")
        pulse.event_callback_set(on_event)
        while not self._stopping():
            if changed[0]:
                changed[0] = False
                names = {s.name for s in pulse.source_list_spec()}
                self._on_change(names)
            pulse.event_listen(timeout=0.25)
