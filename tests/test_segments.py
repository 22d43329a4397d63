"""Follow-up segments on a real recording: silence end, max length cut, chunking independence, pre-roll."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import pytest

from kwsd.segments import Segment, SegmentRecorder
from kwsd.settings import ConfigError, SegmentSettings, from_dict

SR = 16000
# negative/1330806238146100615.wav: speech 0.03-0.15 s, a short word near 1.35 s, then speech from about 3.3
# s to
# 5.4 s; quiet store background from 0.2 s to 1.2 s.
NAME = "1330806238146100615.wav"


@pytest.fixture(scope="module")
def stream(audio_dir: Path) -> np.ndarray:
    with wave.open(str(audio_dir / "negative" / NAME), "rb") as wf:
        assert (wf.getframerate(), wf.getnchannels(), wf.getsampwidth()) == (SR, 1, 2)
        x = np.frombuffer(wf.readframes(wf.getnframes()), dtype=np.int16)
    background = x[int(0.2 * SR) : int(1.2 * SR)]
    return np.concatenate([x, background, background])  # the speaker stops; the room goes on


def run(
    recorder: SegmentRecorder, x: np.ndarray, block: int, wake_at: int, kw: tuple[int, int], offset: int = 0
) -> list[Segment]:
    """Feed ``x`` (absolute index = offset + position) in blocks; report the wake once ``wake_at`` was fed."""
    out: list[Segment] = []
    started = False
    for pos in range(0, len(x), block):
        out += recorder.feed("mic", x[pos : pos + block], offset + pos)
        if not started and pos + block >= wake_at:
            recorder.start("mic", "s1", offset + kw[0], offset + kw[1])
            started = True
    return out + recorder.flush()


def test_segment_ends_on_silence_after_the_speech(stream: np.ndarray) -> None:
    s = SegmentSettings(pre_roll=0.3, silence_timeout=0.8, max_length=10.0)
    kw = (int(3.3 * SR), int(3.9 * SR))
    offset = 10 * 60 * SR  # ten minutes into the stream: indices are absolute
    [seg] = run(SegmentRecorder(s), stream, 320, kw[1] + int(0.4 * SR), kw, offset)
    assert seg.reason == "silence"
    assert seg.start_sample == offset + kw[0] - int(0.3 * SR) and seg.pre_roll == pytest.approx(0.3)
    end = (seg.end_sample - offset) / SR
    assert 5.4 + 0.8 - 0.15 <= end <= 5.4 + 0.8 + 0.25, end
    np.testing.assert_array_equal(seg.samples, stream[seg.start_sample - offset : seg.end_sample - offset])
    with wave.open(io.BytesIO(seg.to_wav()), "rb") as wf:
        assert (wf.getframerate(), wf.getnchannels(), wf.getsampwidth()) == (SR, 1, 2)
        assert wf.getnframes() == len(seg.samples)


def test_segment_does_not_depend_on_block_size(stream: np.ndarray) -> None:
    s = SegmentSettings()
    kw = (int(3.3 * SR), int(3.9 * SR))
    results = [
        run(SegmentRecorder(s), stream, block, kw[1] + int(0.5 * SR), kw) for block in (160, 480, 1999, 8000)
    ]
    first = results[0][0]
    for [seg] in results[1:]:
        assert (seg.start_sample, seg.end_sample, seg.reason) == (
            first.start_sample,
            first.end_sample,
            first.reason,
        )
        np.testing.assert_array_equal(seg.samples, first.samples)


def test_max_length_cuts_the_segment(stream: np.ndarray) -> None:
    s = SegmentSettings(pre_roll=0.5, max_length=1.5)
    kw = (int(3.3 * SR), int(3.9 * SR))
    [seg] = run(SegmentRecorder(s), stream, 512, kw[1] + 1000, kw)
    assert seg.reason == "max_length"
    assert len(seg.samples) == int(1.5 * SR) and seg.start_sample == kw[0] - int(0.5 * SR)


def test_no_speech_after_the_keyword_ends_after_initial_silence(stream: np.ndarray) -> None:
    s = SegmentSettings(pre_roll=0.0, min_speech=0.3, initial_silence=1.0)
    kw = (int(0.03 * SR), int(0.15 * SR))
    [seg] = run(SegmentRecorder(s), stream, 480, kw[1], kw)
    assert seg.reason == "silence"
    assert abs(seg.end_sample - (kw[1] + SR)) <= 480


def test_lost_samples_keep_indices_and_new_wake_interrupts() -> None:
    rec = SegmentRecorder(SegmentSettings(pre_roll=0.1))
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1600) * 3000).astype(np.int16)
    assert rec.feed("a", block, 0) == []
    rec.start("a", "first", 800, 1600)
    assert rec.feed("a", block, 3200) == []  # 1600 samples lost upstream: filled with silence
    rec.start("a", "second", 4000, 4800)
    [seg] = rec.feed("a", block, 4800)
    assert (seg.session_id, seg.reason, seg.start_sample) == ("first", "interrupted", 0)
    assert seg.end_sample == 4800 and not seg.samples[1600:3200].any()
    [seg2] = rec.flush()
    assert (seg2.session_id, seg2.reason, seg2.start_sample, seg2.end_sample) == (
        "second",
        "stopped",
        2400,
        6400,
    )
    np.testing.assert_array_equal(seg2.samples[-1600:], block)


def test_segment_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"^segments\.vad_aggressiveness: must be 0\.\.3"):
        from_dict(SegmentSettings, {"vad_aggressiveness": 4}, "segments")
    with pytest.raises(ConfigError, match=r"^segments\.max_length: must be longer than pre_roll"):
        from_dict(SegmentSettings, {"max_length": 0.2, "pre_roll": 0.5}, "segments")
