"""Logging set-up: syslog priority prefixes for journald under systemd, timestamps on a terminal, repeats held back."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TextIO

# Third-party loggers that are chatty at INFO/DEBUG; their warnings still come through.
QUIET_LOGGERS = ("paho", "paho.mqtt", "urllib3", "asyncio")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def syslog_priority(levelno: int) -> int:
    """The sd-daemon(3) / syslog priority for a Python log level."""
    if levelno >= logging.CRITICAL:
        return 2  # LOG_CRIT
    if levelno >= logging.ERROR:
        return 3  # LOG_ERR
    if levelno >= logging.WARNING:
        return 4  # LOG_WARNING
    if levelno >= logging.INFO:
        return 6  # LOG_INFO
    return 7  # LOG_DEBUG


class JournalFormatter(logging.Formatter):
    """``<N>logger: message`` with the priority on every line, so a traceback keeps its record's priority.

    journald adds its own timestamp and reads one entry per line; a line without a prefix would be filed at
    the unit's default priority (info).
    """

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


TERMINAL_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

REPEAT_WINDOW = 600.0
"""Seconds for which a warning identical to its logger's previous line is held back."""


class RepeatFilter(logging.Filter):
    """Holds back a warning or error that repeats, word for word, the line its logger logged last.

    The first one is logged; identical ones within ``window`` seconds are counted, not logged; the first one
    after that says how many were held back. Any other line of INFO or above from the same logger (a device
    that came back, a different error) ends the run, so a new problem is always logged at once.
    """

    def __init__(self, window: float = REPEAT_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, tuple[str, float, int]] = {}  # logger -> (line, when logged, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return True
        line = f"{record.levelno} {record.getMessage()}"
        now = self._clock()
        with self._lock:
            last = self._last.get(record.name)
            if record.levelno < logging.WARNING or last is None or last[0] != line:
                self._last[record.name] = (line, now, 0)
                return True
            _, since, held = last
            if now - since < self.window:
                self._last[record.name] = (line, since, held + 1)
                return False
            self._last[record.name] = (line, now, 0)
        if held:
            record.msg = f"{record.getMessage()} (and {held} times more in the last {now - since:.0f} s)"
            record.args = None
        return True


def journal_stream(env: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr) goes to journald.

    ``JOURNAL_STREAM`` (``device:inode``) is checked against the stream, as systemd.exec(5) advises: the
    variable is inherited by processes whose stderr was redirected since. Failing that, ``INVOCATION_ID`` (set
    for every unit) counts when stderr is not a terminal (``StandardError=`` to a file or socket).
    """
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    try:
        fd = stream.fileno()
        st = os.fstat(fd)
        is_tty = os.isatty(fd)
    except (AttributeError, OSError, ValueError):
        return False
    value = env.get("JOURNAL_STREAM", "")
    if value:
        device, _, inode = value.partition(":")
        try:
            if (int(device), int(inode)) == (st.st_dev, st.st_ino):
                return True
        except ValueError:
            pass
    return bool(env.get("INVOCATION_ID")) and not is_tty


def setup_logging(
    level: str,
    *,
    force_journal: bool | None = None,
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Configure the root logger once for the whole process and return its handler.

    ``level`` is a name (``debug``, ``info``, ``warning``, ``error``; any case). ``force_journal`` overrides
    the detection of journald (``None``: detect from ``JOURNAL_STREAM`` / ``INVOCATION_ID``). Replaces
    handlers installed before (e.g. by the command line's early set-up), so a reload can call it again.
    """
    try:
        levelno = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (use one of: {', '.join(LEVELS)})") from None
    stream = sys.stderr if stream is None else stream
    journal = journal_stream(env, stream) if force_journal is None else force_journal
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(TERMINAL_FORMAT))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(levelno, logging.WARNING))
    logging.captureWarnings(True)
    return handler
