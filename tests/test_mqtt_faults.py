"""Faults at the MQTT seams, with a real mosquitto and real filesystems: a full disk, a read-only filesystem, a
corrupt or foreign-owned outbox, a message the broker refuses, a failing part inside the connection thread.

Each case checks that delivery goes on, that the fault is logged once in one line without a traceback, and
that the counters say what happened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kwsd.lifecycle import FAILED, RUNNING, STOPPED, WAITING
from kwsd.mqtt.messages import WakeEvent
from kwsd.mqtt.outbox import Outbox, OutboxMessage
from kwsd.mqtt.publisher import Publisher
from kwsd.segments import Segment
from kwsd.settings import MqttSettings
from tests.fixtures_broker import Broker, Subscriber, wait_until

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parent.parent


def settings(broker: Broker, **kw: object) -> MqttSettings:
    base = dict(host="127.0.0.1", port=broker.port, client_id="kwsd-faults", reconnect_min=0.1, reconnect_max=0.5)
    base.update(kw)
    return MqttSettings(**base)  # type: ignore[arg-type]


def wake(site: str, n: int, wakeword: str = "xiaoyun") -> WakeEvent:
    return WakeEvent(site, wakeword, "小云小云", 0.9, 0.2, float(n), n + 0.8, f"{site}-{n}")


def segment(site: str, n: int, seconds: float) -> Segment:
    samples = (np.random.default_rng(n).standard_normal(int(16000 * seconds)) * 1000).astype(np.int16)
    return Segment(site, f"{site}-{n}", samples, 16000 * n, 16000 * n + 4800, 16000 * n + 12000, "silence")


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str = "512k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``folder`` (the machine's real filesystem code, a real ENOSPC/EROFS)."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def error_lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and needle in r.getMessage()]


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert not [r for r in shown if r.exc_info], [r.getMessage() for r in shown if r.exc_info]
    assert "Traceback" not in "\n".join(r.getMessage() for r in shown)


def test_full_disk_keeps_delivering_from_memory_and_writes_back(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sub = Subscriber(broker, "kwsd/a/#")
    with small_filesystem(tmp_path / "state") as state, caplog.at_level(logging.INFO):
        pub = Publisher(settings(broker), state / "outbox", ["a"])
        try:
            pub.start()
            wait_until(lambda: pub.connected, 10, "connected")
            filler = fill(state)
            for n in range(16):
                pub.put_wake(wake("a", n))
                pub.put_segment(segment("a", n, 0.5))
            wakes = sub.wait_for(16, "kwsd/a/wake", timeout=20)
            assert [WakeEvent.from_payload(m.payload).session_id for m in wakes] == [f"a-{n}" for n in range(16)]
            sub.wait_for(16, "kwsd/a/segment/", timeout=20)
            c = pub.counters
            assert c.outbox_errors >= 1 and c.dropped == 0 and c.connected
            assert len(error_lines(caplog, "cannot be written")) == 1, caplog.text
            assert "disk is full" in error_lines(caplog, "cannot be written")[0].getMessage()

            # the broker goes away too: wakes wait in memory, in order, and arrive when it is back
            broker.stop()
            wait_until(lambda: not pub.connected, 10, "outage noticed")
            for n in range(16, 20):
                pub.put_wake(wake("a", n))
            wait_until(lambda: pub.counters.pending == 0 and pub.outbox.depth >= 12, 5, "kept in memory")
            filler.unlink()  # space again: the memory queue goes back to disk
            wait_until(lambda: pub.outbox.healthy, 40, "outbox written back")
            assert any("works again" in r.getMessage() for r in caplog.records)
            broker.start()
            sub.close()
            sub = Subscriber(broker, "kwsd/a/wake")
            wait_until(lambda: pub.connected, 15, "reconnected")
            got = sub.wait_for(4, "kwsd/a/wake", timeout=15)
            assert [WakeEvent.from_payload(m.payload).session_id for m in got][-4:] == [
                f"a-{n}" for n in range(16, 20)
            ]
            wait_until(lambda: pub.outbox.depth == 0, 10, "outbox drained")
        finally:
            pub.stop()
            sub.close()
    no_traceback(caplog)


def test_read_only_filesystem_under_the_outbox(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sub = Subscriber(broker, "kwsd/a/wake")
    with small_filesystem(tmp_path / "state", "4m") as state, caplog.at_level(logging.INFO):
        old = Outbox(state / "outbox", 1 << 20)
        old.put("kwsd/a/wake", wake("a", 0).to_payload(), 1)  # queued by an earlier run
        old.close()
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        pub = Publisher(settings(broker), state / "outbox", ["a"])
        try:
            pub.start()
            wait_until(lambda: pub.connected, 10, "connected")
            for n in range(1, 6):
                pub.put_wake(wake("a", n))
            got = sub.wait_for(5, "kwsd/a/wake")
            assert [WakeEvent.from_payload(m.payload).session_id for m in got] == [f"a-{n}" for n in range(1, 6)]
            assert pub.counters.outbox_errors >= 1
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(lines) == 1 and "outbox" in lines[0] and "read-only" in lines[0].lower(), lines
            subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
            wait_until(lambda: pub.outbox.healthy, 40, "disk back")
            got = sub.wait_for(6, "kwsd/a/wake")  # the earlier run's wake too, once the file can be read
            assert sorted(WakeEvent.from_payload(m.payload).session_id for m in got) == [f"a-{n}" for n in range(6)]
        finally:
            pub.stop()
            sub.close()
    no_traceback(caplog)


def test_state_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ob = Outbox(tmp_path / "state" / "outbox", 1 << 20)
        ob.put("kwsd/a/wake", b"{}", 1)
        mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "state" / "outbox").iterdir()}
        assert mode == {"outbox.sqlite3": 0o600, "outbox.sqlite3-wal": 0o600, "outbox.sqlite3-shm": 0o600}
        assert stat.S_IMODE((tmp_path / "state" / "outbox").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
        ob.close()
        # files left world-readable by an earlier version are tightened
        for p in (tmp_path / "state" / "outbox").iterdir():
            p.chmod(0o644)
        (tmp_path / "state" / "outbox").chmod(0o755)
        Outbox(tmp_path / "state" / "outbox", 1 << 20).close()
        assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "state" / "outbox").iterdir()} == {0o600}
        assert stat.S_IMODE((tmp_path / "state" / "outbox").stat().st_mode) == 0o700
    finally:
        os.umask(old)


NOBODY = 65534
_AS_NOBODY = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from kwsd.mqtt.outbox import Outbox
ob = Outbox(Path(sys.argv[1]), 1 << 20)
print("put", ob.put("kwsd/a/wake", b"{}", 1), "depth", ob.depth, "healthy", ob.healthy, flush=True)
ob.close()
"""


