#!/usr/bin/env python3
"""Split folders of recordings into a tuning half and a held-out half (symbolic links), reproducibly.

Choose thresholds and limits on ``tune/``, then report ``held/`` separately: the held-out half says how the choice
does on recordings it was not fitted to. A recording goes to a half by a hash of its source name, so the variants
made from one recording (``+pink10``, ``-20dB``, ``+tail``, ``+<negative>``: scripts/make_dev_positives.py,
scripts/make_hard_negatives.py) land in the same half as the recording itself.

    python scripts/make_dev_split.py --out /tmp/split ../shared/audio/xiaoyun/positive /tmp/pos-hard ...
    # -> /tmp/split/tune/xiaoyun-positive/*.wav, /tmp/split/held/xiaoyun-positive/*.wav, ...
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

VARIANT = re.compile(r"(\+[^+]*|[-+]\d+dB)$")


def source(stem: str) -> str:
    """The recording a clip was made from: its name without the variant suffixes."""
    while True:
        shorter = VARIANT.sub("", stem)
        if shorter == stem:
            return stem
        stem = shorter


def half(stem: str) -> str:
    digest = hashlib.sha1(source(stem).encode("utf-8")).digest()
    return "held" if digest[-1] & 1 else "tune"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="folders of WAV files")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    for folder in args.folders:
        files = sorted(folder.glob("*.wav"))
        if not files:
            sys.exit(f"no WAV files in {folder}")
        counts = {"tune": 0, "held": 0}
        for path in files:
            side = half(path.stem)
            dest = args.out / side / f"{folder.parent.name}-{folder.name}"
            dest.mkdir(parents=True, exist_ok=True)
            link = dest / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
            counts[side] += 1
        name = f"{folder.parent.name}-{folder.name}"
        print(f"{folder}: {counts['tune']} to tune/{name}, {counts['held']} to held/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
