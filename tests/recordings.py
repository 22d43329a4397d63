"""Fetch the test recordings from the model repository, verified against ``tests/recordings.json``.

The recordings are the upstream repository's own test data (``unittest/example_kws/wav/`` and ``example/``),
pinned with sizes and digests like the model files and fetched by the same code. They land as ``positive/``,
``negative/`` and an ``index.tsv``, the layout ``KWSD_TEST_AUDIO`` names::

    python -m tests.recordings DEST        # source: $KWSD_MODEL_SOURCE (mirror folder or URL), else ModelScope

``scripts/test`` runs this when ``KWSD_TEST_AUDIO`` is not set.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from kwsd.model.fetch import FetchError, fetch_files
from kwsd.model.manifest import ManifestError, load_manifest

MANIFEST = Path(__file__).resolve().parent / "recordings.json"
KEYWORD = "小云小云"


def fetch_recordings(dest: Path, source: str | None = None, **options: Any) -> list[Path]:
    """Make ``dest`` hold every recording of the manifest, verified, and its ``index.tsv``; return the files.

    Raises FetchError (naming the file and the source) or ManifestError.
    """
    manifest = load_manifest(MANIFEST)
    results = fetch_files(dest, source, manifest=manifest, progress=False, **options)
    rows = ["path\tlabel\ttranscript"]
    for entry in manifest.files:
        label = entry.local_path.split("/", 1)[0]
        rows.append(f"{entry.local_path}\t{label}\t{KEYWORD if label == 'positive' else ''}")
    index = dest / "index.tsv"
    tmp = index.with_name(index.name + ".tmp")
    tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    os.replace(tmp, index)
    return [r.local for r in results]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.recordings",
        description="Fetch the test recordings (the model repository's unittest/example_kws/wav/ and example/ "
        "files), verify their digests and lay them out as positive/, negative/ and index.tsv.",
    )
    ap.add_argument("dest", type=Path, help="folder to store them in (then KWSD_TEST_AUDIO=DEST)")
    args = ap.parse_args(argv)
    source = os.environ.get("KWSD_MODEL_SOURCE") or None
    try:
        files = fetch_recordings(args.dest, source)
    except (FetchError, ManifestError) as exc:
        where = source or "ModelScope"
        print(f"test: cannot fetch the test recordings from {where}: {exc}\n"
              "test: set KWSD_TEST_AUDIO to a folder that holds them (positive/*.wav, negative/*.wav, index.tsv)",
              file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in files)
    print(f"test: {len(files)} recordings ({size / 1e6:.1f} MB, verified) in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
