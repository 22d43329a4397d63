#!/usr/bin/env python3
"""Wake latency through the real daemon: keyword end in the audio -> wake event arriving at an MQTT subscriber.

Concatenates the positive recordings (each followed by ``--gap`` seconds of silence) into one WAV, starts a
mosquitto on a loopback port and ``python -m kwsd run`` with that WAV as a file input replayed at real-time pace,
and records when each ``kwsd/<site>/wake`` arrives. The replay starts when the daemon logs
``input <wav>: running`` (the replay thread takes its clock just before), so the keyword end is heard at
``replay start + payload end`` and

    latency = arrival wall time - (replay start + end)

The payload's own ``latency`` field (audio captured after the keyword end when the wake was raised, counted in
samples inside the daemon) is printed beside it as a cross-check; the difference is MQTT delivery. The model's
look-ahead (8 frames x 30 ms = 240 ms) and the detector step while a keyword forms (``detector.step_frames``, 1
frame = 30 ms by default, so 0..30 ms waiting for a step to fill) are a floor no implementation detail can remove.

    PYTHONPATH=. python scripts/bench_latency.py [--limit 26] [--gap 1.5] [--provider CPUExecutionProvider]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import yaml

from kwsd.audio.wavfile import read_wav
from kwsd.settings import DetectorSettings

REPO = Path(__file__).resolve().parent.parent
RATE = 16000
LOOKAHEAD_MS = 8 * 30
FRAME_MS = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(folder: Path, port: int) -> subprocess.Popen[bytes]:
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"mosquitto did not listen on port {port}")


def log_time(line: str) -> float:
    """Wall time (epoch seconds) of a kwsd log line: ``2026-11-21 17:05:44,682 INFO ...`` (local time)."""
    stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--audio", type=Path, default=Path(os.environ.get("KWSD_TEST_AUDIO", "")),
                    help="folder with positive/*.wav (default $KWSD_TEST_AUDIO)")
    ap.add_argument("--model", type=Path,
                    default=Path(os.environ.get("KWSD_MODEL") or REPO / "models" / "kwsd-xiaoyun.onnx"))
    ap.add_argument("--limit", type=int, default=0, help="use only the first N positives (0: all)")
    ap.add_argument("--gap", type=float, default=1.5, help="seconds of silence after each recording")
    ap.add_argument("--provider", default="CPUExecutionProvider")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (WAV, config, kwsd.log)")
    ap.add_argument("--detector", type=yaml.safe_load, default={},
                    help="detector settings for the daemon, as YAML (e.g. '{step_frames: 1, quiet_step_frames: 6}')")
    args = ap.parse_args()

    files = sorted((args.audio / "positive").glob("*.wav"))
    if args.limit:
        files = files[: args.limit]
    if not files:
        raise SystemExit(f"no positive/*.wav under {args.audio!s} (set KWSD_TEST_AUDIO or --audio)")
    work = Path(tempfile.mkdtemp(prefix="kwsd-bench-latency-"))
    parts, bounds, offset = [], [], 0.0
    for f in files:
        a = read_wav(f)
        parts += [a, np.zeros(int(args.gap * RATE), np.float32)]
        bounds.append((offset, offset + a.size / RATE, f.name))
        offset += a.size / RATE + args.gap
    wav_path = work / "positives.wav"
    with wave.open(str(wav_path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(np.concatenate(parts).astype("<i2").tobytes())
    print(f"{len(files)} recordings, {offset:.1f} s of audio replayed at real-time pace")

    port = free_port()
    broker = start_broker(work, port)
    arrivals: list[tuple[float, dict]] = []
    lock = threading.Lock()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        t = time.time()
        with lock:
            arrivals.append((t, json.loads(msg.payload)))

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-latency")
    subscribed = threading.Event()
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("kwsd/+/wake", qos=1)
    sub.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    if not subscribed.wait(5):
        raise SystemExit("bench subscriber could not subscribe")

    cfg = {
        "model": {"path": str(args.model.resolve()), "providers": [args.provider]},
        "detector": args.detector,
        "inputs": [{"device": str(wav_path), "kind": "file", "realtime": True, "sites": {0: "bench"}}],
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min": 0.2, "reconnect_max": 1.0},
        "service": {"state_dir": str(work / "state")},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    log_path = work / "kwsd.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    with open(log_path, "wb") as fh:
        daemon = subprocess.Popen([sys.executable, "-m", "kwsd", "run", "--config", str(work / "config.yaml")],
                                  stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    running = re.compile(rf"input {re.escape(str(wav_path))}: running")
    finished = f"input {wav_path}: finished"
    start_wall = None
    deadline = time.monotonic() + offset + 60
    try:
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            if start_wall is None:
                for line in text.splitlines():
                    if running.search(line):
                        start_wall = log_time(line)
            if finished in text:
                time.sleep(1.0)
                break
            if daemon.poll() is not None:
                raise SystemExit(f"kwsd exited ({daemon.returncode}):\n{text[-3000:]}")
            time.sleep(0.2)
        else:
            raise SystemExit("timed out waiting for the replay to finish")
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(15)
        sub.disconnect()
        sub.loop_stop()
        broker.terminate()
        broker.wait(5)
    if start_wall is None:
        raise SystemExit(f"no 'input ... running' line in {log_path}")
    if any(ev["siteId"] != "bench" for _, ev in arrivals):
        raise SystemExit("a wake from an unexpected site arrived")

    lat, reported = [], []
    print(f"{'recording':<58} {'end s':>7} {'latency ms':>10} {'payload ms':>10}")
    for arrival, ev in arrivals:
        name = next((n for a, b, n in bounds if a <= ev["end"] <= b + args.gap), "?")
        ms = (arrival - (start_wall + ev["end"])) * 1000
        lat.append(ms)
        reported.append(float(ev["latency"]))
        print(f"{name:<58} {ev['end']:7.2f} {ms:10.0f} {ev['latency']:10.0f}")
    print(f"detected {len(arrivals)} of {len(files)}")
    if not lat:
        return 1
    lat_sorted = sorted(lat)
    p90 = lat_sorted[min(len(lat) - 1, int(0.9 * len(lat)))]
    print(f"latency (arrival - keyword end): median {statistics.median(lat):.0f} ms, p90 {p90:.0f} ms, "
          f"worst {max(lat):.0f} ms, best {min(lat):.0f} ms")
    print(f"payload latency field (in the daemon, samples): median {statistics.median(reported):.0f} ms, "
          f"worst {max(reported):.0f} ms")
    step_ms = FRAME_MS * int(args.detector.get("step_frames", DetectorSettings().step_frames))
    print(f"of which the model's look-ahead {LOOKAHEAD_MS} ms is fixed, and the detector step adds 0..{step_ms} ms "
          f"(mean {step_ms // 2}); the rest ({statistics.median(lat) - LOOKAHEAD_MS - step_ms / 2:.0f} ms at the "
          "median) is decoding, the replay's 20 ms blocks, the pipeline's wake-up and MQTT delivery")
    if args.keep:
        print(f"work folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