def as_nobody(outbox: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", _AS_NOBODY,
         str(outbox)],
        capture_output=True, text=True, cwd=REPO, timeout=60, env={**os.environ, "HOME": "/"},
    )


@pytest.fixture
def service_state() -> Iterator[Path]:
    """A state folder owned by an unprivileged service user (nobody), outside root's private tmp folder."""
    folder = Path(tempfile.mkdtemp(prefix="kwsd-state-"))
    folder.chmod(0o755)
    os.chown(folder, NOBODY, NOBODY)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_root_owned_outbox_is_reported_in_one_line_and_fixed_by_a_root_run(service_state: Path) -> None:
    outbox = service_state / "outbox"
    # an earlier run as root (of a version that did not fix ownership) left root-owned files
    outbox.mkdir(mode=0o700)
    db = sqlite3.connect(outbox / Outbox.FILE_NAME)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    db.close()
    run = as_nobody(outbox)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, run.stderr
    assert "belongs to root" in errors[0] and f"chown -R nobody {outbox}" in errors[0], errors[0]
    assert "put True depth 1 healthy False" in run.stdout  # kept in memory meanwhile

    # run as root: the files go to the owner of the state folder, so the service user can open them
    Outbox(outbox, 1 << 20).close()
    owners = {p.name: p.stat().st_uid for p in [outbox, *outbox.iterdir()]}
    assert set(owners.values()) == {NOBODY}, owners
    run = as_nobody(outbox)
    assert run.returncode == 0 and "put True depth 1 healthy True" in run.stdout, run.stderr
    assert "ERROR" not in run.stderr


def test_corrupt_outbox_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "outbox"
    folder.mkdir()
    (folder / Outbox.FILE_NAME).write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.INFO):
        ob = Outbox(folder, 1 << 20)
        assert ob.put("kwsd/a/wake", b"{}", 1) and ob.healthy and ob.depth == 1
        ob.close()
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "is corrupt" in line and "moved it to" in line
    assert len(list(folder.glob("outbox.sqlite3.corrupt-*"))) == 1
    no_traceback(caplog)


