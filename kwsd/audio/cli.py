"""``kwsd devices``: the capture devices a config can name, with rate and channel count."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "devices",
        help="list capture devices (ALSA via PortAudio, PulseAudio sources) to use as inputs[].device, and the "
             "execution provider the model runs on",
    )
    p.add_argument("--config", type=Path, help="config file whose model settings to check (default: built-in)")
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
    for d in sd.query_devices():
        if d["max_input_channels"] <= 0 or d["name"].startswith(portaudio.SLOT_PREFIX):
            continue
        found += 1
        print(f"  {d['name']:<40} {int(d['default_samplerate']):>6} Hz {d['max_input_channels']:>3} ch")
    if not found:
        print("  (none)")
    return _print_inference(args)


def _print_inference(args: argparse.Namespace) -> int:
    from kwsd import settings
    from kwsd.kws.session import describe_runtime

    try:
        s = settings.load(args.config) if getattr(args, "config", None) else settings.Settings()
    except settings.ConfigError as exc:
        log.error("%s", exc)
        return 2
    print(f"Inference (model.providers {', '.join(s.model.providers)}; model {s.model.path}):")
    print(f"  {describe_runtime(s.model.path, s.model.providers)}")
    return 0
