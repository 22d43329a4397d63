#!/usr/bin/env python3
"""Daemon figures: start-up time to READY=1, CPU use and resident memory with 1 and 8 sites.

Runs ``kwsd run`` as systemd would (a NOTIFY_SOCKET), with a private mosquitto on a loopback port and a WAV file
input replayed at real-time pace: one channel per site, each channel a different stretch of the real recordings
(KWSD_TEST_AUDIO) or silence, and once with no input at all. Prints one table, then per case the CPU and wake-ups
per second of each thread (from /proc/<pid>/task/*: utime+stime, and voluntary context switches, i.e. how often a
thread blocked and was woken again), by the thread's kernel name (kwsd names its own threads ``kwsd-<part>``).

    .venv/bin/python scripts/bench_daemon.py [--seconds 20] [--threads]
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
from typing import Any

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


def thread_stats(pid: int) -> dict[str, tuple[float, int, int]]:
    """Per thread name: (CPU seconds, voluntary context switches, threads), summed over threads of that name."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[float, int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        vol = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("voluntary_ctxt"))
        c, v, n = out.get(name, (0.0, 0, 0))
        out[name] = (c + cpu, v + vol, n + 1)
    return out


def run_case(sites: int, idle: bool, seconds: float, audio: np.ndarray, tmp: Path, port: int,
             model: Path, detector: dict[str, Any]) -> dict[str, Any]:
    inputs: list[dict[str, Any]] = []
    if sites:
        n = int((seconds + 10) * 16000)
        chans = np.zeros((n, sites), dtype=np.int16)
        if not idle:
            for i in range(sites):
                start = (i * 7 * 16000) % max(1, audio.size - n)
                chans[:, i] = np.resize(audio[start:], n)
        wav = tmp / f"in{sites}{'i' if idle else ''}.wav"
        write_wav(wav, chans)
        inputs.append({"device": str(wav), "kind": "file", "realtime": True,
                       "sites": {i: f"site{i}" for i in range(sites)}})
    cfg = {
        "model": {"path": str(model), "providers": ["CPUExecutionProvider"]},
        "detector": detector,
        "inputs": inputs,
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
        threads0 = thread_stats(proc.pid)
        w0 = time.monotonic()
        time.sleep(seconds)
        cpu1, rss = proc_stats(proc.pid)
        threads1 = thread_stats(proc.pid)
        wall = time.monotonic() - w0
    finally:
        proc.terminate()
        proc.wait(10)
        sock.close()
    threads = {}
    for name, (c1, v1, count) in threads1.items():
        c0, v0, _ = threads0.get(name, (0.0, 0, 0))
        threads[name] = (100 * (c1 - c0) / wall, (v1 - v0) / wall, count)
    wakeups = sum(w for _, w, _ in threads.values())
    return {"ready_s": ready, "cpu_pct": 100 * (cpu1 - cpu0) / wall, "rss_mb": rss / 2**20,
            "wakeups": wakeups, "threads": threads}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="measurement window per case")
    default_model = os.environ.get("KWSD_MODEL", str(REPO / "models/kwsd-xiaoyun.onnx"))
    ap.add_argument("--model", type=Path, default=Path(default_model))
    ap.add_argument("--threads", action="store_true", help="also print CPU and wake-ups/s per thread")
    ap.add_argument("--detector", type=yaml.safe_load, default={},
                    help="detector settings for the daemon, as YAML (e.g. '{step_frames: 1, quiet_step_frames: 6}')")
    ap.add_argument("--cases", default="0,1s,1,8s,8",
                    help="cases to run: sites, 's' for silence (default 0,1s,1,8s,8)")
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
            cases = [(int(c.rstrip("s")), c.endswith("s") or c == "0") for c in args.cases.split(",")]
            for sites, idle in cases:
                r = run_case(sites, idle, args.seconds, audio, tmp, port, args.model, args.detector)
                rows.append((sites, "none" if not sites else "silence" if idle else "speech", r))
        finally:
            broker.terminate()
            broker.wait(10)
    print(f"kwsd run, real-time file input, {args.seconds:.0f} s window, {os.cpu_count()} CPUs")
    print(f"{'sites':>5} {'audio':>8} {'READY (s)':>10} {'CPU % of one core':>18} {'wake-ups/s':>11} "
          f"{'RSS (MiB)':>10}")
    for sites, kind, r in rows:
        print(f"{sites:>5} {kind:>8} {r['ready_s']:>10.2f} {r['cpu_pct']:>18.2f} {r['wakeups']:>11.1f} "
              f"{r['rss_mb']:>10.1f}")
    if args.threads:
        for sites, kind, r in rows:
            print(f"\nthreads, {sites} site(s), {kind}: {'CPU %':>7} {'wake-ups/s':>11}")
            busy = sorted(r["threads"].items(), key=lambda kv: (-kv[1][0], -kv[1][1]))
            for name, (cpu, wake, count) in busy:
                if cpu >= 0.005 or wake >= 0.05:
                    label = f"{name} (x{count})" if count > 1 else name
                    print(f"  {label:<34} {cpu:>7.2f} {wake:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
