"""sd_notify(3) for the service manager: READY, RELOADING, STOPPING, STATUS, and a watchdog fed by liveness.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so the same code runs from a terminal. The
protocol is one datagram of newline-separated ``KEY=value`` fields on an AF_UNIX socket, sent here directly:
the sdnotify package encodes messages as Latin-1 (a ``STATUS=`` naming the keyword 小云小云 raises
and is swallowed), reads only ``os.environ`` and ignores ``WATCHDOG_USEC``. This module sends UTF-8, takes the
environment as a parameter, logs a failed send once, and works out the watchdog interval itself.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from kwsd.lifecycle import Liveness

log = logging.getLogger(__name__)


def _socket_address(value: str) -> str:
    """``NOTIFY_SOCKET`` as a socket address: ``@name`` is a Linux abstract socket."""
    return "\0" + value[1:] if value.startswith("@") else value


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between pings: half of ``WATCHDOG_USEC`` (sd_watchdog_enabled(3)); None without a watchdog."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer number of microseconds", usec)
        return None
    if value <= 0:
        log.warning("ignoring WATCHDOG_USEC=%r: not a positive number of microseconds", usec)
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            meant_for_us = int(pid) == os.getpid()
        except ValueError:
            log.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a process id", pid)
            return None
        if not meant_for_us:
            # The variables were inherited from a parent that has a watchdog; it is not ours to feed.
            return None
    return value / 2e6


class Notifier:
    """Sends service state to systemd; does nothing when not started by systemd with a notify socket."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        address = env.get("NOTIFY_SOCKET", "")
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False
        self.watchdog_interval: float | None = None
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), None when systemd expects none."""
        if address:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(_socket_address(address))
            except OSError as exc:
                sock.close()
                log.warning("cannot reach the systemd notify socket NOTIFY_SOCKET=%s: %s", address, exc)
            else:
                # The receiving queue is short (net.unix.max_dgram_qlen): never let a busy manager block the
                # main loop for long; a send that times out is logged like any other failure.
                sock.settimeout(1.0)
                self._socket = sock
                self.watchdog_interval = _watchdog_interval(env)
        self.address = address
        """The notify socket (``NOTIFY_SOCKET``), empty outside systemd."""

    @property
    def enabled(self) -> bool:
        """True when started by systemd with a reachable notify socket."""
        return self._socket is not None

    def notify(self, *fields: str) -> None:
        """Send ``KEY=value`` fields as one datagram; a failure is logged once, never raised."""
        if self._socket is None:
            return
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            with self._lock:
                if self._socket is None:
                    return
                self._socket.send(message)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("systemd notify socket %s refused %r: %s", self.address, fields[0], exc)
        else:
            if self._failed:
                self._failed = False
                log.info("systemd notify socket %s accepts messages again", self.address)

    def ready(self, status: str | None = None) -> None:
        """Start-up (or a reload) finished: the service is working."""
        self.notify("READY=1", *_status_field(status))

    def reloading(self, status: str | None = None) -> None:
        """A reload began; follow with ``ready()`` when it is done.

        ``MONOTONIC_USEC`` lets systemd ≥253 match this message to the reload it asked for
        (Type=notify-reload); older managers and Type=notify ignore the extra field.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status_field(status))

    def stopping(self, status: str | None = None) -> None:
        """Shutdown began."""
        self.notify("STOPPING=1", *_status_field(status))

    def status(self, text: str) -> None:
        """One line shown by ``systemctl status``."""
        self.notify(*_status_field(text))

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more time for the start-up, reload or shutdown under way (e.g. a slow model warm-up)."""
        self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> None:
        """Tell systemd the service is alive; call it only when every part is (see ``Watchdog``)."""
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Release the socket; later calls are no-ops."""
        with self._lock:
            sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()


def _status_field(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # One message carries newline-separated fields: a newline inside the text would start a bogus field.
    return ("STATUS=" + " ".join(text.splitlines()),)


class Watchdog:
    """Feeds the systemd watchdog only while every part is alive and in a known state.

    Parts (inputs, the PulseAudio watcher, the pipeline, the MQTT connection) beat into a ``Liveness`` registry,
    each promising its next beat: a running part within its own bound, a part waiting for its device by its next
    attempt. The main loop calls ``poll()`` often (at least every ``interval``); a ping is sent when one is due
    and ``Liveness.overdue()`` is empty. A part that is stuck, or failed and gave up, stops the pings, and systemd
    restarts the service after ``WatchdogSec=``; a microphone that is merely unplugged does not.
    """

    def __init__(
        self,
        notifier: Notifier,
        liveness: Liveness,
        *,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._notifier = notifier
        self.liveness = liveness
        self.interval = interval if interval is not None else notifier.watchdog_interval
        """Seconds between pings; None disables pinging (no watchdog configured)."""
        self._clock = clock
        self._last_ping = clock()
        self._late: tuple[str, ...] = ()
        self.pings = 0

    def late(self) -> tuple[str, ...]:
        """Parts whose promised beat is overdue (what withholds the ping)."""
        return self.liveness.overdue()

    def poll(self) -> bool:
        """Ping systemd if a ping is due and no part is overdue; return whether it pinged."""
        if self.interval is None:
            return False
        now = self._clock()
        if now - self._last_ping < self.interval:
            return False
        late = self.late()
        if late:
            if late != self._late:
                self._late = late
                parts = self.liveness.parts()
                described = ", ".join(
                    f"{name} ({parts[name].state}{': ' + parts[name].detail if parts[name].detail else ''})"
                    if name in parts else name
                    for name in late
                )
                log.warning("withholding the watchdog ping: %s overdue", described)
            return False
        if self._late:
            log.info("%s alive again after %.1f s without a watchdog ping", ", ".join(self._late),
                     now - self._last_ping)
            self._late = ()
        self._last_ping = now
        self.pings += 1
        self._notifier.watchdog()
        return True
