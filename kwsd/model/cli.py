"""``kwsd model ...``: the model command group (``fetch``; further subcommands register the same way)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

SOURCE_ENV = "KWSD_MODEL_SOURCE"
DEFAULT_UPSTREAM_DIR = Path("models/upstream")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``model`` command group; each entry of SUBCOMMANDS adds one subcommand."""
    parser = subparsers.add_parser("model", help="fetch and prepare the keyword model")
    sub = parser.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)


def add_fetch(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "fetch",
        help="download the upstream model files and verify them against models/manifest.json",
        description="Download the pinned upstream model files (ModelScope, an HTTP mirror with the same API, "
        "or a local folder laid out like the upstream repository) and verify each one's size and sha256. "
        "Files already present and valid are kept.",
    )
    parser.add_argument(
        "--source",
        metavar="DIR|URL",
        help=f"a folder or http(s) base URL to fetch from (default: ${SOURCE_ENV}, else ModelScope)",
    )
    parser.add_argument(
        "--dest",
        type=Path,
        default=DEFAULT_UPSTREAM_DIR,
        help="folder to store the upstream files in (default: %(default)s)",
    )
    parser.add_argument(
        "--with-checkpoints",
        action="store_true",
        help="also fetch the optional PyTorch checkpoints (*.pt)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )
    parser.set_defaults(func=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    from kwsd.model.fetch import FetchedFile, FetchError, fetch_files
    from kwsd.model.manifest import ManifestError

    source = args.source or os.environ.get(SOURCE_ENV) or None

    def report(result: FetchedFile) -> None:
        word = "fetched" if result.status == "fetched" else "already present"
        print(f"{word:<16} {result.path} ({result.size} bytes)", flush=True)

    try:
        fetch_files(
            args.dest,
            source,
            include_checkpoints=args.with_checkpoints,
            progress=args.progress,
            on_file=report,
        )
    except (FetchError, ManifestError) as exc:
        print(f"kwsd model fetch: error: {exc}", file=sys.stderr)
        return 1
    return 0


# One function per subcommand of ``kwsd model``; adding a subcommand is one more function in this tuple.
SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_fetch,)
