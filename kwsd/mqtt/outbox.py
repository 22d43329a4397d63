"""Bounded on-disk outbox: every QoS 1 message waits here until the broker acknowledged it (PUBACK).

A sqlite3 file in WAL mode, so it survives broker outages and daemon restarts; rows are delivered in
insertion order and deleted only on acknowledgement. When the byte bound is reached the oldest segments
are dropped before any event; every drop is counted and logged.

The disk is allowed to fail. When a write or read fails (disk full, read-only or foreign-owned file, I/O
error) the error is logged once and counted, new messages are kept in a bounded memory queue in the same
order, delivery goes on from memory, and the disk is tried again with backoff (``retry()``); once it works
the memory queue is written back. A corrupt file is set aside and a fresh one started. A message the broker
refuses is moved to the ``dead_letter`` table (``dead_letter()``) so that it cannot block the queue.

Files are private to the service user: the folder is 0700 and the database 0600 whatever the umask; run
as root, kwsd gives them to the owner of the state folder, so a later run as the service user can open them.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from kwsd.lifecycle import Backoff, ErrorOnce, describe

log = logging.getLogger(__name__)

Kind = Literal["event", "segment"]
"""``event``: small messages (wake, announcements) kept as long as possible; ``segment``: WAV audio, dropped
first."""

MEMORY_BYTES = 16 * 1024 * 1024
"""Most payload bytes kept in memory while the disk cannot be written (bounded like the disk)."""
DEAD_LETTERS_KEPT = 100
"""Dead-letter rows kept; older ones are deleted."""


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    """Increasing in the order messages were queued (on disk or in memory)."""
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: Kind

    @property
    def size(self) -> int:
        return len(self.payload) + len(self.topic)


def _user(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return f"uid {uid}"


def make_private_dir(directory: Path) -> None:
    """Create ``directory`` (and missing parents) 0700; tighten it to 0700 if it is ours and wider."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)
        os.chmod(p, 0o700)  # mkdir's mode is masked by the umask
        _own_like_parent(p)
    _own_like_parent(directory)
    st = directory.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.chmod(directory, 0o700)


def _own_like_parent(path: Path) -> None:
    """Run as root: give ``path`` to the owner of its folder's parent chain (the service user's state folder)."""
    if os.geteuid() != 0:
        return
    parent = path.parent
    while parent != parent.parent and not parent.exists():
        parent = parent.parent
    try:
        pst = parent.stat()
        st = path.stat()
        if pst.st_uid != 0 and (st.st_uid, st.st_gid) != (pst.st_uid, pst.st_gid):
            os.chown(path, pst.st_uid, pst.st_gid)
    except OSError as exc:
        log.warning("cannot give %s to the owner of %s: %s", path, parent, exc.strerror or exc)


