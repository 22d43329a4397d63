"""The supervised loop restarts a failing part with backoff, logs each distinct error once, and tells the truth."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from kwsd.lifecycle import (
    FAILED,
    RUNNING,
    STOPPED,
    WAITING,
    Backoff,
    Liveness,
    Part,
    release_freed_memory,
    run_supervised,
    supervise,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_to_the_longest_and_resets() -> None:
    b = Backoff(0.5, 3.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert b.failures == 5
    b.reset()
    assert (b.next(), b.failures) == (0.5, 1)
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_liveness_names_late_parts_only() -> None:
    clock = Clock()
    live = Liveness(clock)
    live.beat("pipeline", within=2.0)
    live.beat("input:kitchen", within=30.0, state=WAITING, detail="waiting for device 'usb'")
    assert live.overdue() == ()
    clock.now += 2.5
    assert live.overdue() == ("pipeline",)
    live.beat("pipeline", within=2.0)
    assert live.overdue() == ()
    live.failed("mqtt", "OperationalError: disk I/O error", retry_in=None)
    assert live.overdue() == ("mqtt",)
    assert live.get("mqtt") is not None and live.get("mqtt").restarts == 1  # type: ignore[union-attr]
    live.stopped("mqtt")
    clock.now += 1e6
    assert "mqtt" not in live.overdue()
    live.forget("pipeline")
    live.forget("input:kitchen")
    assert live.overdue() == ()


def test_a_failing_body_is_restarted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    stop = threading.Event()
    live = Liveness()
    runs: list[int] = []

    def body(part: Part) -> None:
        runs.append(1)
        part.beat()
        if len(runs) < 4:
            raise OSError("device busy")
        while not part.wait(0.01):
            part.beat()

    caplog.set_level(logging.DEBUG, logger="kwsd.lifecycle")
    thread = supervise("input:x", body, stop=stop, liveness=live, backoff=Backoff(0.01, 0.02))
    deadline = time.monotonic() + 5
    while len(runs) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    status = live.get("input:x")
    assert status is not None and status.state == RUNNING and status.restarts == 3
    assert status.last_error.startswith("OSError: device busy")
    stop.set()
    thread.join(2)
    assert not thread.is_alive()
    assert live.get("input:x").state == STOPPED  # type: ignore[union-attr]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    # one line for the repeated error, no traceback at ERROR
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "OSError: device busy (restart 1 in" in errors[0].getMessage()


def test_a_part_that_keeps_failing_becomes_overdue() -> None:
    stop = threading.Event()
    live = Liveness()

    def body(part: Part) -> None:
        raise RuntimeError("broken")

    thread = threading.Thread(
        target=run_supervised,
        args=("pipeline", body),
        kwargs={"stop": stop, "liveness": live, "backoff": Backoff(0.001, 0.001), "give_up_after": 3},
    )
    thread.start()
    deadline = time.monotonic() + 5
    while "pipeline" not in live.overdue() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert live.overdue() == ("pipeline",)
    assert live.get("pipeline").state == FAILED  # type: ignore[union-attr]
    stop.set()
    thread.join(2)
    assert not thread.is_alive()


def test_an_early_return_counts_as_a_failure() -> None:
    stop = threading.Event()
    live = Liveness()
    calls: list[int] = []

    def body(part: Part) -> None:
        calls.append(1)
        if len(calls) >= 2:
            stop.set()

    run_supervised("watcher", body, stop=stop, liveness=live, backoff=Backoff(0.001, 0.001))
    assert len(calls) == 2
    status = live.get("watcher")
    assert status is not None and status.state == STOPPED and status.last_error.startswith("ended unexpectedly")


def test_released_memory_freezes_what_is_left_and_a_later_call_collects_what_was_frozen() -> None:
    """After start-up the long-lived objects are out of the collector's scans; a reload's call collects the cycles
    the previous configuration left behind (frozen objects are not collected for good)."""
    import gc
    import weakref

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the cyclic collector frees it
    gone = weakref.ref(a)
    try:
        release_freed_memory()
        assert gc.get_freeze_count() > 0
        del a, b
        gc.collect()
        assert gone() is not None  # frozen: not scanned
        release_freed_memory()
        assert gone() is None
    finally:
        gc.unfreeze()
