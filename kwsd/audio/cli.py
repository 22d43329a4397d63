"""``kwsd devices``: the capture devices a config can name, with rate and channel count."""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "devices",
        help="list capture devices (ALSA via PortAudio, PulseAudio sources) to use as inputs[].device",
        description="List what an input can capture from, by the name inputs[].device takes: PulseAudio "
        "sources (with rate and channel count) and ALSA capture cards. Names are stable across reboots; "
        "device numbers are not.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kwsd.audio import portaudio, pulse

    print("PulseAudio sources (inputs[].device: NAME):")
    try:
        sources = pulse.list_sources()
    except pulse.PulseError as exc:
        print(f"  (none: {exc})")
    else:
        for s in sources:
            note = "  [monitor of an output]" if s.monitor else ""
            print(f"  {s.name:<40} {s.rate:>6} Hz {s.channels:>3} ch  {s.description}{note}")
        if not sources:
            print("  (none)")
    print("ALSA capture devices (inputs[].device: NAME, or hw:CARD=<card>,DEV=<n> by card name):")
    sd = portaudio.sounddevice()
    found = 0
    plugins: list[str] = []
    for d in sd.query_devices():
        if d["max_input_channels"] <= 0 or d["name"].startswith(portaudio.SLOT_PREFIX):
            continue
        if "(hw:" not in d["name"]:
            # An ALSA plugin (pulse, default, dsnoop, ...), not a card: PortAudio reports whatever channel count
            # the plugin accepts (32 for pulse), which says nothing about a microphone.
            plugins.append(d["name"])
            continue
        found += 1
        print(f"  {d['name']:<40} {int(d['default_samplerate']):>6} Hz {d['max_input_channels']:>3} ch")
    if not found:
        print("  (none: no sound card)")
    if plugins:
        print(f"ALSA plugins, not cards ({', '.join(plugins)}): 'default' and 'pulse' record the default "
              "PulseAudio source; name a source above instead")
    return 0
