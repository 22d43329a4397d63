#!/usr/bin/env python3
"""Idle CPU and memory of ``kwsd run`` with one PulseAudio microphone: delivering silence, and absent (the daemon
waiting for it). Uses a private PulseAudio server (as the tests do) and no broker; prints one line per case.

    .venv/bin/python scripts/bench_idle.py [--seconds 15] [--rounds 2] [--repo CHECKOUT ...]

``--repo`` runs another checkout's kwsd with this environment (e.g. ``--repo /path/to/main --repo .`` compares
two versions, alternating, in one run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fixtures_pulse import PulseServer  # noqa: E402


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds used, resident bytes) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[21]) * os.sysconf(
        "SC_PAGE_SIZE")


def run_case(repo: Path, device: str, model: Path, tmp: Path, seconds: float) -> tuple[float, float]:
    cfg = {"model": {"path": str(model), "providers": ["CPUExecutionProvider"]},
           "inputs": [{"device": device, "kind": "pulse", "sites": {0: "room"}}],
           "mqtt": {"enabled": False}, "service": {"state_dir": str(tmp / "state"), "log_level": "warning"}}
    conf = tmp / "config.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "kwsd", "run", "--config", str(conf)], cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(6.0)  # start-up and warm-up
        if proc.poll() is not None:
            raise SystemExit(f"kwsd in {repo} exited with {proc.returncode}")
        cpu0, _ = proc_stats(proc.pid)
        t0 = time.monotonic()
        time.sleep(seconds)
        cpu1, rss = proc_stats(proc.pid)
        return 100 * (cpu1 - cpu0) / (time.monotonic() - t0), rss / 2**20
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0, help="measurement window per case")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repo", type=Path, action="append", help="checkout(s) to run (default: this one)")
    ap.add_argument("--model", type=Path,
                    default=Path(os.environ.get("KWSD_MODEL", str(REPO / "models/kwsd-xiaoyun.onnx"))))
    args = ap.parse_args()
    repos = [r.resolve() for r in args.repo] if args.repo else [REPO]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server = PulseServer(tmp / "pulse")
        os.environ["PULSE_SERVER"] = server.server
        mic = server.pipe_source("idle_mic", 16000, 1)
        mic.play(np.zeros(1600, dtype=np.int16))  # silence at real-time pace
        print(f"kwsd run, one PulseAudio mic, {args.seconds:.0f} s window, {os.cpu_count()} CPUs")
        try:
            for _ in range(args.rounds):
                for repo in repos:
                    for device, what in (("idle_mic", "mic, silence"), ("absent_mic", "mic absent")):
                        cpu, rss = run_case(repo, device, args.model, tmp, args.seconds)
                        print(f"{repo!s:30} {what:13} CPU {cpu:5.1f} % of one core  RSS {rss:6.1f} MiB",
                              flush=True)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
