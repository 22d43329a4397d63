"""The daemon's commands: ``kwsd check-config`` (and the supervisor, ``kwsd run``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from kwsd import settings

DEFAULT_CONFIG = Path("/etc/kwsd/config.yaml")


def _load(path: Path, prefix: str = "") -> settings.Settings | None:
    """The config at ``path``, or None after printing the problem (naming the key) to stderr."""
    try:
        return settings.load(path)
    except settings.ConfigError as exc:
        print(f"{prefix}{path}: {exc}", file=sys.stderr)
        return None


def check_config(args: argparse.Namespace) -> int:
    """Load and validate a config file; print OK or the problem (naming the key); return the exit status."""
    path = Path(args.config)
    loaded = _load(path)
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
        "The unit runs it as ExecStartPre=, so a bad config fails the start with the reason in the journal.",
    )
    parser.add_argument("config", metavar="FILE", nargs="?", default=DEFAULT_CONFIG, type=Path)
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when the file is valid")
    parser.set_defaults(func=check_config)


def run(args: argparse.Namespace) -> int:
    """``kwsd run``: load the config and serve until stopped (SIGTERM/SIGINT), reloading on SIGHUP."""
    from kwsd.logs import setup_logging
    from kwsd.supervisor import Daemon

    path = Path(args.config)
    loaded = _load(path, "kwsd run: ")
    if loaded is None:
        return 1
    setup_logging("debug" if args.verbose else loaded.service.log_level)
    return Daemon(path, loaded).serve()


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
