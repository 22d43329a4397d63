"""The one backoff, the one supervised-loop helper and the liveness registry every long-running part runs on.

A part (an input worker, the PulseAudio watcher, the MQTT connection, the pipeline) is a body function run by
``supervise()`` on its own thread. The body does its work and calls ``part.beat(within=...)`` to say "I am alive and
will beat again within this many seconds" (a part waiting for its device on schedule beats with the time to its next
attempt). An exception in the body is logged once per distinct error, the part is marked failed, waits out a backoff
and runs again. ``Liveness.overdue()`` names the parts whose promised beat is late: the watchdog pings systemd only
while it is empty, so a dead or stuck thread never hides behind a healthy status.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

RUNNING = "running"
WAITING = "waiting"
FAILED = "failed"
STOPPED = "stopped"


class Finished(Exception):
    """Raised by a body whose work is done for good (a replayed file ended): the part stops, no restart."""


class Backoff:
    """Doubling delays from ``first`` to ``longest`` seconds; ``reset()`` after a success."""

    def __init__(self, first: float = 0.5, longest: float = 30.0, factor: float = 2.0) -> None:
        if not (0 < first <= longest) or factor < 1:
            raise ValueError(f"bad backoff: first={first}, longest={longest}, factor={factor}")
        self.first = first
        self.longest = longest
        self.factor = factor
        self._next = first
        self.failures = 0
        """Consecutive failures since the last ``reset()``."""

    def next(self) -> float:
        """The delay before the next attempt; each call lengthens the following one."""
        delay = self._next
        self._next = min(self._next * self.factor, self.longest)
        self.failures += 1
        return delay

    def peek(self) -> float:
        """The delay ``next()`` would return, without counting a failure."""
        return self._next

    def reset(self) -> None:
        self._next = self.first
        self.failures = 0


@dataclass(frozen=True)
class PartStatus:
    """One part as the registry last heard of it."""

    name: str
    state: str
    """``running``, ``waiting`` (for a device or a broker, on schedule), ``failed`` or ``stopped``."""
    detail: str
    last_beat: float
    """Monotonic time of the last beat."""
    due: float
    """Monotonic time by which the next beat is promised; ``inf`` for a stopped part."""
    restarts: int
    last_error: str


class Liveness:
    """What every part last said about itself, and which of them are late."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._parts: dict[str, PartStatus] = {}

    def beat(self, name: str, within: float, state: str = RUNNING, detail: str = "") -> None:
        """Record that ``name`` is alive in ``state`` and promises its next beat within ``within`` seconds."""
        now = self._clock()
        with self._lock:
            old = self._parts.get(name)
            self._parts[name] = PartStatus(
                name=name,
                state=state,
                detail=detail,
                last_beat=now,
                due=now + within,
                restarts=old.restarts if old else 0,
                last_error=old.last_error if old else "",
            )

    def failed(self, name: str, error: str, retry_in: float | None) -> None:
        """Record a failure; ``retry_in`` is the promised restart (None: no promise, the part counts as late)."""
        now = self._clock()
        with self._lock:
            old = self._parts.get(name)
            self._parts[name] = PartStatus(
                name=name,
                state=FAILED,
                detail=error,
                last_beat=old.last_beat if old else now,
                due=now + retry_in if retry_in is not None else now,
                restarts=(old.restarts if old else 0) + 1,
                last_error=error,
            )

    def stopped(self, name: str) -> None:
        """The part ended on request: it is no longer expected to beat."""
        now = self._clock()
        with self._lock:
            old = self._parts.get(name)
            self._parts[name] = PartStatus(
                name=name,
                state=STOPPED,
                detail="",
                last_beat=old.last_beat if old else now,
                due=float("inf"),
                restarts=old.restarts if old else 0,
                last_error=old.last_error if old else "",
            )

    def forget(self, name: str) -> None:
        """Remove a part that no longer exists (a reload dropped it)."""
        with self._lock:
            self._parts.pop(name, None)

    def get(self, name: str) -> PartStatus | None:
        with self._lock:
            return self._parts.get(name)

    def parts(self) -> dict[str, PartStatus]:
        """A snapshot of every registered part."""
        with self._lock:
            return dict(self._parts)

    def overdue(self) -> tuple[str, ...]:
        """Parts whose promised beat is late, or that failed without a scheduled restart."""
        now = self._clock()
        with self._lock:
            return tuple(sorted(name for name, part in self._parts.items() if part.due <= now))


