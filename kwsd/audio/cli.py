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
        description="List what an input can capture from, by the name inputs[].device takes: PulseAudio "
        "sources (with rate and channel count) and ALSA capture cards. Names are stable across reboots; "
        "device numbers are not. Then the execution provider the model really runs on, and why not the GPU.",
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
    return _print_inference(args)


def _print_inference(args: argparse.Namespace) -> int:
    from kwsd import settings
    from kwsd.kws.session import describe_runtime

    config = getattr(args, "config", None)
    try:
        s = settings.load(config) if config else settings.Settings()
    except settings.ConfigError as exc:
        log.error("%s", exc)
        return 2
    path = s.model.path
    if not config:  # no config: the installed model or the checkout's, as kwsd detect finds it
        from kwsd.model.locate import default_model

        path = default_model()
    print(f"Inference (model.providers {', '.join(s.model.providers)}; model {path}):")
    print(f"  {describe_runtime(path, s.model.providers)}")
    return 0
