"""Capture through a real PulseAudio server: named sources, exact samples, resampled channels,
unplug/replug."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kwsd.audio.hub import AudioHub
from kwsd.settings import InputSettings
from tests.fixtures_pulse import PulseServer

pytestmark = pytest.mark.pulse


def collect(hub: AudioHub, sites: list[str], seconds: float, until=None) -> dict[str, tuple[np.ndarray, int]]:
    """Read every site for at most ``seconds``; returns the concatenated samples and the first index per
    site."""
    got: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    first: dict[str, int] = {}
    nxt: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        hub.wait(0.05)
        for s in sites:
            data, start = hub.read(s)
            if data.size:
                first.setdefault(s, start)
                assert start == nxt.get(s, start), "indices must be contiguous while a source runs"
                nxt[s] = start + data.size
                got[s].append(data)
        if until is not None and until(got):
            break
    return {s: (np.concatenate(got[s]) if got[s] else np.zeros(0, np.int16), first.get(s, -1)) for s in sites}


def peak_hz(x: np.ndarray, rate: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(x.size)))
    return float(np.argmax(spec) * rate / x.size)


def test_16k_source_arrives_bit_exact(pulse_server: PulseServer) -> None:
    src = pulse_server.pipe_source("exact16", 16000, 1)
    rng = np.random.default_rng(1)
    signal = rng.integers(-20000, 20000, 16000 * 2, dtype=np.int16)
    marker = np.array([12345, -23456, 7, -7, 32767, -32768], dtype=np.int16)
    payload = np.concatenate([np.zeros(1600, np.int16), marker, signal])
    stop = threading.Event()
    hub = AudioHub([InputSettings(device="exact16", sites={0: "kitchen"})], stop)
    hub.start()
    try:
        assert hub.sites() == ["kitchen"]
        time.sleep(0.3)  # the stream is connected before the payload starts
        feeder = src.play(payload)

        def complete(got):
            x = np.concatenate(got["kitchen"]) if got["kitchen"] else np.zeros(0, np.int16)
            return feeder.done.is_set() and x.size > 16000 * 3

        got, _first = collect(hub, ["kitchen"], 8.0, complete)["kitchen"]
        hits = [i for i in range(got.size - marker.size) if np.array_equal(got[i : i + marker.size], marker)]
        assert len(hits) == 1, "the marker arrives once, unchanged"
        i = hits[0] + marker.size
        assert np.array_equal(got[i : i + signal.size], signal)
        st = hub.status()["exact16"]
        assert st.state == "running" and st.rate == 16000 and st.channels == 1 and st.overruns == 0
    finally:
        stop.set()
        hub.stop()
        pulse_server.remove(src)


def test_48k_stereo_is_resampled_per_channel(pulse_server: PulseServer) -> None:
    src = pulse_server.pipe_source("stereo48", 48000, 2)
    t = np.arange(48000 * 3) / 48000
    frames = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 1250 * t)], axis=1) * 10000
    stop = threading.Event()
    hub = AudioHub([InputSettings(device="stereo48", sites={0: "left_room", 1: "right_room"})], stop)
    hub.start()
    try:
        src.play(frames.astype(np.int16))
        res = collect(hub, hub.sites(), 6.0, lambda g: sum(map(len, g["right_room"])) > 16000 * 2)
        left, right = res["left_room"][0], res["right_room"][0]
        assert left.size > 16000 * 2 and right.size > 16000 * 2
        assert abs(peak_hz(left[8000:24000]) - 440) < 3
        assert abs(peak_hz(right[8000:24000]) - 1250) < 3
        assert 9000 < np.abs(left[8000:24000]).max() < 10500, "gain is kept through resampling"
        st = hub.status()["stereo48"]
        assert (st.rate, st.channels) == (48000, 2)
    finally:
        stop.set()
        hub.stop()
        pulse_server.remove(src)


def test_unplug_and_replug_resumes_without_restart(pulse_server: PulseServer) -> None:
    src = pulse_server.pipe_source("usbmic", 16000, 1)
    other = pulse_server.pipe_source("steady", 16000, 1)
    tone = (np.sin(2 * np.pi * 500 * np.arange(16000 * 30) / 16000) * 3000).astype(np.int16)
    stop = threading.Event()
    hub = AudioHub(
        [
            InputSettings(device="usbmic", sites={0: "hall"}, stall_timeout=1.0, reopen_backoff=(0.2, 2.0)),
            InputSettings(device="steady", sites={0: "office"}),
        ],
        stop,
    )
    hub.start()
    try:
        src.play(tone)
        other.play(tone)
        before = collect(hub, ["hall", "office"], 3.0, lambda g: sum(map(len, g["hall"])) > 8000)
        assert before["hall"][0].size > 8000
        end_before = before["hall"][1] + before["hall"][0].size

        pulse_server.unload(src)  # unplug
        deadline = time.monotonic() + 5
        while hub.status()["usbmic"].state != "reopening" and time.monotonic() < deadline:
            time.sleep(0.05)
        st = hub.status()["usbmic"]
        assert st.state == "reopening", st
        assert "usbmic" in st.last_error
        during = collect(hub, ["hall", "office"], 1.0)
        assert during["office"][0].size > 8000, "the other input keeps capturing"
        assert hub.status()["steady"].state == "running"

        src.reload()  # replug
        src.play(tone)
        t_replug = time.monotonic()
        after = collect(hub, ["hall"], 5.0, lambda g: sum(map(len, g["hall"])) > 8000)
        assert after["hall"][0].size > 8000, "capture resumed after the source came back"
        assert time.monotonic() - t_replug < 3.0
        assert after["hall"][1] >= end_before, "the index keeps increasing across the reopen"
        st = hub.status()["usbmic"]
        assert st.state == "running" and st.reopens >= 1
    finally:
        stop.set()
        hub.stop()
        pulse_server.remove(src)
        pulse_server.remove(other)


def test_missing_source_is_an_error_naming_it(pulse_server: PulseServer) -> None:
    stop = threading.Event()
    hub = AudioHub([InputSettings(device="no_such_source", reopen_backoff=(5.0, 5.0))], stop)
    hub.start()
    try:
        deadline = time.monotonic() + 5
        while not hub.status()["no_such_source"].last_error and time.monotonic() < deadline:
            time.sleep(0.05)
        st = hub.status()["no_such_source"]
        assert st.state == "reopening"
        assert "PulseAudio source 'no_such_source' not found" in st.last_error
    finally:
        stop.set()
        t0 = time.monotonic()
        hub.stop()
        assert time.monotonic() - t0 < 2.0, "stop never waits out a backoff"
