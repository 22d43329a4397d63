#!/usr/bin/env python3
"""Build hard negatives from a keyword test set: the keyword said only half (小云 once), then other speech.

A user's household says "小云" in ordinary talk, and this model, fine-tuned on 小云小云, tends to complete the
phrase: after one 小云 it may emit a weak second 小 and 云. These clips measure that false-alarm mode, which plain
negatives (no 小云 at all) cannot show. For every positive recording the script finds the keyword on the model's
greedy path, cuts the audio at the quietest 20 ms between the first 云 and the second 小, and writes:

    <name>+tail.wav          first half of the keyword, then the recording's own audio after the keyword
    <name>+<neg>.wav         first half of the keyword, 100 ms of its own background, then a negative recording

Then measure them with ``kwsd eval``:

    KWSD_TEST_AUDIO=../shared/audio/xiaoyun PYTHONPATH=. python scripts/make_hard_negatives.py --out /tmp/hard
    python -m kwsd eval --positive ../shared/audio/xiaoyun/positive --negative /tmp/hard

The cut is placed by the model's own token timing, so a clip can keep the first few milliseconds of the second 小;
the script prints the greedy reading of every first half so such clips can be spotted.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np

from kwsd.audio.wavfile import read_wav
from kwsd.kws.cli import posteriors
from kwsd.kws.decoder import BLANK_ID, SAMPLES_PER_FRAME, tokenize
from kwsd.kws.session import ModelSession
from kwsd.mqtt.messages import to_wav

RATE = 16000
KEYWORD = "小云小云"
WINDOW = 320  # 20 ms: the unit in which the quietest point between two syllables is searched


def greedy(probs: np.ndarray) -> list[tuple[int, int]]:
    """(frame, token) of every token the best path emits (repeats and blanks collapsed)."""
    best = probs.argmax(axis=1)
    out = []
    prev = BLANK_ID
    for t, tok in enumerate(best):
        if tok != prev and tok != BLANK_ID:
            out.append((t, int(tok)))
        prev = tok
    return out


def keyword_frames(path: list[tuple[int, int]], ids: tuple[int, ...]) -> list[int] | None:
    """Frames of the keyword's tokens on the greedy path, or None when the path does not spell it."""
    toks = [tok for _, tok in path]
    for i in range(len(toks) - len(ids) + 1):
        if tuple(toks[i:i + len(ids)]) == ids:
            return [path[i + j][0] for j in range(len(ids))]
    return None


def quietest_cut(samples: np.ndarray, start: int, end: int) -> int:
    """Sample index of the quietest 20 ms window in samples[start:end] (its middle)."""
    n = max(1, (end - start) // WINDOW)
    energy = [float(np.mean(samples[start + i * WINDOW:start + (i + 1) * WINDOW] ** 2)) for i in range(n)]
    return start + int(np.argmin(energy)) * WINDOW + WINDOW // 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("KWSD_MODEL", "models/kwsd-xiaoyun.onnx"))
    ap.add_argument("--audio", default=os.environ.get("KWSD_TEST_AUDIO"),
                    help="folder with positive/ and negative/ recordings (default: $KWSD_TEST_AUDIO)")
    ap.add_argument("--out", type=Path, required=True, help="folder to write the clips to")
    ap.add_argument("--per-positive", type=int, default=3, help="negatives appended to each first half (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.audio:
        sys.exit("set --audio or KWSD_TEST_AUDIO to the folder of recordings")
    folder = Path(args.audio)
    positives = sorted((folder / "positive").glob("*.wav"))
    negatives = sorted((folder / "negative").glob("*.wav"))
    if not positives or not negatives:
        sys.exit(f"{folder}: needs positive/*.wav and negative/*.wav")

    session = ModelSession(args.model, ["CPUExecutionProvider"], 1, 0)
    tokens = session.contract.tokens
    ids = tokenize(KEYWORD, tokens)
    neg_audio = {p.stem: read_wav(p) for p in negatives}
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    seconds = 0.0
    for pos in positives:
        samples = read_wav(pos)
        frames = keyword_frames(greedy(posteriors(session, samples)), ids)
        if frames is None:
            print(f"{pos.name}: the greedy path does not spell {KEYWORD}; skipped")
            skipped += 1
            continue
        yun1, xiao2, yun2 = frames[1], frames[2], frames[3]
        cut = quietest_cut(samples, yun1 * SAMPLES_PER_FRAME, xiao2 * SAMPLES_PER_FRAME)
        head = samples[:cut]
        reading = "".join(tokens[t] for _, t in greedy(posteriors(session, head)))
        print(f"{pos.name}: first half cut at {cut / RATE:.2f} s, reads {reading!r}")
        background = samples[:1600]
        tail = samples[(yun2 + 12) * SAMPLES_PER_FRAME:]
        clips = {"tail": np.concatenate([head, tail])}
        for stem in rng.sample(sorted(neg_audio), min(args.per_positive, len(neg_audio))):
            clips[stem[-8:]] = np.concatenate([head, background, neg_audio[stem]])
        for suffix, clip in clips.items():
            (args.out / f"{pos.stem}+{suffix}.wav").write_bytes(to_wav(clip, RATE))
            written += 1
            seconds += clip.shape[0] / RATE
    print(f"wrote {written} clips ({seconds / 60:.1f} min) to {args.out}; {skipped} positives skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
