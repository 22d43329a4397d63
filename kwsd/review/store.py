"""The archive on disk, shared by the daemon and ``kwsd review``.

Layout under the archive folder (``<state folder>/review``, mode 0700; every file 0600)::

    wakes/<UTC stamp>_<site>_<sessionId>.wav   the audio: pre-roll, keyword and follow-up segment (16 kHz mono)
    wakes/<UTC stamp>_<site>_<sessionId>.json  the sidecar: the published figures, versions, the verdict
    near_misses/...                            the same for candidates that scored just below the threshold
    reports/<UTC stamp>_<site>_<id>.json       missed wakes reported without a clip ("I said it, nothing happened")

File names start with the UTC time, so name order is age order. Sidecars are replaced atomically (write, rename):
the daemon and ``kwsd review mark`` may both write them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Kind = Literal["wake", "near_miss", "report"]
Verdict = Literal["false_wake", "wake", "missed"]
KINDS: tuple[Kind, ...] = ("wake", "near_miss", "report")
VERDICTS: tuple[Verdict, ...] = ("false_wake", "wake", "missed")
FOLDERS: dict[Kind, str] = {"wake": "wakes", "near_miss": "near_misses", "report": "reports"}
FILE_MODE = 0o600
DIR_MODE = 0o700


class ReviewError(ValueError):
    """A verdict or an archive entry cannot be used; the message says which and why."""


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as 0700; an existing folder is narrowed to 0700 too."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as 0600 through a temporary file and a rename (never a half-written file).

    Raises OSError (disk full, folder not writable); the temporary file is removed then.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def file_stem(timestamp: str, site: str, session_id: str) -> str:
    """``20261201T092948123Z_kitchen_<sessionId>`` from an ISO-8601 UTC time; the site made file-name safe."""
    stamp = "".join(c for c in timestamp if c.isdigit() or c in "TZ")
    safe = "".join(c if c.isalnum() or c in "-" else "-" for c in site)[:40] or "site"
    return f"{stamp}_{safe}_{session_id}"


def parse_time(text: str) -> datetime:
    """An ISO-8601 time (``Z`` or an offset; naive means UTC) as an aware UTC datetime."""
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).astimezone(UTC)


@dataclass
class Entry:
    """One archived wake, near miss or report: its sidecar path and contents."""

    path: Path
    data: dict[str, Any]

    @property
    def kind(self) -> Kind:
        kind = self.data.get("kind")
        return kind if kind in KINDS else "wake"

    @property
    def session_id(self) -> str:
        return str(self.data.get("sessionId", ""))

    @property
    def site(self) -> str:
        return str(self.data.get("siteId", ""))

    @property
    def wakeword_id(self) -> str:
        return str(self.data.get("wakewordId", ""))

    @property
    def score(self) -> float | None:
        score = self.data.get("score")
        return float(score) if isinstance(score, int | float) else None

    @property
    def verdict(self) -> Verdict | None:
        verdict = self.data.get("verdict")
        return verdict if verdict in VERDICTS else None

    @property
    def time(self) -> datetime:
        try:
            return parse_time(str(self.data.get("timestamp", "")))
        except ValueError:
            return datetime.fromtimestamp(self.path.stat().st_mtime, UTC)

    @property
    def audio(self) -> Path | None:
        name = self.data.get("audio")
        return self.path.with_name(name) if isinstance(name, str) and name else None

    @property
    def positive(self) -> bool | None:
        """What the clip holds by its verdict: True the keyword, False not, None unreviewed."""
        if self.verdict is None:
            return None
        return self.verdict != "false_wake"

    def size(self) -> int:
        """Bytes on disk: sidecar and WAV."""
        total = 0
        for p in (self.path, self.audio):
            if p is not None:
                with contextlib.suppress(OSError):
                    total += p.stat().st_size
        return total

    def save(self) -> None:
        write_file(self.path, sidecar_bytes(self.data))

    def remove(self) -> None:
        for p in (self.audio, self.path):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def sidecar_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True) + "\n").encode("utf-8")


def read_entry(path: Path) -> Entry:
    """The sidecar at ``path``; a ReviewError names the file when it cannot be read or is not a sidecar."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReviewError(f"{path}: not a readable review sidecar: {exc}") from exc
    if not isinstance(data, dict) or "sessionId" not in data:
        raise ReviewError(f"{path}: not a review sidecar (no sessionId)")
    return Entry(path, data)


