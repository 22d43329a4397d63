"""What the review archive costs the pipeline thread: the tap's copy per block, per site, and the detector's time
with near misses reported against without (prints figures).

    KWSD_TEST_AUDIO=../shared/audio/xiaoyun .venv/bin/python scripts/bench_review.py [--model PATH] [--streams 8]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from kwsd.audio.wavfile import read_wav
from kwsd.kws.detector import Detector
from kwsd.kws.session import ModelSession
from kwsd.mqtt.messages import WakeEvent
from kwsd.review.tap import ReviewTap
from kwsd.settings import DetectorSettings


class _Nowhere:
    """Stands in for the archive: the benchmark measures the pipeline-thread side only."""

    def put_clip(self, event: WakeEvent, samples: np.ndarray, start_sample: int, near_miss: bool,
                 sample_rate: int = 16000) -> None:
        pass


def detector_cost(model: Path, audio_dir: Path, streams: int) -> None:
    """Every recording of the test set on ``streams`` streams in 100 ms blocks, near misses off, then on (0.7):
    the same audio and session, so the ratio is what reporting near misses costs."""
    files = sorted((audio_dir / "positive").glob("*.wav")) + sorted((audio_dir / "negative").glob("*.wav"))
    audio = np.concatenate([read_wav(p) for p in files])
    session = ModelSession(model, ("CPUExecutionProvider",))
    figures: dict[float, list[tuple[float, float, int]]] = {}
    for ratio in (0.0, 0.7, 0.0, 0.7):  # interleaved, so a busy neighbour hurts both alike
        det = Detector(session, DetectorSettings(), near_miss_ratio=ratio)
        for i in range(streams):
            det.add_stream(f"s{i}")
        found = 0
        for at in range(0, audio.size, 1600):
            for i in range(streams):
                det.accept(f"s{i}", audio[at:at + 1600])
            det.step()
            found += len(det.near_misses())
        t = det.timing
        figures.setdefault(ratio, []).append((t.decoder, t.features + t.model + t.decoder, found))
    seconds = audio.size / 16000 * streams
    for ratio, runs in figures.items():
        decoder = min(r[0] for r in runs)
        total = min(r[1] for r in runs)
        print(f"near_miss_ratio {ratio:.1f}: decoder {decoder / seconds * 1e3:.3f} ms, whole step "
              f"{total / seconds * 1e3:.3f} ms per second of audio per stream; {runs[0][2]} near misses "
              f"({streams} streams x {audio.size / 16000:.0f} s)")
    off, on = (min(r[1] for r in figures[x]) for x in (0.0, 0.7))
    print(f"whole step with near misses / without: {on / off:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path(os.environ.get("KWSD_MODEL", "models/kwsd-xiaoyun.onnx")))
    ap.add_argument("--streams", type=int, default=8)
    args = ap.parse_args()
    tap = ReviewTap(_Nowhere(), margin=2.0, segments=True)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    for n in (320, 1440, 8000):
        for dtype in (np.int16, np.float32):
            x = (rng.standard_normal(n) * 1000).astype(dtype)
            reps = 200_000 // n * 10
            first = 0
            t0 = time.perf_counter()
            for _ in range(reps):
                tap.feed("s", x, first)
                first += n
            per = (time.perf_counter() - t0) / reps
            print(f"tap.feed {n:5d} samples {np.dtype(dtype).name:>7}: {per * 1e6:6.1f} us per block, "
                  f"{per / (n / 16000) * 100:.3f} % of one core per site in real time")
    audio_dir = os.environ.get("KWSD_TEST_AUDIO")
    if audio_dir:
        detector_cost(args.model, Path(audio_dir), args.streams)
    else:
        print("KWSD_TEST_AUDIO not set: the detector's figures need the test recordings")


if __name__ == "__main__":
    main()
