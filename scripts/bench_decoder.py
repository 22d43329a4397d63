#!/usr/bin/env python3
"""Benchmark the CTC keyword decoder: microseconds of CPU per model frame (30 ms) for one stream.

Posteriors are synthesised to look like the model's output: a softmax over 2599 tokens per frame,
blank-dominated in silence, one character peaking per syllable in speech (occasionally 小 or 云 in
other words), and a 小云小云 every ~15 s. Decoding is timed for several block sizes (frames per
``step`` call: the detector's step_frames).

    PYTHONPATH=. python scripts/bench_decoder.py [--minutes 5] [--blocks 1,3,10,100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kwsd.kws.decoder import Keyword, KeywordDecoder

VOCAB = 2599
XIAO, YUN = 1462, 976
FRAME_S = 0.03


def synthesise(n_frames: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """[n_frames, VOCAB] float32 posteriors and the number of 小云小云 placed in them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, size=(n_frames, VOCAB)).astype(np.float32)
    t = 0
    keywords = 0
    while t < n_frames:
        kind = rng.random()
        if kind < 0.4:  # silence / noise
            n = int(rng.integers(10, 100))
            logits[t : t + n, 0] += 12.0
        elif kind < 0.85:  # speech: syllables of ~6 frames, character peaks of 1-3 frames
            n = int(rng.integers(20, 150))
            logits[t : t + n, 0] += rng.uniform(6.0, 10.0, size=min(n, n_frames - t)).astype(np.float32)
            for s in range(t, min(t + n, n_frames), 6):
                tok = int(rng.integers(5, VOCAB))
                if rng.random() < 0.02:
                    tok = XIAO if rng.random() < 0.5 else YUN
                width = int(rng.integers(1, 4))
                logits[s : s + width, tok] += rng.uniform(8.0, 13.0)
        else:  # the keyword
            n = 0
            if t + 40 < n_frames:
                for i, tok in enumerate((XIAO, YUN, XIAO, YUN)):
                    s = t + 2 + 8 * i
                    logits[s : s + 8, 0] += 9.0
                    logits[s + 2 : s + 5, tok] += 13.0
                n = 40
                keywords += 1
        t += max(n, 1)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs.astype(np.float32), keywords


def bench(probs: np.ndarray, block: int, repeats: int) -> tuple[float, KeywordDecoder, int]:
    keyword = Keyword(
        "小云小云", "xiaoyun", (XIAO, YUN, XIAO, YUN), threshold=0.2, min_frames=8, max_frames=83
    )
    best = float("inf")
    decoder = KeywordDecoder([keyword])
    hits = 0
    # Timed as process CPU time: the machine is shared, wall time would include other work.
    blocks = [probs[i : i + block] for i in range(0, len(probs), block)]
    for _ in range(repeats):
        decoder = KeywordDecoder([keyword], refractory_frames=34)
        hits = 0
        start = time.process_time()
        frame = 0
        for chunk in blocks:
            hits += len(decoder.step(chunk, frame))
            frame += len(chunk)
        best = min(best, time.process_time() - start)
    return best / len(probs) * 1e6, decoder, hits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="stream length to synthesise")
    parser.add_argument("--blocks", default="1,3,10,100", help="frames per step() call, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timing runs per block size (best is kept)")
    args = parser.parse_args()

    n_frames = int(args.minutes * 60 / FRAME_S)
    probs, placed = synthesise(n_frames)
    print(f"{n_frames} frames ({args.minutes:g} min), {placed} keywords placed, vocab {VOCAB}")
    header = ("block", "us/frame", "% core/stream", "streams/core", "hits", "beam frames")
    print("{:>6} {:>9} {:>14} {:>13} {:>5} {:>12}".format(*header))
    for block in (int(b) for b in args.blocks.split(",")):
        us, decoder, hits = bench(probs, block, args.repeats)
        share = us / (FRAME_S * 1e6) * 100
        print(
            f"{block:>6} {us:>9.2f} {share:>13.3f}% {FRAME_S * 1e6 / us:>13.0f} {hits:>5} "
            f"{decoder.beam_frames / n_frames:>11.2%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
