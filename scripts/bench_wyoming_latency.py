#!/usr/bin/env python3
"""Wyoming wake latency through the real daemon: keyword end in the audio -> ``detection`` received by a client.

Starts ``python -m kwsd run`` with only the Wyoming service (no microphones, no MQTT) on a loopback port and streams
the positive recordings to it with the ``wyoming`` library's AsyncTcpClient (what Home Assistant uses), in 20 ms
chunks at live pace: chunk k leaves when its last sample would have been heard, at ``t0 + (k + 1) x 20 ms``. The
keyword end of each file comes from ``kwsd detect`` on the same file, so

    latency = arrival of the detection - (t0 + keyword end)

``--clients`` streams that many recordings at once (one batched detector step serves them all). The model's
look-ahead (8 frames x 30 ms = 240 ms) and the detector step (3 frames = 90 ms, so 0..90 ms waiting for a step to
fill) are a floor; the 20 ms chunking adds 0..20 ms. The daemon's own figure (audio received after the keyword end
when the wake was decided, in samples) is printed beside it from its log.

    PYTHONPATH=. python scripts/bench_wyoming_latency.py [--clients 26] [--limit 0] [--chunk-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.ping import Ping
from wyoming.wake import Detect, Detection

from kwsd.audio.wavfile import read_wav

REPO = Path(__file__).resolve().parent.parent
RATE = 16000
LOOKAHEAD_MS = 8 * 30
STEP_MS = 3 * 30


def keyword_ends(files: list[Path], model: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "kwsd", "detect", "--model", str(model), "--provider",
                          "CPUExecutionProvider", *map(str, files)], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout
    ends: dict[str, float] = {}
    for line in out.splitlines():
        hit = json.loads(line)
        ends.setdefault(hit["file"], hit["end"])
    return ends


async def stream(port: int, path: Path, chunk_ms: int) -> tuple[list[tuple[float, int]], float]:
    """(arrival wall time, timestamp ms) of each detection, and t0 (wall time of 'sample 0 heard')."""
    audio = np.clip(np.rint(read_wav(path)), -32768, 32767).astype("<i2").tobytes()
    step = RATE * chunk_ms // 1000 * 2
    got: list[tuple[float, int]] = []
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Detect().event())
        await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
        loop = asyncio.get_running_loop()
        t0_loop, t0 = loop.time(), time.time()

        async def read() -> None:
            while (event := await client.read_event()) is not None:
                if Detection.is_type(event.type):
                    got.append((time.time(), int(Detection.from_event(event).timestamp or 0)))
                elif event.type == "pong":
                    return

        reader = asyncio.create_task(read())
        for k, i in enumerate(range(0, len(audio), step)):
            await asyncio.sleep(max(0.0, t0_loop + (k + 1) * chunk_ms / 1000 - loop.time()))
            await client.write_event(AudioChunk(rate=RATE, width=2, channels=1, audio=audio[i : i + step]).event())
        await client.write_event(AudioStop().event())
        await client.write_event(Ping().event())
        await asyncio.wait_for(reader, 30)
    return got, t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--audio", type=Path, default=Path(os.environ.get("KWSD_TEST_AUDIO", "")),
                    help="folder with positive/*.wav (default $KWSD_TEST_AUDIO)")
    ap.add_argument("--model", type=Path,
                    default=Path(os.environ.get("KWSD_MODEL") or REPO / "models" / "kwsd-xiaoyun.onnx"))
    ap.add_argument("--limit", type=int, default=0, help="use only the first N positives (0: all)")
    ap.add_argument("--clients", type=int, default=0, help="recordings streamed at once (0: all of them)")
    ap.add_argument("--chunk-ms", type=int, default=20)
    args = ap.parse_args()

    files = sorted((args.audio / "positive").glob("*.wav"))[: args.limit or None]
    if not files:
        raise SystemExit(f"no positive/*.wav under {args.audio!s} (set KWSD_TEST_AUDIO or --audio)")
    ends = keyword_ends(files, args.model.resolve())
    unheard = [f.name for f in files if str(f) not in ends]
    if unheard:
        print(f"left out, kwsd detect does not hear the keyword in them: {', '.join(unheard)}")
    files = [f for f in files if str(f) in ends]
    work = Path(tempfile.mkdtemp(prefix="kwsd-bench-wyoming-"))
    cfg = {
        "model": {"path": str(args.model.resolve()), "providers": ["CPUExecutionProvider"]},
        "mqtt": {"enabled": False},
        "wyoming": {"enabled": True, "port": 0, "max_clients": max(32, len(files))},
        "service": {"state_dir": str(work / "state")},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    log = work / "kwsd.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    with open(log, "wb") as fh:
        daemon = subprocess.Popen([sys.executable, "-m", "kwsd", "run", "--config", str(work / "config.yaml")],
                                  stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"wyoming: listening on tcp://127\.0\.0\.1:(\d+)", log.read_text())):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"kwsd did not start listening:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        port = int(m.group(1))
        wave = args.clients or len(files)
        print(f"{len(files)} recordings, {wave} at a time, {args.chunk_ms} ms chunks at live pace")

        async def run_all() -> list[tuple[list[tuple[float, int]], float]]:
            out = []
            for i in range(0, len(files), wave):
                out += await asyncio.gather(*(stream(port, f, args.chunk_ms) for f in files[i : i + wave]))
            return out

        cpu0, wall0 = cpu_seconds(daemon.pid), time.monotonic()
        results = asyncio.run(run_all())
        cpu = cpu_seconds(daemon.pid) - cpu0
        wall = time.monotonic() - wall0
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
    lat, offsets, missed = [], [], []
    print(f"{'recording':<58} {'end s':>6} {'stamp s':>8} {'latency ms':>10}")
    for f, (got, t0) in zip(files, results, strict=True):
        end = ends[str(f)]
        if not got:
            missed.append(f.name)
            continue
        arrival, stamp = got[0]
        lat.append((arrival - (t0 + end)) * 1000)
        offsets.append(stamp - end * 1000)
        print(f"{f.name:<58} {end:6.2f} {stamp / 1000:8.3f} {lat[-1]:10.0f}")
    reported = [float(x) for x in re.findall(r"dBFS, (\d+) ms after it ended", log.read_text())]
    shutil.rmtree(work, ignore_errors=True)
    print(f"detected {len(lat)} of {len(files)}" + (f"; missed {', '.join(missed)}" if missed else ""))
    if not lat:
        return 1
    print(f"latency (detection received - keyword end): median {statistics.median(lat):.0f} ms, "
          f"p90 {percentile(lat, 0.9):.0f} ms, worst {max(lat):.0f} ms, best {min(lat):.0f} ms")
    print(f"timestamp - kwsd detect's keyword end: median {statistics.median(offsets):.0f} ms, "
          f"largest {max(offsets, key=abs):.0f} ms")
    if reported:
        print(f"in the daemon (audio after the keyword end when decided): median {statistics.median(reported):.0f} "
              f"ms, p90 {percentile(reported, 0.9):.0f} ms")
    print(f"daemon CPU while streaming: {cpu:.1f} s in {wall:.1f} s ({100 * cpu / wall:.0f} % of one core) for "
          f"{min(wave, len(files))} concurrent streams")
    print(f"floor: the model's look-ahead {LOOKAHEAD_MS} ms, plus 0..{STEP_MS} ms for a detector step to fill and "
          f"0..{args.chunk_ms} ms of chunking")
    return 0


if __name__ == "__main__":
    sys.exit(main())
