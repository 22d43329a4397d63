"""``kwsd devices`` against the real PulseAudio test server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.fixtures_pulse import PulseServer

# The ``devices`` command as ``kwsd devices`` registers it (fresh process: PortAudio enumerates at start-up).
DEVICES = (
    "import argparse, sys; from kwsd.audio import cli; p = argparse.ArgumentParser(prog='kwsd'); "
    "cli.register(p.add_subparsers()); a = p.parse_args(['devices']); sys.exit(a.func(a))"
)


@pytest.mark.pulse
def test_devices_lists_pulse_sources_by_name(pulse_server: PulseServer) -> None:
    src = pulse_server.pipe_source("cli_room48", 48000, 2)
    try:
        out = subprocess.run(
            [sys.executable, "-c", DEVICES],
            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60, cwd=REPO,
        )
        assert out.returncode == 0, out.stderr
        line = next(x for x in out.stdout.splitlines() if "cli_room48" in x)
        assert "48000 Hz" in line and "2 ch" in line
        assert "vsink.monitor" in out.stdout
        assert "ALSA capture devices" in out.stdout and "default" in out.stdout
        # PulseAudio's ALSA plugins are named as what they are, not listed as 32-channel cards
        alsa = out.stdout.split("ALSA capture devices", 1)[1].splitlines()
        assert alsa[1] == "  (none: no sound card)", out.stdout
        assert alsa[2].startswith("ALSA plugins, not cards (") and "pulse" in alsa[2] and " ch" not in alsa[2]
        assert "kwsd_slot_" not in out.stdout
    finally:
        pulse_server.remove(src)
