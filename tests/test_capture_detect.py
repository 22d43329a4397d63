"""Detection through real PulseAudio capture: recordings played into pipe sources at real-time pace, captured by
the AudioHub and fed to the Detector the way the daemon does, including an unplug/replug of the source.

Timing: real-time playback dominates. Every clip is cut to the keyword (from ``detect_samples``' start/end) with
about a second of the recording before and after, then padded with 1 s of silence on each side (about 4.5 s in
all); clips that belong to one test play at the same time on different sources. Every wait is bounded and fails
with what it was waiting for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import correlate, resample_poly

from kwsd.audio.hub import AudioHub
from kwsd.audio.wavfile import read_wav
from kwsd.kws.detector import Detection, Detector, detect_samples
from kwsd.kws.session import ModelSession
from kwsd.settings import DetectorSettings, InputSettings
from tests.fixtures_pulse import PulseServer

pytestmark = pytest.mark.pulse

RATE = 16000
PAD = RATE  # silence played before and after each clip
TOLERANCE = 480  # one model frame: where the stream's first sample falls within the clip's framing
SOX = "20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_17.wav"


@pytest.fixture(scope="module")
def session(model_path: Path) -> ModelSession:
    return ModelSession(model_path, providers=["CPUExecutionProvider"])


def new_detector(session: ModelSession) -> Detector:
    return Detector(session, DetectorSettings())


@dataclass
class Clip:
    """Audio to play (int16, silence around it) and where the detector finds the keyword in it."""

    name: str
    payload: np.ndarray
    body: slice
    """The recorded part of ``payload`` (without the silence)."""
    expected: list[Detection]


def positive_clip(session: ModelSession, path: Path) -> Clip:
    """The keyword with 1 s of the recording before it and 0.8 s after, padded with silence."""
    audio = read_wav(path)
    [hit] = detect_samples(new_detector(session), path.name, audio)
    cut = audio[max(0, hit.start_sample - RATE) : hit.end_sample + int(0.8 * RATE)]
    return make_clip(session, path.name, cut)


def negative_clip(session: ModelSession, path: Path, seconds: float = 3.0) -> Clip:
    """The loudest ``seconds`` of a negative recording (where its speech is), padded with silence."""
    audio = read_wav(path)
    n = int(seconds * RATE)
    power = np.concatenate([[0.0], np.cumsum(audio.astype(np.float64) ** 2)])
    starts = np.arange(0, max(1, audio.size - n + 1), RATE // 10)
    start = int(starts[np.argmax(power[np.minimum(starts + n, audio.size)] - power[starts])])
    return make_clip(session, path.name, audio[start : start + n])


def make_clip(session: ModelSession, name: str, cut: np.ndarray) -> Clip:
    body = np.rint(cut).astype(np.int16)
    payload = np.concatenate([np.zeros(PAD, np.int16), body, np.zeros(PAD, np.int16)])
    expected = detect_samples(new_detector(session), name, payload.astype(np.float32))
    return Clip(name, payload, slice(PAD, PAD + body.size), expected)


@dataclass
class SiteLog:
    """What the detection loop saw on one site."""

    audio: list[np.ndarray] = field(default_factory=list)
    first: int = -1
    end: int = 0
    resets: list[int] = field(default_factory=list)
    reopened: bool = False
    """The input was reopened since this site's last read: reset the stream at the next data."""
    hits: list[Detection] = field(default_factory=list)

    def samples(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.int16)


