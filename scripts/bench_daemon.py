#!/usr/bin/env python3
"""Daemon figures: start-up time to READY=1, CPU use and resident memory with 1 and 8 sites.

Runs ``kwsd run`` as systemd would (a NOTIFY_SOCKET), with a private mosquitto on a loopback port and a WAV file
input replayed at real-time pace: one channel per site, each channel a different stretch of the real recordings
(KWSD_TEST_AUDIO) or silence (``--idle``). Prints one table.

    .venv/bin/python scripts/bench_daemon.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kwsd.audio.wavfile import read_wav  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_wav(path: Path, channels: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels.shape[1])
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(channels.astype("<i2").tobytes())


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds used, resident bytes) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def run_case(sites: int, idle: bool, seconds: float, audio: np.ndarray, tmp: Path, port: int,
             model: Path) -> dict[str, float]:
    n = int((seconds + 10) * 16000)
    chans = np.zeros((n, sites), dtype=np.int16)
    if not idle:
        for i in range(sites):
            start = (i * 7 * 16000) % max(1, audio.size - n)
            chans[:, i] = np.resize(audio[start:], n)
    wav = tmp / f"in{sites}{'i' if idle else ''}.wav"
    write_wav(wav, chans)
    cfg = {
        "model": {"path": str(model), "providers": ["CPUExecutionProvider"]},
        "inputs": [{"device": str(wav), "kind": "file", "realtime": True,
                    "sites": {i: f"site{i}" for i in range(sites)}}],
        "mqtt": {"host": "127.0.0.1", "port": port},
        "segments": {"enabled": True},
        "service": {"state_dir": str(tmp / "state"), "log_level": "warning"},
    }
    conf = tmp / "config.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    sock_path = tmp / "notify.sock"
    sock_path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "kwsd", "run", "--config", str(conf)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while b"READY=1" not in sock.recv(4096):
            pass
        ready = time.monotonic() - t0
        time.sleep(2.0)  # let the start-up settle
        cpu0, _ = proc_stats(proc.pid)
        w0 = time.monotonic()
        time.sleep(seconds)
        cpu1, rss = proc_stats(proc.pid)
        wall = time.monotonic() - w0
    finally:
        proc.terminate()
        proc.wait(10)
        sock.close()
    return {"ready_s": ready, "cpu_pct": 100 * (cpu1 - cpu0) / wall, "rss_mb": rss / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="measurement window per case")
    default_model = os.environ.get("KWSD_MODEL", str(REPO / "models/kwsd-xiaoyun.onnx"))
    ap.add_argument("--model", type=Path, default=Path(default_model))
    args = ap.parse_args()
    audio_dir = Path(os.environ.get("KWSD_TEST_AUDIO", ""))
    files = sorted(audio_dir.glob("*/*.wav"))
    if not files:
        print("set KWSD_TEST_AUDIO to the folder of recordings", file=sys.stderr)
        return 2
    audio = np.concatenate([read_wav(f) for f in files]).astype(np.int16)
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        port = free_port()
        (tmp / "m.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n")
        broker = subprocess.Popen([mosquitto, "-c", str(tmp / "m.conf")], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            rows = []
            for sites, idle in ((1, True), (1, False), (8, True), (8, False)):
                r = run_case(sites, idle, args.seconds, audio, tmp, port, args.model)
                rows.append((sites, "silence" if idle else "speech", r))
        finally:
            broker.terminate()
            broker.wait(10)
    print(f"kwsd run, real-time file input, {args.seconds:.0f} s window, {os.cpu_count()} CPUs")
    print(f"{'sites':>5} {'audio':>8} {'READY (s)':>10} {'CPU % of one core':>18} {'RSS (MiB)':>10}")
    for sites, kind, r in rows:
        print(f"{sites:>5} {kind:>8} {r['ready_s']:>10.2f} {r['cpu_pct']:>18.1f} {r['rss_mb']:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