def scan(root: Path, kinds: Iterable[Kind] = KINDS) -> list[Entry]:
    """Every readable entry under ``root``, oldest first; unreadable sidecars are logged and skipped."""
    out: list[Entry] = []
    for kind in kinds:
        folder = root / FOLDERS[kind]
        try:
            names = sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))
        except OSError as exc:
            log.warning("review archive %s cannot be read: %s", folder, exc.strerror or exc)
            continue
        for path in names:
            try:
                out.append(read_entry(path))
            except ReviewError as exc:
                log.warning("%s", exc)
    out.sort(key=lambda e: e.path.name)
    return out


def find(root: Path, session_id: str) -> Entry | None:
    """The entry of ``session_id`` (its sidecar name ends with it), or None."""
    if not session_id or "/" in session_id or session_id.startswith("."):
        return None
    for kind in KINDS:
        for path in (root / FOLDERS[kind]).glob(f"*_{session_id}.json"):
            with contextlib.suppress(ReviewError):
                entry = read_entry(path)
                if entry.session_id == session_id:
                    return entry
    return None


def check_verdict(entry_kind: Kind, verdict: str, session_id: str) -> Verdict:
    """``verdict`` if it can be recorded on an entry of ``entry_kind``; a ReviewError says why not."""
    if verdict not in VERDICTS:
        raise ReviewError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    if entry_kind == "wake" and verdict == "missed":
        raise ReviewError(f"session {session_id} was a wake: it cannot be missed (use wake or false_wake)")
    return verdict


def set_verdict(entry: Entry, verdict: str, source: str, now: datetime | None = None) -> Entry:
    """Record ``verdict`` in the entry's sidecar (re-read first, so a concurrent writer's fields are kept)."""
    checked = check_verdict(entry.kind, verdict, entry.session_id)
    with contextlib.suppress(ReviewError):
        entry = read_entry(entry.path)
    entry.data["verdict"] = checked
    entry.data["verdictSource"] = source
    entry.data["verdictTime"] = (now or datetime.now(UTC)).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
    entry.save()
    return entry


# --- the figures --------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """Review figures of one site and keyword over some span of time."""

    wakes: int = 0
    false_wakes: int = 0
    confirmed_wakes: int = 0
    missed_wakes: int = 0
    near_misses: int = 0

    @property
    def unreviewed(self) -> int:
        return self.wakes - self.false_wakes - self.confirmed_wakes

    @property
    def effective_wake_rate(self) -> float | None:
        """(wakes - false wakes) / wakes requested, where requested = true wakes + missed wakes reported."""
        true = self.wakes - self.false_wakes
        requested = true + self.missed_wakes
        return true / requested if requested > 0 else None

    def add(self, entry: Entry) -> None:
        if entry.kind == "wake":
            self.wakes += 1
            if entry.verdict == "false_wake":
                self.false_wakes += 1
            elif entry.verdict == "wake":
                self.confirmed_wakes += 1
        elif entry.kind == "near_miss":
            self.near_misses += 1
            if entry.verdict in ("missed", "wake"):
                self.missed_wakes += 1
        elif entry.verdict == "missed":
            self.missed_wakes += 1

    def to_dict(self) -> dict[str, Any]:
        rate = self.effective_wake_rate
        return {"wakes": self.wakes, "false_wakes": self.false_wakes, "confirmed_wakes": self.confirmed_wakes,
                "missed_wakes": self.missed_wakes, "unreviewed": self.unreviewed, "near_misses": self.near_misses,
                "effective_wake_rate": None if rate is None else round(rate, 4)}


def figures(entries: Iterable[Entry], since: datetime | None = None, by_day: bool = False
            ) -> dict[tuple[str, str, str], Figures]:
    """Figures per (site, wakewordId, day) of the entries at or after ``since``; day is ``""`` unless ``by_day``."""
    out: dict[tuple[str, str, str], Figures] = {}
    for entry in entries:
        t = entry.time
        if since is not None and t < since:
            continue
        key = (entry.site, entry.wakeword_id, t.date().isoformat() if by_day else "")
        out.setdefault(key, Figures()).add(entry)
    return out