def test_poison_row_from_an_earlier_version_is_set_aside_without_a_disconnect(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ob = Outbox(tmp_path / "outbox", 1 << 20)
    ob.put("hermes/hotword/bad\x00id/detected", b"{}", 1)  # what an unchecked keyword id once queued
    ob.put("kwsd/a/wake", wake("a", 1).to_payload(), 1)
    sub = Subscriber(broker, "kwsd/a/wake")
    with caplog.at_level(logging.INFO):
        pub = Publisher(settings(broker), sites=["a"], outbox=ob)
        try:
            pub.start()
            assert WakeEvent.from_payload(sub.wait_for(1, "kwsd/a/wake")[0].payload).session_id == "a-1"
            pub.put_wake(wake("a", 2, wakeword="bad\x00id"))  # checked before queueing: dropped with a message
            pub.put_wake(wake("a", 3))
            wait_until(lambda: len(sub.messages) == 3, 10, "the good wakes")
            assert pub.counters.reconnects == 0 and pub.counters.dead_lettered == 1
            assert pub.counters.dropped == 1  # the new bad topic: never queued
        finally:
            pub.stop()
            sub.close()
    assert ob.dead_lettered()[0][0] == "hermes/hotword/bad\x00id/detected"
    ob.close()
    assert "control character U+0000" in caplog.text
    no_traceback(caplog)


def test_a_message_the_broker_refuses_is_set_aside_and_the_rest_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # mosquitto closes the connection of a client whose packet exceeds max_packet_size
    broker = Broker(tmp_path / "broker", extra=("max_packet_size 20000",))
    broker.start()
    sub = Subscriber(broker, "kwsd/a/#")
    try:
        with caplog.at_level(logging.INFO):
            pub = Publisher(settings(broker, hermes=False), tmp_path / "outbox", ["a"])
            pub.start()
            wait_until(lambda: pub.connected, 10, "connected")
            for n in range(3):
                pub.put_wake(wake("a", n))
            pub.put_segment(segment("a", 3, 1.0))  # a 32 kB WAV: refused
            for n in range(4, 8):
                pub.put_wake(wake("a", n))
                pub.put_segment(segment("a", n, 0.25))  # 8 kB: fine
            # QoS 1 may repeat what was in flight when the connection dropped; first arrivals keep the order
            def first_arrivals() -> list[str]:
                found = [m for m in list(sub.messages) if m.topic == "kwsd/a/wake"]
                return list(dict.fromkeys(WakeEvent.from_payload(m.payload).session_id for m in found))

            wait_until(lambda: len(first_arrivals()) >= 7, 30, "the good wakes")
            assert first_arrivals() == [
                f"a-{n}" for n in (0, 1, 2, 4, 5, 6, 7)
            ]
            wait_until(lambda: pub.outbox.depth == 0, 10, "outbox drained")
            c = pub.counters
            assert c.dead_lettered == 1 and c.reconnects <= 3, c
            topics = {m.topic for m in sub.messages}
            assert "kwsd/a/segment/a-3" not in topics and "kwsd/a/segment/a-7" in topics
            [(topic, payload, reason)] = pub.outbox.dead_lettered()
            assert topic == "kwsd/a/segment/a-3" and len(payload) > 20000 and "closed the connection" in reason
            pub.stop()
        lost = [r for r in caplog.records if "connection to" in r.getMessage() and "lost" in r.getMessage()]
        assert len(lost) <= 3, [r.getMessage() for r in lost]
        assert len(error_lines(caplog, "set aside")) == 1
        no_traceback(caplog)
    finally:
        sub.close()
        broker.stop()


class _BrokenOutbox(Outbox):
    """An outbox whose reads fail with a bug-like error a few times (a fault in a part of the thread)."""

    def __init__(self, directory: Path, failures: int) -> None:
        super().__init__(directory, 1 << 20)
        self.failures = failures
        self.lock = threading.Lock()

    def peek(self, after_id: int, limit: int) -> list[OutboxMessage]:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("injected failure")
        return super().peek(after_id, limit)


def test_a_failing_connection_thread_restarts_and_shows_in_liveness(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ob = _BrokenOutbox(tmp_path / "outbox", failures=2)
    sub = Subscriber(broker, "kwsd/a/wake")
    with caplog.at_level(logging.INFO):
        pub = Publisher(settings(broker), sites=["a"], outbox=ob)
        try:
            pub.start()
            wait_until(lambda: pub.connected, 10, "connected")
            assert pub.liveness.get("mqtt").state == RUNNING  # type: ignore[union-attr]
            pub.put_wake(wake("a", 1))
            wait_until(lambda: (p := pub.liveness.get("mqtt")) is not None and p.restarts >= 1, 10, "a restart")
            part = pub.liveness.get("mqtt")
            assert part is not None and part.last_error == "RuntimeError: injected failure"
            assert WakeEvent.from_payload(sub.wait_for(1, "kwsd/a/wake", timeout=20)[0].payload).session_id == "a-1"
            assert pub.alive and pub.liveness.overdue() == ()
            broker.stop()
            wait_until(lambda: pub.liveness.get("mqtt").state == WAITING, 10, "waiting")  # type: ignore[union-attr]
            assert pub.liveness.overdue() == ()
        finally:
            pub.stop()
            sub.close()
    assert pub.liveness.get("mqtt").state == STOPPED  # type: ignore[union-attr]
    assert len(error_lines(caplog, "injected failure")) == 1
    assert FAILED != STOPPED
    no_traceback(caplog)
    ob.close()


def test_put_hands_over_without_touching_the_disk(broker: Broker, tmp_path: Path) -> None:
    pub = Publisher(settings(broker), tmp_path / "outbox", ["a"])
    pub.put_wake(wake("a", 1))
    pub.put_segment(segment("a", 1, 1.0))
    # nothing was encoded or written by the caller: it all waits for the connection thread
    assert pub.outbox.depth == 0 and pub.counters.pending == 2
    sub = Subscriber(broker, "kwsd/a/#")
    try:
        pub.start()
        sub.wait_for(1, "kwsd/a/segment/a-1")
        assert pub.counters.pending == 0
    finally:
        pub.stop()
        sub.close()
