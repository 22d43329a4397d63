"""What the review archive costs the pipeline thread: the tap's copy per block, per site (prints figures).

    .venv/bin/python scripts/bench_review.py
"""

from __future__ import annotations

import time

import numpy as np

from kwsd.mqtt.messages import WakeEvent
from kwsd.review.tap import ReviewTap


class _Nowhere:
    """Stands in for the archive: the benchmark measures the pipeline-thread side only."""

    def put_clip(self, event: WakeEvent, samples: np.ndarray, start_sample: int, near_miss: bool,
                 sample_rate: int = 16000) -> None:
        pass


def main() -> None:
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


if __name__ == "__main__":
    main()
