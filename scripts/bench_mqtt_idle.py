#!/usr/bin/env python3
"""Idle cost of a connected MQTT publisher: thread wake-ups per second and CPU, per thread of this process.

Starts a private mosquitto on a loopback port, connects a ``Publisher`` (two sites, Hermes, Home Assistant,
satellites on), waits for it to settle, then samples ``/proc/self/task/*/status`` (context switches: every
switch is a wake-up of that thread) and ``/proc/self/task/*/stat`` (CPU ticks) over ``--seconds``. With
``--wakes N`` it also publishes N wake events per second during the window, to show the cost per message.
With ``--latency N`` it then hands over N wakes, 50 ms apart, and prints the time from ``put_wake`` to their
arrival at a subscriber (p50, p99).

    .venv/bin/python scripts/bench_mqtt_idle.py [--seconds 20] [--wakes 0] [--latency 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kwsd.mqtt.messages import WakeEvent  # noqa: E402
from kwsd.settings import MqttSettings, SatelliteSettings  # noqa: E402
from tests.fixtures_broker import Broker, Subscriber  # noqa: E402

try:
    from kwsd.mqtt.publisher import Publisher
except ImportError:  # the layout before connection.py/publisher.py
    from kwsd.mqtt.client import Publisher  # type: ignore[no-redef]

TICK = os.sysconf("SC_CLK_TCK")


def task_sample() -> dict[int, tuple[str, int, int]]:
    """tid -> (thread name, context switches, CPU ticks)."""
    out: dict[int, tuple[str, int, int]] = {}
    for entry in os.scandir("/proc/self/task"):
        try:
            status = Path(entry.path, "status").read_text()
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        switches = int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])
        rest = stat[stat.rindex(")") + 2 :].split()
        ticks = int(rest[11]) + int(rest[12])  # utime + stime
        out[int(entry.name)] = (fields["Name"].strip(), switches, ticks)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the measured window")
    ap.add_argument("--wakes", type=float, default=0.0, help="wake events per second during the window")
    ap.add_argument("--latency", type=int, default=0, help="wakes whose hand-over-to-arrival time is measured")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="kwsd-bench-mqtt-") as tmp:
        broker = Broker(Path(tmp) / "broker")
        broker.start()
        settings = MqttSettings(
            host="127.0.0.1", port=broker.port, client_id="bench", satellites=SatelliteSettings(enabled=True)
        )
        pub = Publisher(settings, Path(tmp) / "outbox", ["kitchen", "hall"])
        pub.start()
        deadline = time.monotonic() + 10
        while not pub.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pub.connected:
            print("publisher did not connect", file=sys.stderr)
            return 1
        time.sleep(2.0)  # retained announcements and subscriptions settle
        main_tid = threading.get_native_id()
        before = task_sample()
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < args.seconds:
            if args.wakes > 0:
                ev = WakeEvent("kitchen", "xiaoyun", "小云小云", 0.9, 0.2, n, n + 0.8, f"s{n}")
                (getattr(pub, "put_wake", None) or pub.publish_wake)(ev)
                n += 1
                time.sleep(1.0 / args.wakes)
            else:
                time.sleep(args.seconds)
        elapsed = time.monotonic() - t0
        after = task_sample()
        lat: list[float] = []
        if args.latency:
            sub = Subscriber(broker, "kwsd/lat/wake")
            put = getattr(pub, "put_wake", None) or pub.publish_wake
            for i in range(args.latency):
                t = time.perf_counter()
                put(WakeEvent("lat", "xiaoyun", "小云小云", 0.9, 0.2, i, i + 0.8, f"l{i}"))
                sub.wait_for(i + 1, "kwsd/lat/wake")
                lat.append(time.perf_counter() - t)
                time.sleep(0.05)
            sub.close()
        pub.stop()
        broker.stop()

    print(f"MQTT publisher, connected, {args.wakes:g} wakes/s, {elapsed:.1f} s window ({Publisher.__module__})")
    print(f"{'thread':<20} {'wake-ups/s':>11} {'CPU %':>7}")
    total_w = total_c = 0.0
    for tid, (name, sw, ticks) in sorted(after.items()):
        if tid == main_tid or tid not in before:
            continue  # the measuring thread itself, or a thread that started inside the window
        w = (sw - before[tid][1]) / elapsed
        c = 100.0 * (ticks - before[tid][2]) / TICK / elapsed
        total_w += w
        total_c += c
        print(f"{name:<20} {w:>11.2f} {c:>7.2f}")
    print(f"{'all but main':<20} {total_w:>11.2f} {total_c:>7.2f}")
    if lat:
        lat.sort()
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(f"put_wake -> subscriber, {len(lat)} wakes: p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
