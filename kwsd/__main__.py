"""Command line: parsing only; each command lives in the module that owns the work."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from kwsd import __version__

# BLAS stays on the calling thread throughout kwsd (the front end's mel product; kwsd spreads streams and recordings
# over threads itself). Said before numpy loads OpenBLAS, its worker threads are never started: they busy-wait for
# about 0.1 s of CPU after numpy's import, on the cores the decoding threads need. A value the user set is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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
    return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    return int(args.func(args) or 0)


def entry() -> NoReturn:
    """The ``kwsd`` program: :func:`main` as a process of its own.

    A command that sets ``exit_at_once`` (one that runs its work to the end and has nothing left running, such as
    ``detect``) ends the process as soon as its output and logs are flushed: the interpreter's teardown (every
    module and onnxruntime's session freed one by one) would add about 30 ms to a run that lasts a few hundred.
    Output to a pipe that was closed early (``kwsd detect ... | head -1``) ends the command quietly, and so does
    Ctrl-C (status 130, as a shell reports it).
    """
    args = argparse.Namespace()
    try:
        args = build_parser().parse_args()
        code = _run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader is gone: nothing more can be written, and Python's own flush at exit must not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C on a command without its own signal handling (``run`` has one)
        sys.exit(130)
    except Exception as exc:  # a fault of kwsd itself: one line (the traceback with -v), status 70 (EX_SOFTWARE)
        command = getattr(args, "command", None) or "kwsd"
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()  # what the command already printed (detections so far) is kept
        logging.getLogger("kwsd").error(
            "%s: internal error: %s: %s (this is a fault in kwsd; run with -v for the traceback and report it)",
            command, type(exc).__name__, exc, exc_info=exc if getattr(args, "verbose", False) else None)
        logging.shutdown()
        os._exit(70)
    if getattr(args, "exit_at_once", False):
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
