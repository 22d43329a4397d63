"""``kwsd model ...``: the model command group (``fetch``; further subcommands register the same way)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from kwsd.model import EXAMPLE_ENV

SOURCE_ENV = "KWSD_MODEL_SOURCE"
DEFAULT_UPSTREAM_DIR = Path("models/upstream")
AIR_GAPPED_HINT = (f"hosts without access to it: set {SOURCE_ENV}=/path/to/mirror (a copy of the upstream "
                   "model repository, same relative paths) or pass --source")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``model`` command group; each entry of SUBCOMMANDS adds one subcommand."""
    parser = subparsers.add_parser(
        "model", help="fetch and prepare the keyword model",
        description="Fetch the upstream model files (verified against models/manifest.json) and export them to "
        "the streaming ONNX the daemon runs. scripts/setup runs both.")
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
    parser.add_argument("--retries", type=int, default=5, metavar="N",
                        help="retries per file after a failed transfer, with backoff from 1 s (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="seconds to wait for a connection or for data (default: %(default)s)")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )
    parser.set_defaults(func=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    from kwsd.model.fetch import FetchedFile, FetchError, Unreachable, fetch_files
    from kwsd.model.manifest import ManifestError

    source = args.source or os.environ.get(SOURCE_ENV) or None

    def report(result: FetchedFile) -> None:
        if result.status == "absent":
            print(f"{'not in source':<16} {result.path} (optional; only a new export needs it: {EXAMPLE_ENV})",
                  flush=True)
        elif result.status == "skipped":
            print(f"{'not fetched':<16} {result.path} (optional; every required file is present)", flush=True)
        else:
            word = "fetched" if result.status == "fetched" else "already present"
            print(f"{word:<16} {result.path} ({result.size} bytes)", flush=True)

    try:
        fetch_files(
            args.dest,
            source,
            include_checkpoints=args.with_checkpoints,
            progress=args.progress,
            retries=max(args.retries, 0),
            timeout=args.timeout,
            on_file=report,
        )
    except (FetchError, ManifestError) as exc:
        print(f"kwsd model fetch: error: {exc}", file=sys.stderr)
        if isinstance(exc, Unreachable) and (source is None or source.startswith(("http://", "https://"))):
            print(f"kwsd model fetch: {AIR_GAPPED_HINT}", file=sys.stderr)
        return 1
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="export the fetched upstream weights to a verified streaming ONNX",
        description="Parse the Kaldi nnet1 weights, write a streaming ONNX with CMVN folded in and the model's "
        "contract in its metadata, and install it only if it matches an independent numpy forward pass, "
        "chunked inference equals one call, and the example recording decodes to 小云小云.",
    )
    parser.add_argument("--upstream", type=Path, default=DEFAULT_UPSTREAM_DIR,
                        help="folder with the fetched upstream files (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("models/kwsd-xiaoyun.onnx"),
                        help="where to write the ONNX model (default: %(default)s)")
    parser.add_argument("--example", type=Path,
                        help="the model card's example recording (default: UPSTREAM/example/kws_xiaoyunxiaoyun.wav)")
    parser.add_argument("--if-outdated", action="store_true",
                        help="do nothing when OUTPUT was already exported from these weights by this kwsd's "
                        "graph (what scripts/setup runs, so an upgrade re-exports)")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from kwsd.model.export import ExportError, export_model, outdated

    if args.if_outdated:
        reason = outdated(args.upstream, args.output)
        if reason is None:
            print(f"{args.output} is up to date")
            return 0
        print(f"exporting: {reason}")
    try:
        r = export_model(args.upstream, args.output, args.example)
    except ExportError as exc:
        print(f"kwsd model export: error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {r.path}: {r.size_bytes} bytes, {r.params} parameters, {r.seconds:.1f} s; "
          f"max |ONNX - numpy| {r.max_abs_diff:.2g} over {r.compared_frames} frames; chunked vs whole "
          f"{r.chunk_max_diff:.2g}; example reads {r.greedy_text}; {r.ms_per_frame_cpu:.3f} ms/frame on CPU")
    return 0


# One function per subcommand of ``kwsd model``; adding a subcommand is one more function in this tuple.
SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_fetch, add_export)
