#!/usr/bin/env python3
"""Benchmark the detector on one live-like stream: every real recording, concatenated, fed in 100 ms blocks.

Prints, for one LFR phase (the model's training framing only) and for all three (phase-invariant detection, the
daemon's way), the real-time factor, CPU milliseconds per second of audio (split into features, model and decoder),
the share of one CPU core that one stream takes, and the ratio between the two.

    KWSD_TEST_AUDIO=../shared/audio/xiaoyun PYTHONPATH=. python scripts/bench_detect.py [--model PATH]
        [--block-ms 100] [--repeat 1] [--threads 1] [--phases 1 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from kwsd.audio.wavfile import read_wav
from kwsd.kws.detector import Detector
from kwsd.kws.session import ModelSession
from kwsd.settings import DetectorSettings

RATE = 16000


def recordings(folder: Path) -> np.ndarray:
    """All positives then all negatives of the test set, one int16-scale float32 signal."""
    files = sorted((folder / "positive").glob("*.wav")) + sorted((folder / "negative").glob("*.wav"))
    if not files:
        sys.exit(f"no recordings under {folder}/positive or {folder}/negative")
    return np.concatenate([read_wav(p) for p in files])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("KWSD_MODEL", "models/kwsd-xiaoyun.onnx"))
    ap.add_argument("--audio", default=os.environ.get("KWSD_TEST_AUDIO"),
                    help="folder with positive/ and negative/ (default: $KWSD_TEST_AUDIO)")
    ap.add_argument("--block-ms", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=1, help="feed the concatenation this many times")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--provider", default="CPUExecutionProvider")
    ap.add_argument("--phases", type=int, nargs="+", default=[1, 3], help="LFR phases per stream to measure")
    args = ap.parse_args()
    if not args.audio:
        sys.exit("set KWSD_TEST_AUDIO or pass --audio")
    audio = np.tile(recordings(Path(args.audio)), args.repeat)
    seconds = audio.size / RATE
    session = ModelSession(args.model, providers=[args.provider], intra_op_threads=args.threads)
    session.warm_up()
    print(f"provider           {session.provider} (intra-op threads {args.threads})")
    print(f"audio              {seconds:.1f} s in {args.block_ms} ms blocks")
    cpu_per_s = {}
    for phases in args.phases:
        cpu_per_s[phases] = run(session, audio, phases, RATE * args.block_ms // 1000)
    if len(cpu_per_s) > 1:
        base = min(cpu_per_s)
        for phases, value in cpu_per_s.items():
            if phases != base:
                print(f"CPU per stream, {phases} phases / {base}: {value / cpu_per_s[base]:.2f}")
    return 0


def run(session: ModelSession, audio: np.ndarray, phases: int, block: int) -> float:
    """Feed the audio as one stream; print the figures; return CPU seconds per second of audio."""
    seconds = audio.size / RATE
    det = Detector(session, DetectorSettings(), phases=phases)
    det.add_stream("live")
    hits = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(0, audio.size, block):
        det.accept("live", audio[i : i + block])
        hits.extend(det.step())
    hits.extend(det.finish("live"))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    t = det.timing
    stages = t.features + t.model + t.decoder
    print(f"-- {phases} LFR phase(s): {len(hits)} detections")
    print(f"wall               {wall:.3f} s   real-time factor {wall / seconds:.5f} ({seconds / wall:.0f}x real time)")
    print(f"CPU                {1000 * cpu / seconds:.3f} ms per s of audio = {100 * cpu / seconds:.3f} % of one core")
    for name, value in (("features", t.features), ("model", t.model), ("decoder", t.decoder)):
        print(f"  {name:<16} {1000 * value / seconds:.3f} ms per s of audio ({100 * value / max(stages, 1e-9):.0f} %)")
    print(f"  {'other':<16} {1000 * max(wall - stages, 0.0) / seconds:.3f} ms per s of audio (accept/step glue)")
    print(f"steps              {t.steps} inference calls, {t.frames} model frames; output layer on "
          f"{t.computed} of {t.rows} frames of batch rows ({100 * t.computed / max(1, t.rows):.1f} %)")
    return cpu / seconds


if __name__ == "__main__":
    raise SystemExit(main())
