"""Command line: parsing only; each command lives in the module that owns the work."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kwsd import __version__

# command name -> module providing ``register(subparsers)``; the registered parser sets ``func(args) -> int``.
COMMANDS: tuple[str, ...] = (
    "kwsd.model.cli",
    "kwsd.kws.cli",
    "kwsd.audio.cli",
    "kwsd.app",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kwsd", description="On-premise 小云小云 wake-word daemon.")
    parser.add_argument("--version", action="version", version=f"kwsd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    for command in subcommands(parser):
        if {"-v", "--verbose"} & set(command._option_string_actions):
            continue  # the command has an option of that name itself
        # ``kwsd run -v`` as well as ``kwsd -v run``; SUPPRESS keeps a -v given before the command.
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log at DEBUG level")
    return parser


def subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every (nested) subcommand parser below ``parser``, in registration order."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *subcommands(child)]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
