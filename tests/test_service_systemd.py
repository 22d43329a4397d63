"""sd_notify against a real AF_UNIX datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from kwsd.lifecycle import WAITING, Backoff, Liveness, Part, supervise
from kwsd.systemd import Notifier, Watchdog
from tests.fixtures_systemd import NotifySocket


def test_notifier_sends_each_state(notify_socket: NotifySocket) -> None:
    notifier = Notifier(notify_socket.env())
    assert notifier.enabled
    assert notifier.watchdog_interval is None

    notifier.ready("listening for 小云小云 on 2 streams")
    assert notify_socket.recv() == {"READY": "1", "STATUS": "listening for 小云小云 on 2 streams"}
    notifier.status("broker down\nretrying")  # a newline would start a bogus field
    assert notify_socket.recv() == {"STATUS": "broker down retrying"}
    notifier.watchdog()
    assert notify_socket.recv() == {"WATCHDOG": "1"}

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    message = notify_socket.recv()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after

    notifier.extend_timeout(20)
    assert notify_socket.recv() == {"EXTEND_TIMEOUT_USEC": "20000000"}
    notifier.stopping()
    assert notify_socket.recv() == {"STOPPING": "1"}
    notifier.close()
    notifier.ready()  # closed: a no-op, not an error
    assert notify_socket.drain() == []


def test_abstract_socket_address(tmp_path: Path) -> None:
    name = f"kwsd-test-{os.getpid()}-{id(tmp_path)}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(2.0)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert receiver.recv(100) == b"READY=1"
    finally:
        receiver.close()


def test_outside_systemd_everything_is_a_noop() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.reloading()
    notifier.stopping()
    notifier.status("x")
    notifier.watchdog()
    assert not Watchdog(notifier, Liveness()).poll()


def test_unreachable_socket_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    assert not notifier.enabled
    notifier.ready()
    assert "NOTIFY_SOCKET=" in caplog.text and "missing" in caplog.text


def test_send_failure_is_logged_once(notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(notify_socket.env())
    notify_socket.close()  # systemd went away
    notifier.ready()
    notifier.watchdog()
    warnings = [r.getMessage() for r in caplog.records if r.name == "kwsd.systemd"]
    assert len(warnings) == 1
    assert "READY=1" in warnings[0] and "notify" in warnings[0]


@pytest.mark.parametrize(
    ("extra", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # inherited from another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({}, None),
    ],
)
def test_watchdog_usec(notify_socket: NotifySocket, extra: dict[str, str], interval: float | None) -> None:
    assert Notifier(notify_socket.env(**extra)).watchdog_interval == interval


def test_watchdog_usec_without_socket_means_no_watchdog() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_pings_only_while_no_part_is_overdue(
    notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kwsd.systemd")
    notifier = Notifier(notify_socket.env(WATCHDOG_USEC="2000000"))  # ping every second
    clock = Clock()
    live = Liveness(clock)
    dog = Watchdog(notifier, live, clock=clock)
    assert dog.interval == 1.0

    live.beat("pipeline", within=2.0)
    live.beat("input:usb", within=6.0)
    assert not dog.poll()  # not due yet
    clock.now += 1.0
    assert dog.poll()
    assert notify_socket.recv() == {"WATCHDOG": "1"}

    # The mic is unplugged: the input waits for it on schedule (a known state), so pings go on.
    for _ in range(5):
        clock.now += 1.0
        live.beat("pipeline", within=2.0)
        live.beat("input:usb", within=3.0, state=WAITING, detail="waiting for pulse device 'usb'")
        assert dog.poll()
    assert len(notify_socket.drain()) == 5

    # The pipeline hangs (no beat past its promise): no ping, and the log says which part, once.
    clock.now += 1.0
    for _ in range(3):
        clock.now += 1.0
        live.beat("input:usb", within=3.0, state=WAITING)
        assert not dog.poll()
    assert dog.late() == ("pipeline",)
    assert notify_socket.drain() == []
    assert caplog.text.count("withholding the watchdog ping: pipeline (running) overdue") == 1

    # It recovers: the next poll pings at once (a ping is overdue).
    live.beat("pipeline", within=2.0)
    assert dog.poll()
    assert notify_socket.recv() == {"WATCHDOG": "1"}
    assert "pipeline alive again" in caplog.text

    # A part that failed and gave up (no restart promised) is late at once; a stopped one never is.
    live.failed("mqtt", "OperationalError: disk I/O error", retry_in=None)
    live.stopped("input:usb")
    clock.now += 1.0
    live.beat("pipeline", within=2.0)
    assert not dog.poll()
    assert "mqtt (failed: OperationalError: disk I/O error)" in caplog.text


def test_watchdog_with_supervised_threads(notify_socket: NotifySocket) -> None:
    """Two supervised parts beat; one of them hangs half-way; the pings stop with it."""
    notifier = Notifier(notify_socket.env(WATCHDOG_USEC="40000"))  # ping every 20 ms
    live = Liveness()
    dog = Watchdog(notifier, live)
    stop = threading.Event()
    hang = threading.Event()

    def body(part: Part) -> None:
        while not part.stopping:
            if part.name == "detector" and hang.is_set():
                time.sleep(0.5)  # stuck in a step
                continue
            part.beat(within=0.05)
            time.sleep(0.002)

    threads = [supervise(name, body, stop=stop, liveness=live, beat_within=0.05, backoff=Backoff(0.01, 0.01))
               for name in ("capture", "detector")]
    try:
        pings_alive = received = 0
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            pings_alive += dog.poll()
            received += len(notify_socket.drain())  # systemd reads as they come
            time.sleep(0.005)
        hang.set()
        time.sleep(0.08)  # past the detector's promise
        dog.poll()
        received += len(notify_socket.drain())
        pings_stalled = 0
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            pings_stalled += dog.poll()
            time.sleep(0.005)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=2)
    assert pings_alive >= 5
    assert pings_stalled == 0
    assert notify_socket.drain() == []
    assert received >= pings_alive


def test_full_socket_queue_does_not_block(notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture) -> None:
    """A manager that does not read fills the datagram queue; sends then time out instead of hanging."""
    queue_length = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    notifier = Notifier(notify_socket.env())

    def flood() -> None:
        for _ in range(queue_length + 2):
            notifier.watchdog()

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(timeout=10)
    blocked = sender.is_alive()
    received = notify_socket.drain()  # also unblocks a hung sender
    sender.join(timeout=2)
    assert not blocked
    assert len(received) >= queue_length - 1
    assert any("WATCHDOG=1" in r.getMessage() for r in caplog.records)