class DetectionLoop:
    """The daemon's detection loop over an AudioHub: wait, read every site, accept, step.

    Index gaps: a site's index counts delivered samples, so after a reopen (unplug/replug, stall) it continues
    from where the old stream stopped and the two streams' audio lie next to each other with nothing between.
    Feeding across that seam would join audio from before the unplug with audio after it (features, model cache
    and decoder prefixes), so when an input's ``reopens`` count grows, the site's detector stream is reset to
    start at the first sample of the next read. The status is taken before the reads, and the hub raises
    ``reopens`` only after the old stream delivered its last sample and then sleeps ``reopen_backoff`` before
    opening again, so a read that follows a status with the old count never holds audio of the new stream; the
    old stream's unread tail (at most one poll's worth) goes to the new detector stream, which is harmless. A read
    that starts after the expected index (the reader fell more than ``buffer_seconds`` behind and the ring skipped
    audio) is a real gap and resets the stream the same way. Detection indices therefore stay in the hub's index
    space, which ``hub.history`` uses to cut segments.
    """

    def __init__(self, hub: AudioHub, detector: Detector) -> None:
        self.hub = hub
        self.detector = detector
        self.sites = {site: SiteLog() for site in hub.sites()}
        self._reopens: dict[str, int] = {}
        self._t0 = time.monotonic()

    def _reopened(self) -> set[str]:
        """Sites whose input was reopened since the last call."""
        out = set()
        for st in self.hub.status().values():
            for site in st.sites:
                if site in self._reopens and st.reopens != self._reopens[site]:
                    out.add(site)
                self._reopens[site] = st.reopens
        return out

    def run(self, until: Callable[[], bool], timeout: float, what: str) -> None:
        """Detect until ``until()`` holds; fail naming ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:g} s waiting for {what}; inputs: {self.hub.status()}")
            self.hub.wait(0.05)
            for site in self._reopened():
                self.sites[site].reopened = True
            for site, log in self.sites.items():
                data, start = self.hub.read(site)
                if data.size == 0:
                    continue
                if site not in self.detector.streams:
                    self.detector.add_stream(site, start)
                    log.first = start
                elif log.reopened or start != log.end:
                    self.detector.reset_stream(site, start)
                    log.resets.append(start)
                log.reopened = False
                if log.audio and start != log.end:
                    log.audio.append(np.zeros(start - log.end, np.int16))  # keep the log indexable
                log.audio.append(data)
                log.end = start + data.size
                if log.end - log.first > RATE * (1.5 * (time.monotonic() - self._t0) + 1.0):
                    pytest.fail(f"site {site} delivers faster than real time ({log.end - log.first} samples in "
                                f"{time.monotonic() - self._t0:.1f} s): its ALSA slot did not open the source")
                self.detector.accept(site, data)
            for hit in self.detector.step():
                self.sites[hit.stream].hits.append(hit)

    def index_of(self, site: str, part: np.ndarray, exact: bool) -> int:
        """Hub index at which ``part`` (16 kHz) begins in what ``site`` captured: an exact match, or the peak
        of the cross-correlation (resampled audio)."""
        log = self.sites[site]
        got = log.samples()
        assert got.size >= part.size, f"{site}: captured {got.size} samples, fewer than the {part.size} played"
        if exact:
            nz = int(np.flatnonzero(part)[0])
            for i in np.flatnonzero(got[nz : got.size - part.size + nz + 1] == part[nz]):
                if np.array_equal(got[i : i + part.size], part):
                    return log.first + int(i)
            pytest.fail(f"{site}: the played clip is not in the captured audio bit for bit")
        xc = correlate(got.astype(np.float64), part.astype(np.float64), mode="valid", method="fft")
        return log.first + int(np.argmax(xc))

    def captured_past(self, site: str, index: int) -> bool:
        return self.sites[site].end >= index


def wait_state(hub: AudioHub, name: str, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while hub.status()[name].state != state:
        if time.monotonic() > deadline:
            pytest.fail(f"input {name} did not reach state {state!r} within {timeout:g} s: {hub.status()[name]}")
        time.sleep(0.02)


def start_hub(inputs: list[InputSettings]) -> tuple[AudioHub, threading.Event]:
    """A running hub with ``inputs``, added one at a time, each once the previous one runs.

    Opening several PulseAudio inputs at the same moment can make one of them open its ALSA slot while alsa-lib
    still holds an older copy of kwsd's slot file (the file is replaced within the same second and ext4 gives
    the new file the inode of the one before; alsa-lib compares only device, inode and whole-second mtime), so
    the slot is ``type null`` and delivers zeros as fast as it is read. Adding the inputs one by one keeps these
    tests about detection; DetectionLoop fails with a clear message if an input ever delivers faster than real
    time.
    """
    stop = threading.Event()
    hub = AudioHub(inputs[:1], stop)
    hub.start()
    for i in range(1, len(inputs) + 1):
        wait_state(hub, inputs[i - 1].label, "running", 5.0)
        if i < len(inputs):
            hub.update(inputs[: i + 1])
    return hub, stop


def assert_detected_at(loop: DetectionLoop, site: str, clip: Clip, exact: bool = True) -> None:
    """Exactly one detection on ``site``, where ``detect_samples`` puts the keyword in the played clip."""
    body = clip.payload[clip.body]
    offset = loop.index_of(site, body, exact) - clip.body.start  # hub index of the payload's first sample
    [ref] = clip.expected
    hits = loop.sites[site].hits
    assert len(hits) == 1, f"{site} ({clip.name}): expected one detection, got {hits}"
    hit = hits[0]
    assert hit.keyword == "小云小云" and hit.stream == site
    assert abs(hit.score - ref.score) < 0.05, (hit.score, ref.score)
    assert abs(hit.start_sample - (offset + ref.start_sample)) <= TOLERANCE, (hit, offset, ref)
    assert abs(hit.end_sample - (offset + ref.end_sample)) <= TOLERANCE, (hit, offset, ref)


def test_positives_and_a_negative_captured_at_16k(session: ModelSession, pulse_server: PulseServer,
                                                  audio_dir: Path, negatives: list[Path]) -> None:
    clips = {
        "desk": positive_clip(session, audio_dir / "positive" / "kws_xiaoyunxiaoyun.wav"),
        "shop": positive_clip(session, audio_dir / "positive" / SOX),
        "hall": negative_clip(session, negatives[0]),
    }
    assert [len(c.expected) for c in clips.values()] == [1, 1, 0], "the clips themselves must (not) fire"
    sources = {site: pulse_server.pipe_source(f"cd16_{site}", RATE, 1) for site in clips}
    hub, stop = start_hub([InputSettings(device=src.name, sites={0: site}, stall_timeout=5.0)
                           for site, src in sources.items()])
    try:
        loop = DetectionLoop(hub, new_detector(session))
        feeders = [sources[site].play(clip.payload) for site, clip in clips.items()]
        # Each site has captured its whole payload (the stream index starts at the payload's first sample
        # or a few samples into it); the trailing second of silence lets the look-ahead decide.
        longest = max(c.payload.size for c in clips.values())
        loop.run(lambda: all(f.done.is_set() for f in feeders)
                 and all(loop.captured_past(s, longest) for s in clips), 15.0, "the clips to play")
        for site in ("desk", "shop"):
            assert_detected_at(loop, site, clips[site])
        loop.index_of("hall", clips["hall"].payload[clips["hall"].body], exact=True)  # it did arrive
        assert loop.sites["hall"].hits == [], "the negative must not fire"
        for src in sources.values():
            st = hub.status()[src.name]
            assert st.state == "running" and st.overruns == 0 and st.reopens == 0, st
        assert all(not log.resets for log in loop.sites.values())
    finally:
        stop.set()
        hub.stop()
        for src in sources.values():
            pulse_server.remove(src)


def test_48k_stereo_detects_on_the_right_channel_only(session: ModelSession, pulse_server: PulseServer,
                                                       audio_dir: Path, negatives: list[Path]) -> None:
    pos = positive_clip(session, audio_dir / "positive" / SOX)
    neg = negative_clip(session, negatives[1])
    assert (len(pos.expected), len(neg.expected)) == (1, 0)
    n = max(pos.payload.size, neg.payload.size)
    left, right = (np.pad(c.payload, (0, n - c.payload.size)).astype(np.float64) for c in (neg, pos))
    frames = np.stack([resample_poly(left, 3, 1), resample_poly(right, 3, 1)], axis=1)
    src = pulse_server.pipe_source("cd48_stereo", 48000, 2)
    hub, stop = start_hub([InputSettings(device=src.name, sites={0: "left_room", 1: "right_room"}, stall_timeout=5.0)])
    try:
        loop = DetectionLoop(hub, new_detector(session))
        feeder = src.play(np.clip(np.rint(frames), -32768, 32767).astype(np.int16))
        loop.run(lambda: feeder.done.is_set() and loop.captured_past("right_room", n), 15.0, "the stereo clip")
        assert_detected_at(loop, "right_room", pos, exact=False)
        assert loop.sites["left_room"].hits == [], "the negative channel must not fire"
        st = hub.status()[src.name]
        assert (st.state, st.rate, st.channels, st.overruns) == ("running", 48000, 2, 0), st
    finally:
        stop.set()
        hub.stop()
        pulse_server.remove(src)


def test_unplug_replug_then_detect(session: ModelSession, pulse_server: PulseServer, audio_dir: Path) -> None:
    """The source disappears while the detector runs and comes back; the keyword said afterwards is heard.

    Before the unplug the source plays the recording up to 40 % into the keyword (about the first 小云). Fed on
    across the seam, the detector would join that half with the keyword after the replug and report a keyword
    starting before the unplug (``detect_samples`` on the joined audio does); reset at the reopen, it reports the
    keyword where it was said.
    """
    clip = positive_clip(session, audio_dir / "positive" / "kws_xiaoyunxiaoyun.wav")
    src = pulse_server.pipe_source("cd_usbmic", RATE, 1)
    hub, stop = start_hub([InputSettings(device=src.name, sites={0: "porch"}, stall_timeout=1.0,
                                         reopen_backoff=(0.2, 1.0))])
    try:
        loop = DetectionLoop(hub, new_detector(session))
        [kw] = clip.expected
        half = clip.payload[clip.body.start : kw.start_sample + (kw.end_sample - kw.start_sample) * 2 // 5]
        src.play(half)
        loop.run(lambda: loop.captured_past("porch", half.size), 5.0, "audio before the unplug")
        before = loop.sites["porch"].end

        pulse_server.unload(src)  # unplug
        loop.run(lambda: hub.status()[src.name].state == "reopening", 5.0, "the input to notice the unplug")
        st = hub.status()[src.name]
        assert src.name in st.last_error, st

        src.reload()  # replug
        loop.run(lambda: hub.status()[src.name].state == "running", 5.0, "the input to reopen after the replug")
        assert hub.status()[src.name].reopens == 1
        feeder = src.play(clip.payload)
        loop.run(lambda: feeder.done.is_set() and loop.captured_past("porch", before + clip.payload.size),
                 15.0, "the clip played after the replug")
        assert_detected_at(loop, "porch", clip)
        log = loop.sites["porch"]
        assert len(log.resets) == 1 and log.resets[0] >= before, (log.resets, before)
        assert loop.index_of("porch", clip.payload[clip.body], exact=True) > log.resets[0]
        st = hub.status()[src.name]
        assert st.state == "running" and st.reopens == 1, st
    finally:
        stop.set()
        hub.stop()
        pulse_server.remove(src)
