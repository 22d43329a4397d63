#!/usr/bin/env python3
"""Start-up figures, whole process: ``kwsd detect`` on one ~10 s clip and on every dev clip (with the real-time
factor: wall time / seconds of audio), and ``kwsd run`` to READY=1, each against its target.

Each checkout given (default: this one) is measured with its own virtual environment, the runs interleaved so a
shared machine's load falls on all of them alike; prints median and best of ``--runs``. kwsd runs as an installed
copy does, from compiled bytecode (``PYTHONPYCACHEPREFIX`` in a temporary folder, filled by a first run that is not
counted; the checkout is not written to); ``--no-bytecode`` also times ``detect`` compiling kwsd's modules from
source on every start, as a checkout run with ``PYTHONDONTWRITEBYTECODE=1`` does.

    KWSD_TEST_AUDIO=../shared/audio/xiaoyun .venv/bin/python scripts/bench_startup.py [--runs 7]
        [--checkout ../main ...] [--no-bytecode]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


TARGETS = {"detect, 1 clip": 0.4, "detect, all clips": 1.0, "run to READY=1": 1.0}
"""Whole-process seconds each case should stay under."""
RTF_TARGET = 0.002
"""Real-time factor of ``detect`` on all clips: whole-process wall time / seconds of audio."""
ENV: dict[str, str] = {}
"""The environment of every timed command (set in main)."""


CPU: dict[str, list[float]] = {}
"""CPU seconds (user + system) of each timed command, per case: unlike wall time, barely moved by other load."""


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, case: str = "") -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                       env=env or ENV)
    took = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-500:]}")
    if case:
        CPU.setdefault(case, []).append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return took


def time_to_ready(python: Path, cwd: Path, model: Path, tmp: Path) -> float:
    """``kwsd run`` with one silent real-time WAV input and no MQTT, as systemd starts it (NOTIFY_SOCKET)."""
    wav = tmp / "silence.wav"
    if not wav.exists():
        import wave

        with wave.open(str(wav), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(b"\0\0" * 16000 * 30)
    conf = tmp / "config.yaml"
    conf.write_text(yaml.safe_dump({
        "model": {"path": str(model), "providers": ["CPUExecutionProvider"]},
        "inputs": [{"device": str(wav), "kind": "file", "realtime": True, "sites": {0: "site0"}}],
        "mqtt": {"enabled": False},
        "service": {"state_dir": str(tmp / "state"), "log_level": "warning"},
    }))
    sock_path = tmp / "notify.sock"
    sock_path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        env = dict(ENV, NOTIFY_SOCKET=str(sock_path))
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(python), "-m", "kwsd", "run", "--config", str(conf)], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sock.settimeout(0.2)
        try:
            while time.perf_counter() - t0 < 60:
                if proc.poll() is not None:
                    sys.exit(f"{python} -m kwsd run exited with {proc.returncode} before READY=1 (in {cwd})")
                try:
                    if b"READY=1" in sock.recv(4096):
                        return time.perf_counter() - t0
                except TimeoutError:
                    pass
            sys.exit(f"{python} -m kwsd run sent no READY=1 within 60 s (in {cwd})")
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--checkout", type=Path, action="append",
                    help="a kwsd checkout with its own .venv (repeatable; default: this one)")
    ap.add_argument("--model", type=Path, help="exported model for every checkout (default: each one's own "
                    "models/kwsd-xiaoyun.onnx)")
    ap.add_argument("--no-bytecode", action="store_true",
                    help="also time detect with kwsd's modules compiled from source on every start")
    args = ap.parse_args()
    audio = Path(os.environ.get("KWSD_TEST_AUDIO", ""))
    clips = sorted(audio.glob("*/*.wav"))
    if not clips:
        sys.exit("set KWSD_TEST_AUDIO to the folder of recordings")
    seconds = {c: wav_seconds(c) for c in clips}
    audio_seconds = sum(seconds.values())
    one = min((c for c in clips if "positive" in str(c)), key=lambda c: abs(seconds[c] - 10.0))
    checkouts = [c.resolve() for c in (args.checkout or [REPO])]
    results: dict[tuple[Path, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ENV.update({k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
                   PYTHONPYCACHEPREFIX=str(tmp / "pycache"))
        source_env = dict(ENV, PYTHONDONTWRITEBYTECODE="1")
        source_env.pop("PYTHONPYCACHEPREFIX")
        for co in checkouts:  # the first run compiles the bytecode; not counted
            timed([str(co / ".venv/bin/python"), "-m", "kwsd", "detect", "--model",
                   str(args.model or co / "models/kwsd-xiaoyun.onnx"), str(one)], co)
        for _ in range(args.runs):
            for co in checkouts:
                python = co / ".venv/bin/python"
                model = args.model or co / "models/kwsd-xiaoyun.onnx"
                detect = [str(python), "-m", "kwsd", "detect", "--model", str(model)]
                results.setdefault((co, "detect, 1 clip"), []).append(
                    timed([*detect, str(one)], co, case=f"{co} 1"))
                results.setdefault((co, "detect, all clips"), []).append(
                    timed([*detect, *map(str, clips)], co, case=f"{co} all"))
                if args.no_bytecode:
                    results.setdefault((co, "detect, 1 clip, no .pyc"), []).append(
                        timed([*detect, str(one)], co, source_env))
                    results.setdefault((co, "detect, all clips, no .pyc"), []).append(
                        timed([*detect, *map(str, clips)], co, source_env))
                results.setdefault((co, "run to READY=1"), []).append(time_to_ready(python, co, model, tmp))
    load = os.getloadavg()
    print(f"whole-process wall time, {args.runs} runs each, interleaved; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"1 clip: {one.name} ({seconds[one]:.1f} s); all clips: {len(clips)} files, {audio_seconds:.1f} s of audio")
    print(f"{'checkout':<28} {'case':<28} {'median s':>9} {'best s':>7} {'target s':>9}      {'RTF median':>10} "
          f"{'RTF target':>10}")
    for (co, case), times in results.items():
        median = statistics.median(times)
        target = TARGETS.get(case.removesuffix(", no .pyc"))
        mark = f"{target:>9.2f} {'ok' if median <= target else 'OVER':<4}" if target else " " * 14
        rtf = ""
        if case.startswith("detect, all clips"):
            ratio = median / audio_seconds
            rtf = f"{ratio:>10.4f} {RTF_TARGET:>10.4f} {'ok' if ratio <= RTF_TARGET else 'OVER'}"
        print(f"{str(co)[-28:]:<28} {case:<28} {median:>9.3f} {min(times):>7.3f} {mark} {rtf}")
    print("CPU seconds (user + system, median) of the same runs: "
          + "; ".join(f"{str(co)[-28:]} detect 1 clip {statistics.median(CPU[f'{co} 1']):.3f}, all clips "
                      f"{statistics.median(CPU[f'{co} all']):.3f}" for co in checkouts))
    return 0


def wav_seconds(path: Path) -> float:
    import wave

    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


if __name__ == "__main__":
    raise SystemExit(main())
