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
    "kwsd.review.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kwsd", description="On-premise 小云小云 wake-word daemon.")
    parser.add_argument("--version", action="version", version=f"kwsd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


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
