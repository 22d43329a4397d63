"""Bounded on-disk outbox: every QoS 1 message waits here until the broker acknowledged it (PUBACK).

A sqlite3 file in WAL mode, so it survives broker outages and daemon restarts; rows are delivered in
insertion order and deleted only on acknowledgement. When the byte bound is reached the oldest segments
are dropped before any event; every drop is counted and logged.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Kind = Literal["event", "segment"]
"""``event``: small messages (wake, announcements) kept as long as possible; ``segment``: WAV audio, dropped
first."""


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    """Row id; increasing in the order messages were queued."""
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: Kind


class Outbox:
    """Thread-safe persistent FIFO of messages to publish."""

    FILE_NAME = "outbox.sqlite3"

    def __init__(self, directory: Path, max_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / self.FILE_NAME
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, "
                "kind TEXT NOT NULL, "
                "size INTEGER NOT NULL)"
            )
        except sqlite3.DatabaseError as exc:
            raise OSError(f"outbox {self.path} cannot be opened: {exc}") from exc
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(id), 0) FROM outbox"
        ).fetchone()
        self._depth, self._bytes = int(row[0]), int(row[1])
        self.newest_id = int(row[2])
        """Id of the newest message queued (0: none yet); a sender that has sent up to it has nothing to peek."""
        self.dropped = 0
        """Messages dropped because of the bound since this process opened the outbox."""
        if self._depth:
            log.info(
                "outbox %s holds %d message(s), %d bytes, from before", self.path, self._depth, self._bytes
            )

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def put(self, topic: str, payload: bytes, qos: int, retain: bool = False, kind: Kind = "event") -> bool:
        """Queue a message; False when it was dropped because it alone exceeds the bound."""
        size = len(payload) + len(topic)
        with self._lock:
            if size > self.max_bytes:
                self.dropped += 1
                log.warning(
                    "outbox: dropped %s on %s: %d bytes exceed mqtt.outbox.max_bytes=%d",
                    kind,
                    topic,
                    size,
                    self.max_bytes,
                )
                return False
            if not self._make_room(size, kind):
                # only events are queued and they outrank audio: the new segment is the one dropped
                self.dropped += 1
                log.warning(
                    "outbox full (mqtt.outbox.max_bytes=%d) of events: dropped new segment on %s",
                    self.max_bytes,
                    topic,
                )
                return False
            cur = self._db.execute(
                "INSERT INTO outbox (topic, payload, qos, retain, kind, size) VALUES (?, ?, ?, ?, ?, ?)",
                (topic, payload, qos, int(retain), kind, size),
            )
            self.newest_id = max(self.newest_id, int(cur.lastrowid or 0))
            self._depth += 1
            self._bytes += size
        return True

    def _make_room(self, size: int, kind: Kind) -> bool:
        # Oldest segments first, then (only for an event) the oldest events: a wake is worth more than audio.
        kinds: tuple[Kind, ...] = ("segment", "event") if kind == "event" else ("segment",)
        for victim_kind in kinds:
            while self._bytes + size > self.max_bytes:
                row = self._db.execute(
                    "SELECT id, topic, size FROM outbox WHERE kind = ? ORDER BY id LIMIT 1", (victim_kind,)
                ).fetchone()
                if row is None:
                    break
                self._db.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
                self._depth -= 1
                self._bytes -= int(row[2])
                self.dropped += 1
                log.warning(
                    "outbox full (mqtt.outbox.max_bytes=%d): dropped oldest %s on %s",
                    self.max_bytes,
                    victim_kind,
                    row[1],
                )
        return self._bytes + size <= self.max_bytes

    def peek(self, after_id: int, limit: int) -> list[OutboxMessage]:
        """Up to ``limit`` messages with id greater than ``after_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, kind FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [OutboxMessage(int(r[0]), r[1], bytes(r[2]), int(r[3]), bool(r[4]), r[5]) for r in rows]

    def ack(self, message_id: int) -> None:
        """The broker acknowledged the message: remove it (no-op if it was dropped meanwhile)."""
        with self._lock:
            row = self._db.execute("SELECT size FROM outbox WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
            self._depth -= 1
            self._bytes -= int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
