"""The receiving end of NOTIFY_SOCKET, as systemd binds it: a real AF_UNIX datagram socket in the test's folder."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def parse(datagram: bytes) -> dict[str, str]:
    """One sd_notify message: ``KEY=value`` lines."""
    return dict(line.split("=", 1) for line in datagram.decode("utf-8").splitlines() if line)


class NotifySocket:
    """Read it directly (:meth:`recv`, :meth:`drain`; nothing is read otherwise, so the queue can fill as it does
    for a manager that does not read), or :meth:`collect` in the background, as systemd does for a daemon that runs
    a while: every message is kept with its arrival time (:attr:`messages`, :meth:`lines`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(2.0)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def env(self, **extra: str) -> dict[str, str]:
        """The environment systemd gives the service: NOTIFY_SOCKET and ``extra`` (e.g. WATCHDOG_USEC)."""
        return {"NOTIFY_SOCKET": str(self.path), **extra}

    def recv(self) -> dict[str, str]:
        """The next message; waits up to 2 s."""
        self._direct()
        return parse(self.sock.recv(4096))

    def drain(self) -> list[dict[str, str]]:
        """Every message already sent (non-blocking)."""
        self._direct()
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(parse(self.sock.recv(4096)))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(2.0)
        return out

    def collect(self) -> None:
        """From now on a thread reads every message as it comes."""
        self._direct()
        self.sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, name="notify-socket", daemon=True)
        self._thread.start()

    def _direct(self) -> None:
        if self._thread is not None:
            raise RuntimeError("NotifySocket is collecting in the background: read .messages or lines()")

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            self.messages.append((time.monotonic(), parse(data)))

    def lines(self, prefix: str, since: float = 0.0) -> list[str]:
        """``KEY=value`` lines collected since ``since`` (``time.monotonic()``) that start with ``prefix``."""
        return [f"{k}={v}" for t, m in list(self.messages) if t >= since for k, v in m.items()
                if f"{k}={v}".startswith(prefix)]

    def close(self) -> None:
        """Stop collecting and close the socket; closing twice is fine."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()
