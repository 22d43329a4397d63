#!/usr/bin/env python3
"""Benchmark many simulated real-time streams through one detector: batched vs one inference call per stream.

Every stream replays the real recordings (all positives and negatives, concatenated) from its own offset, 100 ms
per step, paced at real time: a step (accept 100 ms for every stream, then ``detector.step()``) starts every 100 ms,
or at once when the previous one ran late. For 1, 16, 64, 256 and 1024 streams it measures the real-time factor
(busy time / audio time), CPU use (process time / wall time; 100 % = one core), p50/p99/max step time and peak
RSS, once with batched inference and once with one ``session.run`` per stream (``max_batch=1``), on the CPU and, where
a GPU is present, on CUDA. A configuration sustains real time when its p99 step is below the 100 ms block. The
first second is not counted (every stream starts at once and the runtime meets each batch shape for the first
time): the figures are the steady state, over 10 s of audio per configuration by default.

    KWSD_TEST_AUDIO=../shared/audio/xiaoyun PYTHONPATH=. python scripts/bench_scale.py [--model PATH]
        [--streams 1,16,64,256,1024] [--seconds 10] [--threads 1] [--stagger] [--no-pace] [--find]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kwsd.audio.wavfile import read_wav
from kwsd.kws.detector import Detector
from kwsd.kws.session import CPU, ModelSession
from kwsd.lifecycle import release_freed_memory
from kwsd.settings import DetectorSettings

RATE = 16000
BLOCK = RATE // 10  # 100 ms
CUDA = "CUDAExecutionProvider"


@dataclass
class Row:
    provider: str
    mode: str
    streams: int
    steps: int
    rtf: float
    cpu: float
    p50: float
    p99: float
    worst: float
    rss_mb: float
    detections: int
    cpu_ms_stream: float = 0.0
    """Process CPU milliseconds per stream per second of audio (10 = 1 % of a core per stream)."""
    stages: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    """Microseconds per stream per 100 ms step: accept, features, model, decoder (busy wall time)."""
    head: float = 0.0
    """Fraction of the frames the model ran (of every batch row) whose output layer ran."""

    @property
    def realtime(self) -> bool:
        return self.p99 < 0.1 and self.rtf < 1.0


def recordings(folder: Path) -> np.ndarray:
    files = sorted((folder / "positive").glob("*.wav")) + sorted((folder / "negative").glob("*.wav"))
    if not files:
        sys.exit(f"no recordings under {folder}/positive or {folder}/negative")
    return np.concatenate([read_wav(p) for p in files])


def steps_for(streams: int, seconds: float, mode: str) -> int:
    """Bound the run: ``seconds`` of audio batched; one call per stream, less beyond 64 streams (at least 3 s)."""
    scale = 1.0 if streams <= 64 or mode == "batched" else 64 / streams
    return max(30, int(seconds * 10 * max(scale, 0.3)))


def run_config(session: ModelSession, audio: np.ndarray, streams: int, steps: int, pace: bool,
               stagger: bool = False, warm_steps: int = 10
               ) -> tuple[float, float, np.ndarray, int, tuple[float, float, float, float], float]:
    """Busy seconds, CPU seconds, step durations, detections, stage times and the fraction of frames whose output
    layer ran, for ``streams`` streams over ``steps`` steps.

    Aligned: every stream's blocks start on the same sample, so all streams need their occasional second model
    frame group (3.33 frames per 100 ms) in the same step: the worst case, e.g. the channels of one device.
    Staggered: stream i's first block is ``(i % 10) * 10 ms`` short, as independent devices would be.
    """
    det = Detector(session, DetectorSettings())
    span = audio.size - (steps + warm_steps + 1) * BLOCK
    offsets = [(i * 7919 * 480) % span for i in range(streams)]
    shifts = [(i % 10) * BLOCK // 10 if stagger else 0 for i in range(streams)]
    names = [f"s{i}" for i in range(streams)]
    for n in names:
        det.add_stream(n)
    durations = np.empty(steps)
    detections = 0
    release_freed_memory()  # what the daemon does once its streams are up (READY)
    busy = 0.0
    cpu = 0.0
    accept = 0.0
    next_start = time.perf_counter()
    for k in range(-warm_steps, steps):
        if pace:
            delay = next_start - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            next_start = max(next_start + 0.1, time.perf_counter() - 0.1)
        if k == 0:
            det.timing = type(det.timing)()
        t0, c0 = time.perf_counter(), time.process_time()
        base = (k + warm_steps) * BLOCK
        for n, off, shift in zip(names, offsets, shifts, strict=True):
            det.accept(n, audio[off + max(base - shift, 0) : off + base + BLOCK - shift])
        ta = time.perf_counter()
        detections += len(det.step())
        t1, c1 = time.perf_counter(), time.process_time()
        if k >= 0:
            durations[k] = t1 - t0
            busy += t1 - t0
            cpu += c1 - c0
            accept += ta - t0
    per = 1e6 / (steps * streams)
    tm = det.timing
    det.close()
    return (busy, cpu, durations, detections, (accept * per, tm.features * per, tm.model * per, tm.decoder * per),
            tm.computed / max(1, tm.rows))


def measure(session: ModelSession, mode: str, audio: np.ndarray, streams: int, seconds: float,
            pace: bool, stagger: bool) -> Row:
    steps = steps_for(streams, seconds, mode)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    busy, step_cpu, durations, detections, stages, head = run_config(session, audio, streams, steps, pace, stagger)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Row(session.provider.replace("ExecutionProvider", ""), mode, streams, steps, busy / (steps * 0.1),
               cpu / wall, float(np.percentile(durations, 50)), float(np.percentile(durations, 99)),
               float(durations.max()), rss, detections, 1000 * step_cpu / (steps * 0.1) / streams, stages, head)


def print_table(rows: list[Row]) -> None:
    head = (f"{'provider':<8} {'mode':<9} {'streams':>7} {'audio s':>7} {'RTF':>7} {'CPU %':>6} {'CPU/str':>7} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'acc us':>6} {'feat us':>7} {'model us':>8} {'dec us':>6} "
            f"{'head %':>6} {'RSS MB':>7} {'hits':>5}  real time")
    print(head)
    print("-" * len(head))
    for r in rows:
        a, f, m, d = r.stages
        print(f"{r.provider:<8} {r.mode:<9} {r.streams:>7} {r.steps / 10:>7.1f} {r.rtf:>7.4f} {100 * r.cpu:>6.1f} "
              f"{r.cpu_ms_stream / 10:>6.3f}% {1000 * r.p50:>7.2f} {1000 * r.p99:>7.2f} {1000 * r.worst:>7.2f} "
              f"{a:>6.1f} {f:>7.1f} {m:>8.1f} {d:>6.1f} {100 * r.head:>6.1f} {r.rss_mb:>7.0f} {r.detections:>5}  "
              f"{'yes' if r.realtime else 'NO'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("KWSD_MODEL", "models/kwsd-xiaoyun.onnx"))
    ap.add_argument("--audio", default=os.environ.get("KWSD_TEST_AUDIO"),
                    help="folder with positive/ and negative/ (default: $KWSD_TEST_AUDIO)")
    ap.add_argument("--streams", default="1,16,64,256,1024")
    ap.add_argument("--seconds", type=float, default=10.0,
                    help="audio per configuration (one call per stream: up to 64 streams)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--modes", default="batched,single", help="batched and/or single (one run per stream)")
    ap.add_argument("--no-pace", dest="pace", action="store_false", help="run steps back to back")
    ap.add_argument("--stagger", action="store_true",
                    help="streams' blocks start 0-90 ms apart (default: aligned, the worst case)")
    ap.add_argument("--find", action="store_true",
                    help="then search the most batched CPU streams with p99 step < 100 ms")
    args = ap.parse_args()
    if not args.audio:
        sys.exit("set KWSD_TEST_AUDIO or pass --audio")
    audio = recordings(Path(args.audio))
    counts = [int(n) for n in args.streams.split(",")]
    modes = args.modes.split(",")

    import onnxruntime as ort

    providers = [CPU]
    if CUDA in ort.get_available_providers():
        probe = ModelSession(args.model, providers=[CUDA, CPU])
        if probe.provider == CUDA:
            providers.insert(0, CUDA)
            gpu_note = f"CUDA available ({ort.get_device()}); CUDA rows included"
        else:
            gpu_note = f"no GPU: onnxruntime offers CUDA but the session fell back to {probe.provider}; CPU only"
        del probe
    else:
        gpu_note = "no GPU: this onnxruntime has no CUDA provider; CPU only"
    print(f"# {gpu_note}")
    print(f"# {os.cpu_count()} CPUs, onnxruntime {ort.__version__}, intra-op threads {args.threads}, "
          f"{audio.size / RATE:.0f} s of recordings, 100 ms blocks {'staggered' if args.stagger else 'aligned'}, "
          f"{'paced at real time' if args.pace else 'unpaced'}")

    rows: list[Row] = []
    for provider in providers:
        sessions = {
            "batched": ModelSession(args.model, providers=[provider], intra_op_threads=args.threads),
            "single": ModelSession(args.model, providers=[provider], intra_op_threads=args.threads, max_batch=1),
        }
        for s in sessions.values():
            s.warm_up()
        for n in counts:
            for mode in modes:
                row = measure(sessions[mode], mode, audio, n, args.seconds, args.pace, args.stagger)
                rows.append(row)
                print(f"#   {row.provider} {mode} {n}: p99 {1000 * row.p99:.1f} ms", file=sys.stderr, flush=True)
    print_table(rows)
    print("# RTF: busy time / audio time; CPU %: process CPU time / wall time (100 % = one core); CPU/str: CPU time "
          "of the steps per stream, in % of one core; p50/p99/max: one step (accept 100 ms for every stream + "
          "step()); acc/feat/model/dec us: wall microseconds per stream per step in accept(), feature extraction, "
          "session.run and the decoders (summed over the step's threads); head %: frames whose output layer ran "
          "(of all the batch rows' frames); RSS: the process's peak so far (rows run in order)")
    load = os.getloadavg()
    print(f"# load average during the run (shared machine): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for provider in sorted({r.provider for r in rows}):
        for mode in modes:
            ok = [r.streams for r in rows if r.provider == provider and r.mode == mode and r.realtime]
            print(f"# {provider} {mode}: real time (p99 step < 100 ms) up to {max(ok) if ok else 0} of the streams "
                  f"tried")

    if args.find:
        session = ModelSession(args.model, providers=[CPU], intra_op_threads=args.threads)
        ok = max((r.streams for r in rows if r.provider == "CPU" and r.mode == "batched" and r.realtime), default=1)
        bad = min((r.streams for r in rows if r.provider == "CPU" and r.mode == "batched" and not r.realtime
                   and r.streams > ok), default=ok * 4)
        while bad - ok > max(8, ok // 16):
            mid = (ok + bad) // 2
            row = measure(session, "batched", audio, mid, 3.0, args.pace, args.stagger)
            print(f"#   search {mid}: p99 {1000 * row.p99:.1f} ms", file=sys.stderr, flush=True)
            ok, bad = (mid, bad) if row.realtime else (ok, mid)
        print(f"# most real-time streams (batched, CPU, p99 step < 100 ms): {ok}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
