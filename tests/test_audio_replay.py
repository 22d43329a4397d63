"""Replay inputs (WAV file, stdin) and input settings validation."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from kwsd import settings
from kwsd.audio.hub import AudioHub
from kwsd.settings import InputSettings
from tests.conftest import REPO


def write_wav(path: Path, frames: np.ndarray, rate: int) -> Path:
    frames = frames.reshape(frames.shape[0], -1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.astype("<i2").tobytes())
    return path


def drain(hub: AudioHub, timeout: float) -> dict[str, np.ndarray]:
    got: dict[str, list[np.ndarray]] = {s: [] for s in hub.sites()}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hub.wait(0.05)
        for s in got:
            data, _ = hub.read(s)
            got[s].append(data)
        if all(st.state == "finished" for st in hub.status().values()):
            for s in got:
                got[s].append(hub.read(s)[0])
            break
    return {s: np.concatenate(v) for s, v in got.items()}


def test_file_replay_fast_is_exact_and_quick(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(-30000, 30000, 16000 * 20, dtype=np.int16)
    wav = write_wav(tmp_path / "long.wav", x, 16000)
    stop = threading.Event()
    hub = AudioHub([InputSettings(device=str(wav), realtime=False, buffer_seconds=2.0)], stop)
    t0 = time.monotonic()
    hub.start()
    got = drain(hub, 20.0)[str(wav)]
    elapsed = time.monotonic() - t0
    hub.stop()
    assert np.array_equal(got, x), "fast replay loses nothing even with a ring shorter than the file"
    assert elapsed < 10.0, f"20 s of audio took {elapsed:.1f} s"
    st = hub.status()[str(wav)]
    assert st.state == "finished" and st.samples == x.size and st.overruns == 0


def test_file_replay_realtime_44k_stereo(tmp_path: Path) -> None:
    t = np.arange(44100) / 44100
    frames = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 2000 * t)], 1) * 8000
    wav = write_wav(tmp_path / "st.wav", frames.astype(np.int16), 44100)
    stop = threading.Event()
    hub = AudioHub([InputSettings(device=str(wav), sites={0: "a", 1: "b"})], stop)
    t0 = time.monotonic()
    hub.start()
    got = drain(hub, 5.0)
    elapsed = time.monotonic() - t0
    hub.stop()
    assert 0.9 < elapsed < 2.0, f"1 s of audio replayed in {elapsed:.2f} s"
    assert got["a"].size == got["b"].size == 16000
    for site, hz in (("a", 300), ("b", 2000)):
        spec = np.abs(np.fft.rfft(got[site][1000:15000].astype(float) * np.hanning(14000)))
        assert abs(np.argmax(spec) * 16000 / 14000 - hz) < 3


def test_stdin_replay(tmp_path: Path) -> None:
    x = (np.arange(48000 * 2) % 2000 - 1000).astype("<i2").reshape(-1, 2)
    code = (
        "import sys, threading, time; from kwsd.audio.hub import AudioHub;"
        "from kwsd.settings import InputSettings;"
        "hub = AudioHub([InputSettings(device='-', rate=48000, channels=2, sites={1: 'r'}, realtime=False)],"
        " threading.Event()); hub.start(); n = 0; t = time.monotonic() + 20\n"
        "while time.monotonic() < t and hub.status()['-'].state != 'finished' or hub.wait(0.2):\n"
        "    n += hub.read('r')[0].size\n"
        "print(n, hub.status()['-'].state); hub.stop()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=x.tobytes(), capture_output=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["16000", "finished"]  # 1 s at 48 kHz -> 16000 samples


def test_missing_file_fails_naming_it(tmp_path: Path) -> None:
    stop = threading.Event()
    path = str(tmp_path / "nope.wav")
    hub = AudioHub([InputSettings(device=path)], stop)
    hub.start()
    deadline = time.monotonic() + 5
    while hub.status()[path].state != "failed" and time.monotonic() < deadline:
        time.sleep(0.02)
    hub.stop()
    assert hub.status()[path].state == "failed" and "nope.wav" in hub.status()[path].last_error


def test_settings_errors_name_the_key() -> None:
    with pytest.raises(settings.ConfigError, match=r"inputs\[0\]\.sites\.8: channel 8 is out of range"):
        settings.loads("inputs: [{device: card, channels: 8, sites: {0: a, 8: b}}]")
    with pytest.raises(settings.ConfigError, match=r"inputs\[0\]\.rate"):
        settings.loads("inputs: [{device: card, rate: -1}]")
    ok = settings.loads("inputs: [{device: 'hw:CARD=USB,DEV=0', rate: 48000, channels: 2, sites: {1: hall}}]")
    assert ok.inputs[0].site_map() == {1: "hall"}
    with pytest.raises(ValueError, match="siteId 'x' is already used by inputs\\[0\\]"):
        AudioHub([InputSettings(device="a", name="x"), InputSettings(device="b", sites={0: "x"})],
        threading.Event())


def test_wait_returns_when_a_site_reaches_its_target(tmp_path: Path) -> None:
    """The reader sleeps until the audio it asked for is there, not per capture block; wake() cuts it short."""
    wav = write_wav(tmp_path / "t.wav", np.zeros((16000 * 3, 1), np.int16), 16000)
    stop = threading.Event()
    hub = AudioHub([InputSettings(device=str(wav), block_ms=20)], stop)
    site = hub.sites()[0]
    hub.start()
    try:
        assert hub.wait(2.0), "no audio at all"
        target = hub.end(site) + 8000  # half a second of real-time replay away
        t0 = time.monotonic()
        assert hub.wait(3.0, {site: target})
        elapsed = time.monotonic() - t0
        assert hub.end(site) >= target
        assert elapsed > 0.4, f"woke after {elapsed:.3f} s, before the target could have been captured"
        # A target already reached returns at once; a far one is cut short by wake().
        t0 = time.monotonic()
        assert hub.wait(3.0, {site: 0})
        assert time.monotonic() - t0 < 0.2
        threading.Timer(0.2, hub.wake).start()
        t0 = time.monotonic()
        assert hub.wait(3.0, {site: hub.end(site) + 10 * 16000})
        assert 0.15 < time.monotonic() - t0 < 1.5
    finally:
        hub.stop()


def test_audio_is_taken_over_while_nobody_reads_and_nothing_is_lost(tmp_path: Path) -> None:
    """The reader takes capture blocks over itself, once per wait; a reader that stays away loses nothing while
    it is within the buffer (the input's own thread takes the audio over), and the count of samples goes on."""
    rng = np.random.default_rng(5)
    x = rng.integers(-20000, 20000, 16000 * 4, dtype=np.int16)
    wav = write_wav(tmp_path / "r.wav", x, 16000)
    stop = threading.Event()
    hub = AudioHub([InputSettings(device=str(wav), buffer_seconds=4.0)], stop)
    site = hub.sites()[0]
    hub.start()
    try:
        time.sleep(2.5)  # nobody reads: more than a quarter of the buffer waits in the capture ring
        st = hub.status()[str(wav)]
        assert st.samples >= 16000, f"only {st.samples} samples taken over while nobody read"
        assert hub.end(site) >= 2 * 16000
        got = drain(hub, 5.0)[site]
    finally:
        hub.stop()
    assert np.array_equal(got, x)
    st = hub.status()[str(wav)]
    assert st.state == "finished" and st.samples == x.size and st.overruns == 0