class ErrorOnce:
    """Logs each distinct error once at ERROR, repeats at DEBUG, and the recovery once at INFO."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._log = logger
        self._what = what
        self._last: str | None = None
        self.repeats = 0

    def error(self, message: str, exc: BaseException | None = None, context: str = "") -> None:
        """Log ``message`` (plus ``context``, e.g. when the retry comes) unless it equals the last one."""
        if message != self._last:
            self._log.error("%s: %s%s", self._what, message, context)
            self._last = message
            self.repeats = 0
        else:
            self.repeats += 1
            self._log.debug("%s: %s%s (again, %d times)", self._what, message, context, self.repeats)
        if exc is not None:
            # Developers get the stack with --verbose; the journal at the default level gets one line.
            self._log.debug("%s: details", self._what, exc_info=exc)

    def recovered(self, message: str) -> None:
        if self._last is not None:
            self._log.info("%s: %s", self._what, message)
            self._last = None
            self.repeats = 0


def describe(exc: BaseException) -> str:
    """One line for an exception: its type and message, never a traceback."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Part:
    """What a supervised body sees: its name, the stop event, and beats into the registry."""

    def __init__(self, name: str, stop: threading.Event, liveness: Liveness, beat_within: float) -> None:
        self.name = name
        self.stop = stop
        self.liveness = liveness
        self.beat_within = beat_within

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()

    def beat(self, within: float | None = None, state: str = RUNNING, detail: str = "") -> None:
        """Alive in ``state``; the next beat comes within ``within`` seconds (default: the part's own bound)."""
        self.liveness.beat(self.name, self.beat_within if within is None else within, state, detail)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the daemon is stopping."""
        return self.stop.wait(seconds)


_PR_SET_NAME = 15


def release_freed_memory() -> None:
    """Hand memory freed after a burst of work (the config check parses the whole model file, the model is loaded
    and warmed up) back to the system, so the resident size is what the daemon keeps using. Best effort: only where
    the C library has ``malloc_trim`` (glibc).

    What is left is the daemon's long-lived state (modules, settings, the model, every stream's decoders): it is
    frozen out of the garbage collector's reach, so a full collection in the audio path scans only what was made
    since (at 512 streams: 5 ms instead of 26). Each call first unfreezes, so what a reload left behind is
    collected, never kept for good.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the kernel too (``top -H``, ``/proc/<pid>/task/*/comm``; the kernel
    keeps the first 15 bytes). Best effort: nothing happens where the call is not available."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode("utf-8", "replace")[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def run_supervised(
    name: str,
    body: Callable[[Part], None],
    *,
    stop: threading.Event,
    liveness: Liveness,
    backoff: Backoff | None = None,
    beat_within: float = 10.0,
    give_up_after: int = 5,
    logger: logging.Logger | None = None,
) -> None:
    """Run ``body`` until ``stop`` is set, restarting it with backoff whenever it raises or returns early
    (a body that raises ``Finished`` is done for good).

    After ``give_up_after`` consecutive failures the part keeps retrying but promises no beat, so
    ``Liveness.overdue()`` names it and the watchdog lets systemd restart the whole service. A body that ran
    for longer than the longest backoff before failing counts as a fresh start.
    """
    name_os_thread(threading.current_thread().name)
    backoff = backoff or Backoff()
    errors = ErrorOnce(logger or log, name)
    part = Part(name, stop, liveness, beat_within)
    part.beat()
    while not stop.is_set():
        started = time.monotonic()
        try:
            body(part)
        except Finished:
            break
        except Exception as exc:  # the supervisor's whole point
            message = describe(exc)
            error: BaseException | None = exc
        else:
            if stop.is_set():
                break
            message = "ended unexpectedly"
            error = None
        if time.monotonic() - started > backoff.longest:
            backoff.reset()
        delay = backoff.next()
        promise = delay + beat_within if backoff.failures < give_up_after else None
        liveness.failed(name, message, promise)
        errors.error(message, error, f" (restart {backoff.failures} in {delay:.1f} s)")
        if stop.wait(delay):
            break
    liveness.stopped(name)


def supervise(
    name: str,
    body: Callable[[Part], None],
    *,
    stop: threading.Event,
    liveness: Liveness,
    backoff: Backoff | None = None,
    beat_within: float = 10.0,
    give_up_after: int = 5,
    logger: logging.Logger | None = None,
) -> threading.Thread:
    """Start ``run_supervised`` on a daemon thread named ``kwsd-<name>`` and return the thread."""
    thread = threading.Thread(
        target=run_supervised,
        name=f"kwsd-{name}",
        args=(name, body),
        kwargs={
            "stop": stop,
            "liveness": liveness,
            "backoff": backoff,
            "beat_within": beat_within,
            "give_up_after": give_up_after,
            "logger": logger,
        },
        daemon=True,
    )
    thread.start()
    return thread