class Outbox:
    """Thread-safe persistent FIFO of messages to publish, with a memory fallback while the disk fails."""

    FILE_NAME = "outbox.sqlite3"

    def __init__(self, directory: Path, max_bytes: int, memory_bytes: int = MEMORY_BYTES) -> None:
        self.directory = directory
        self.path = directory / self.FILE_NAME
        self.max_bytes = max_bytes
        self.memory_bytes = min(memory_bytes, max_bytes)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._writable = False
        self._memory: dict[int, OutboxMessage] = {}  # id order (insertion order)
        self._memory_size = 0
        self._unsent_deletes: dict[int, int] = {}  # acknowledged rows whose DELETE failed: id -> size
        self._depth = 0  # rows on disk, acknowledged ones included until deleted
        self._bytes = 0
        self._next_id = 1
        self._errors = ErrorOnce(log, f"outbox {self.path}")
        self._retry = Backoff(1.0, 30.0)
        self._retry_at = 0.0
        self._closed = False
        self.generation = 0
        """Incremented each time the file is (re)opened: a sender peeks from the start again."""
        self.dropped = 0
        """Messages dropped because of a bound since this process opened the outbox."""
        self.errors = 0
        """Disk operations that failed (each is survived)."""
        self.dead_letters = 0
        """Messages set aside because the broker refused them."""
        with self._lock:
            self._open()
        if self._depth:
            log.info("outbox %s holds %d message(s), %d bytes, from before", self.path, self._depth, self._bytes)

    # ---- opening --------------------------------------------------------------------------------------------

    def _open(self) -> bool:
        """Open (or reopen) the database; False and memory mode when that fails."""
        try:
            make_private_dir(self.directory)
            self._prepare_file()
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=1.0)
            try:
                self._init_db(db)
            except sqlite3.DatabaseError as exc:
                db.close()
                if not self._is_corrupt(exc):
                    raise
                self._set_aside(exc)
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=1.0)
                self._init_db(db)
        except (sqlite3.Error, OSError) as exc:
            self._disk_failed("cannot be opened", exc)
            return False
        self._db = db
        self._writable = True
        self.generation += 1
        row = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(id), 0) FROM outbox").fetchone()
        self._depth, self._bytes = int(row[0]), int(row[1])
        seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        self._next_id = max(self._next_id, int(row[2]) + 1, int(seq[0]) + 1)
        for name in (self.FILE_NAME, self.FILE_NAME + "-wal", self.FILE_NAME + "-shm"):
            self._tighten(self.directory / name)
        return True

    def _prepare_file(self) -> None:
        """Create the database file 0600 before SQLite does (SQLite gives its -wal/-shm files the same mode)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._tighten(self.path)

    def _tighten(self, path: Path) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.chmod(path, 0o600)
        _own_like_parent(path)

    @staticmethod
    def _init_db(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, "
            "kind TEXT NOT NULL, "
            "size INTEGER NOT NULL)"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS dead_letter (id INTEGER PRIMARY KEY, topic TEXT NOT NULL, "
            "payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, kind TEXT NOT NULL, "
            "reason TEXT NOT NULL, at TEXT NOT NULL)"
        )
        db.execute("SELECT COUNT(*) FROM outbox").fetchone()

    @staticmethod
    def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
        text = str(exc).lower()
        return "not a database" in text or "malformed" in text

    def _set_aside(self, exc: BaseException) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.FILE_NAME}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.rename(Path(str(aside) + suffix))
        log.error("outbox %s is corrupt (%s): moved it to %s and started an empty outbox", self.path, exc, aside)
        self._prepare_file()

    def _explain(self, exc: BaseException) -> str:
        """One line for a disk error, naming the owner when a foreign-owned file is the cause."""
        me = os.geteuid()
        for path in (self.path, self.directory):
            try:
                st = path.stat()
            except OSError:
                continue
            if st.st_uid != me and me != 0 and not os.access(path, os.W_OK):
                return (
                    f"{path} belongs to {_user(st.st_uid)} and {_user(me)} cannot write it (left by a run as "
                    f"{_user(st.st_uid)}?): run `chown -R {_user(me)} {self.directory}`"
                )
        if isinstance(exc, OSError) and not isinstance(exc, sqlite3.Error):
            return f"{exc.strerror or exc}"
        return describe(exc)

    def _disk_failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        self._writable = False
        delay = self._retry.next()
        self._retry_at = time.monotonic() + delay
        self._errors.error(
            f"{what}: {self._explain(exc)}",
            exc,
            f" (messages kept in memory, up to {self.memory_bytes} bytes; retrying in {delay:.0f} s)",
        )

    # ---- state ----------------------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Messages waiting (on disk and in memory)."""
        return self._depth - len(self._unsent_deletes) + len(self._memory)

    @property
    def size_bytes(self) -> int:
        return self._bytes - sum(self._unsent_deletes.values()) + self._memory_size

    @property
    def newest_id(self) -> int:
        """Id of the newest message queued (0: none yet); a sender that has sent up to it has nothing to peek."""
        return self._next_id - 1

    @property
    def healthy(self) -> bool:
        """The disk works: nothing is waiting in memory only."""
        return self._writable and not self._memory and not self._unsent_deletes

    @property
    def retry_at(self) -> float | None:
        """Monotonic time of the next disk retry, or None when the disk works."""
        return None if self.healthy or self._closed else self._retry_at

    # ---- queue ----------------------------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, qos: int, retain: bool = False, kind: Kind = "event") -> bool:
        """Queue a message; False when it was dropped because of a bound. Never raises."""
        with self._lock:
            msg = OutboxMessage(self._next_id, topic, payload, qos, retain, kind)
            if msg.size > self.max_bytes:
                self.dropped += 1
                log.warning(
                    "outbox: dropped %s on %s: %d bytes exceed mqtt.outbox.max_bytes=%d",
                    kind,
                    topic,
                    msg.size,
                    self.max_bytes,
                )
                return False
            self._next_id += 1
            if self._retry_due():
                self.retry()
            if self._writable and not self._memory and self._db is not None:
                try:
                    if not self._make_room_on_disk(msg.size, kind):
                        self._drop_new(msg)
                        return False
                    self._insert(self._db, msg)
                    return True
                except sqlite3.Error as exc:
                    self._disk_failed("cannot be written", exc)
            return self._put_in_memory(msg)

    def _insert(self, db: sqlite3.Connection, msg: OutboxMessage) -> None:
        db.execute(
            "INSERT INTO outbox (id, topic, payload, qos, retain, kind, size) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (msg.id, msg.topic, msg.payload, msg.qos, int(msg.retain), msg.kind, msg.size),
        )
        self._depth += 1
        self._bytes += msg.size

    def _drop_new(self, msg: OutboxMessage) -> None:
        # only events are queued and they outrank audio: the new segment is the one dropped
        self.dropped += 1
        log.warning(
            "outbox full (mqtt.outbox.max_bytes=%d) of events: dropped new segment on %s", self.max_bytes, msg.topic
        )

    def _make_room_on_disk(self, size: int, kind: Kind) -> bool:
        # Oldest segments first, then (only for an event) the oldest events: a wake is worth more than audio.
        assert self._db is not None
        kinds: tuple[Kind, ...] = ("segment", "event") if kind == "event" else ("segment",)
        for victim_kind in kinds:
            while self.size_bytes + size > self.max_bytes:
                row = self._db.execute(
                    "SELECT id, topic, size FROM outbox WHERE kind = ? ORDER BY id LIMIT 1", (victim_kind,)
                ).fetchone()
                if row is None:
                    break
                self._delete_row(int(row[0]), int(row[2]))
                self.dropped += 1
                log.warning(
                    "outbox full (mqtt.outbox.max_bytes=%d): dropped oldest %s on %s",
                    self.max_bytes,
                    victim_kind,
                    row[1],
                )
        return self.size_bytes + size <= self.max_bytes

    def _put_in_memory(self, msg: OutboxMessage) -> bool:
        kinds: tuple[Kind, ...] = ("segment", "event") if msg.kind == "event" else ("segment",)
        for victim_kind in kinds:
            for victim in [m for m in self._memory.values() if m.kind == victim_kind]:
                if self._memory_size + msg.size <= self.memory_bytes:
                    break
                self._forget(victim.id)
                self.dropped += 1
                log.warning(
                    "outbox memory queue full (%d bytes while the disk fails): dropped oldest %s on %s",
                    self.memory_bytes,
                    victim_kind,
                    victim.topic,
                )
        if self._memory_size + msg.size > self.memory_bytes:
            self._drop_new(msg)
            return False
        self._memory[msg.id] = msg
        self._memory_size += msg.size
        return True

    def _forget(self, message_id: int) -> OutboxMessage | None:
        msg = self._memory.pop(message_id, None)
        if msg is not None:
            self._memory_size -= msg.size
        return msg

    def peek(self, after_id: int, limit: int) -> list[OutboxMessage]:
        """Up to ``limit`` messages with id greater than ``after_id``, oldest first. Never raises."""
        with self._lock:
            rows: list[OutboxMessage] = []
            if self._db is not None and self._depth:
                try:
                    found = self._db.execute(
                        "SELECT id, topic, payload, qos, retain, kind FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                        (after_id, limit + len(self._unsent_deletes)),
                    ).fetchall()
                    rows = [
                        OutboxMessage(int(r[0]), r[1], bytes(r[2]), int(r[3]), bool(r[4]), r[5])
                        for r in found
                        if int(r[0]) not in self._unsent_deletes
                    ]
                except sqlite3.Error as exc:
                    self._disk_failed("cannot be read", exc)
                    self._drop_db()
            if self._memory:
                rows += [m for m in self._memory.values() if m.id > after_id][:limit]
                rows.sort(key=lambda m: m.id)
            return rows[:limit]

    def ack(self, message_id: int) -> None:
        """The broker acknowledged the message: remove it (no-op if it was dropped meanwhile). Never raises."""
        with self._lock:
            if self._forget(message_id) is not None or self._db is None:
                return
            try:
                row = self._db.execute("SELECT size FROM outbox WHERE id = ?", (message_id,)).fetchone()
                if row is None:
                    return
                size = int(row[0])
            except sqlite3.Error as exc:
                self._disk_failed("cannot be read", exc)
                self._drop_db()
                return
            try:
                self._delete_row(message_id, size)
            except sqlite3.Error as exc:
                self._unsent_deletes[message_id] = size
                self._disk_failed("cannot be written", exc)

    def _delete_row(self, message_id: int, size: int) -> None:
        assert self._db is not None
        self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
        self._depth -= 1
        self._bytes -= size

    def dead_letter(self, message: OutboxMessage, reason: str) -> None:
        """Set ``message`` aside: out of the queue, into the ``dead_letter`` table (or dropped). Never raises."""
        with self._lock:
            self.dead_letters += 1
            kept = ""
            if self._db is not None and self._writable:
                try:
                    self._db.execute("BEGIN")
                    self._db.execute(
                        "INSERT OR REPLACE INTO dead_letter (id, topic, payload, qos, retain, kind, reason, at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            message.id,
                            message.topic,
                            message.payload,
                            message.qos,
                            int(message.retain),
                            message.kind,
                            reason,
                            datetime.now(UTC).isoformat(timespec="seconds"),
                        ),
                    )
                    self._db.execute(
                        "DELETE FROM dead_letter WHERE id NOT IN "
                        "(SELECT id FROM dead_letter ORDER BY id DESC LIMIT ?)",
                        (DEAD_LETTERS_KEPT,),
                    )
                    self._db.execute("COMMIT")
                    kept = f"; kept in table dead_letter of {self.path}"
                except sqlite3.Error as exc:
                    self._rollback()
                    self._disk_failed("cannot be written", exc)
            log.error(
                "MQTT message on %r (%d bytes) set aside: %s%s",
                message.topic[:200],
                len(message.payload),
                reason,
                kept or " (dropped)",
            )
            self._forget(message.id)
            self.ack(message.id)

    def dead_lettered(self) -> list[tuple[str, bytes, str]]:
        """(topic, payload, reason) of the dead letters kept, oldest first."""
        with self._lock:
            if self._db is None:
                return []
            try:
                rows = self._db.execute("SELECT topic, payload, reason FROM dead_letter ORDER BY id").fetchall()
            except sqlite3.Error:
                return []
            return [(r[0], bytes(r[1]), r[2]) for r in rows]

    def _drop_db(self) -> None:
        """A read failed: close the file; ``retry()`` reopens it and counts its rows again (those are
        delivered again: at least once)."""
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        self._db = None
        self._depth = self._bytes = 0
        self._unsent_deletes.clear()

    def _rollback(self) -> None:
        try:
            if self._db is not None and self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # ---- recovery -------------------------------------------------------------------------------------------

    def _retry_due(self) -> bool:
        return not self.healthy and time.monotonic() >= self._retry_at

    def retry(self) -> bool:
        """Try the disk again: reopen it if needed, write back the memory queue, finish failed deletes.

        Returns whether the disk is healthy afterwards. Never raises.
        """
        with self._lock:
            if self._closed:
                return False
            if self._db is None and not self._open():
                return False
            db = self._db
            assert db is not None
            try:
                db.execute("BEGIN")
                for message_id in self._unsent_deletes:
                    db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
                for msg in self._memory.values():
                    db.execute(
                        "INSERT INTO outbox (id, topic, payload, qos, retain, kind, size) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (msg.id, msg.topic, msg.payload, msg.qos, int(msg.retain), msg.kind, msg.size),
                    )
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                self._disk_failed("cannot be written", exc)
                return False
            for size in self._unsent_deletes.values():
                self._depth -= 1
                self._bytes -= size
            self._unsent_deletes.clear()
            moved = len(self._memory)
            for msg in self._memory.values():
                self._depth += 1
                self._bytes += msg.size
            self._memory.clear()
            self._memory_size = 0
            self._writable = True
            self._retry.reset()
            self._errors.recovered(f"works again ({moved} message(s) written back from memory)")
            return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._memory:
                log.warning(
                    "outbox %s: %d message(s) kept only in memory are lost at stop (the disk failed)",
                    self.path,
                    len(self._memory),
                )
            if self._db is not None:
                try:
                    self._db.close()
                except sqlite3.Error:
                    pass
                self._db = None
