#!/usr/bin/env python3
"""Added latency and CPU of the capture path: device block -> ring -> (de-interleave, resample) -> hub.read.

The device is a 48 kHz card replayed from memory at real-time pace in 20 ms blocks (the same feeder a live PortAudio
callback is replaced by: one copy into the ring per block). Latency is measured per read: the time from the block
that completed the returned audio being written to the ring until ``hub.read`` returned it. CPU is the process CPU
time over the run, as a share of one core.

    PYTHONPATH=. python scripts/bench_capture.py [--seconds 10] [--rate 48000]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import wave
from pathlib import Path

import numpy as np

from kwsd.audio.hub import AudioHub
from kwsd.settings import InputSettings


def bench(channels: int, rate: int, seconds: float, tmp: Path) -> dict[str, float]:
    t = np.arange(int(rate * seconds)) / rate
    tones = [np.sin(2 * np.pi * (300 + 100 * c) * t) * 8000 for c in range(channels)]
    frames = np.stack(tones, 1).astype("<i2")
    path = tmp / f"bench{channels}.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())
    stop = threading.Event()
    settings = InputSettings(device=str(path), sites={c: f"s{c}" for c in range(channels)}, realtime=True)
    hub = AudioHub([settings], stop)
    worker = hub._workers[0]
    writes: list[tuple[int, float]] = []

    # Timestamp every block as the source writes it (instrumentation of the ring's writer side only).
    orig_open = worker._open

    def open_and_instrument():
        src = orig_open()
        ring = src.ring
        plain = ring.write

        def write(block: np.ndarray) -> None:
            plain(block)
            writes.append((ring.end, time.perf_counter()))

        ring.write = write  # type: ignore[method-assign]
        return src

    worker._open = open_and_instrument  # type: ignore[method-assign]
    lat: list[float] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    hub.start()
    deadline = time.monotonic() + seconds + 2
    sites = hub.sites()
    from kwsd.audio.resample import StreamResampler

    r = StreamResampler(rate)
    while time.monotonic() < deadline and hub.status()[str(path)].state != "finished":
        hub.wait(0.1)
        now = None
        for s in sites:
            data, start = hub.read(s)
            if data.size and s == sites[0]:
                now = time.perf_counter()
                end16 = start + data.size
                need = ((end16 - 1) * r.down + r.half_len) // r.up + 1  # native frames that determine it
                for end, tw in writes[-50:]:
                    if end >= need:
                        lat.append(now - tw)
                        break
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    stop.set()
    hub.stop()
    a = np.array(lat) * 1000
    return {"sites": channels, "reads": a.size, "lat_ms_median": float(np.median(a)),
            "lat_ms_p99": float(np.percentile(a, 99)), "lat_ms_max": float(a.max()), "cpu_pct": 100 * cpu /
            wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=48000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for ch in (1, 8):
            res = bench(ch, args.rate, args.seconds, Path(tmp))
            print(
                f"{res['sites']} site(s) @ {args.rate} Hz: "
                f"added latency median {res['lat_ms_median']:.2f} ms, "
                f"p99 {res['lat_ms_p99']:.2f} ms, max {res['lat_ms_max']:.2f} ms over {res['reads']} reads; "
                f"CPU {res['cpu_pct']:.1f} % of one core (incl. the replay feeder)"
            )


if __name__ == "__main__":
    main()
