"""The daemon's commands: ``kwsd check-config`` (and the supervisor, ``kwsd run``).

Both load the config with the same function (:func:`kwsd.settings.load_for_run`), so what the check accepts is
what the daemon starts with. Neither lets a traceback reach the user: every failure is one line naming the file,
the key and the problem, and exit status 1 (``kwsd -v`` logs the traceback of an unexpected error at debug level).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from kwsd import settings

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/kwsd/config.yaml")
INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as a shell reports it."""


def _unexpected(what: str, exc: BaseException) -> str:
    """One line for an error kwsd did not foresee; the traceback goes to the debug log only."""
    from kwsd.lifecycle import describe

    log.debug("%s", what, exc_info=exc)
    text = describe(exc)
    text = text if len(text) <= 240 else text[:237] + "..."
    return f"{what}: {text} (unexpected; `kwsd -v` logs the traceback)"


def _load(path: Path, prefix: str = "") -> settings.Settings | None:
    """The config at ``path`` checked for ``kwsd run``, or None after printing the problem to stderr."""
    try:
        return settings.load_for_run(path)
    except settings.ConfigError as exc:
        print(f"{prefix}{path}: {exc}", file=sys.stderr)
    except Exception as exc:
        print(f"{prefix}{path}: {_unexpected('cannot check this config', exc)}", file=sys.stderr)
    return None


def check_config(args: argparse.Namespace) -> int:
    """Load and validate a config file; print OK or the problem (naming the key); return the exit status."""
    path = Path(args.config)
    try:
        loaded = _load(path)
    except KeyboardInterrupt:
        return INTERRUPTED
    if loaded is None:
        return 1
    if not args.quiet:
        print(f"{path}: OK ({len(loaded.inputs)} inputs, {len(loaded.detector.keywords)} keywords)")
    return 0


def _add_check_config(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config file and name the offending key; exit status 1 when it is invalid. "
        "It checks exactly what `kwsd run` checks before it starts: the file, the model and its keywords, replayed "
        "files, TLS and password files, the state folder, and that the metrics port is free. "
        "The unit runs it as ExecStartPre=, so a bad config fails the start with the reason in the journal.",
    )
    parser.add_argument("config", metavar="FILE", nargs="?", default=DEFAULT_CONFIG, type=Path)
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when the file is valid")
    parser.set_defaults(func=check_config)


def run(args: argparse.Namespace) -> int:
    """``kwsd run``: load the config and serve until stopped (SIGTERM/SIGINT), reloading on SIGHUP."""
    path = Path(args.config)
    try:
        loaded = _load(path, "kwsd run: ")
        if loaded is None:
            return 1
        from kwsd.logs import setup_logging
        from kwsd.supervisor import Daemon

        setup_logging("debug" if args.verbose else loaded.service.log_level)
        daemon = Daemon(path, loaded)
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception as exc:
        print(f"kwsd run: {path}: {_unexpected('cannot start', exc)}", file=sys.stderr)
        return 1
    try:
        return daemon.serve()
    except KeyboardInterrupt:  # before the signal handlers were installed
        return INTERRUPTED
    except Exception as exc:
        log.error("%s", _unexpected("kwsd run failed", exc))
        try:
            daemon.shutdown()
        except Exception as again:
            log.debug("shutdown after the failure failed too", exc_info=again)
        return 1


def _add_run(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="run the daemon (under systemd: Type=notify, watchdog, reload on SIGHUP)",
        description="Listen to the configured inputs and remote satellites, detect the keywords and publish "
        "wake events and follow-up segments over MQTT until SIGTERM/SIGINT; SIGHUP reloads the config.",
    )
    parser.add_argument("--config", metavar="FILE", default=DEFAULT_CONFIG, type=Path,
                        help="config file (default: %(default)s)")
    parser.set_defaults(func=run)


# Each entry adds one subcommand; a new command is one function and one line here.
PARSERS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_run, _add_check_config)


def register(subparsers: argparse._SubParsersAction) -> None:
    for add in PARSERS:
        add(subparsers)
