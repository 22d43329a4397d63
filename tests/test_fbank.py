"""The batched fbank front end equals kaldi-native-fbank on real recordings, at any chunking and batching."""

from __future__ import annotations

from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import pytest

from kwsd.audio.wavfile import read_wav
from kwsd.kws.fbank import BatchFbank, FbankState
from kwsd.kws.features import FeatureConfig

TOLERANCE = 1e-3
"""Largest difference allowed on a log mel energy (both sides compute in float32; the FFTs differ)."""


def reference(samples: np.ndarray, config: FeatureConfig) -> np.ndarray:
    fb = knf.OnlineFbank(config.fbank_options())
    fb.accept_waveform(config.sample_rate, np.asarray(samples, dtype=np.float32).tolist())
    fb.input_finished()
    if fb.num_frames_ready == 0:
        return np.empty((0, config.num_mel_bins), dtype=np.float32)
    return np.stack([np.array(fb.get_frame(i)) for i in range(fb.num_frames_ready)])


@pytest.fixture(scope="module")
def recordings(positives: list[Path], negatives: list[Path]) -> list[np.ndarray]:
    assert len(positives) >= 10 and len(negatives) >= 10
    return [read_wav(p) for p in positives + negatives]


def interleaved(fbank: BatchFbank, audio: list[np.ndarray], seed: int, max_chunk: int) -> list[np.ndarray]:
    """All recordings as streams of one batch: each step, a random subset receives a random-length chunk (empty
    and sub-frame chunks included)."""
    rng = np.random.default_rng(seed)
    states = [FbankState() for _ in audio]
    out: list[list[np.ndarray]] = [[] for _ in audio]
    pos = [0] * len(audio)
    steps = 0
    while any(p < a.size for p, a in zip(pos, audio, strict=True)):
        chosen = [i for i in range(len(audio)) if pos[i] < audio[i].size and rng.random() < 0.7]
        chunks = []
        for i in chosen:
            n = int(rng.integers(0, max_chunk))
            chunks.append(audio[i][pos[i] : pos[i] + n])
            pos[i] += n
        for i, frames in zip(chosen, fbank.compute([states[i] for i in chosen], chunks), strict=True):
            out[i].append(frames)
        steps += 1
    assert steps > 20
    for st, a in zip(states, audio, strict=True):
        assert st.frames == fbank.frames_for(a.size)
        assert st.leftover.size == a.size - st.frames * fbank.frame_shift if st.frames else a.size
    return [np.concatenate(o) if o else np.empty((0, fbank.num_mel_bins), np.float32) for o in out]


@pytest.mark.parametrize(("seed", "max_chunk"), [(0, 5000), (1, 700), (2, 170)])
def test_equals_kaldi_native_fbank_at_any_chunking(recordings: list[np.ndarray], seed: int, max_chunk: int
                                                   ) -> None:
    config = FeatureConfig()
    fbank = BatchFbank.from_config(config)
    got = interleaved(fbank, recordings, seed, max_chunk)
    worst = 0.0
    for g, a in zip(got, recordings, strict=True):
        want = reference(a, config)
        assert g.shape == want.shape and g.dtype == np.float32
        worst = max(worst, float(np.abs(g - want).max()))
    assert worst < TOLERANCE


def test_batching_and_chunking_change_no_bit(recordings: list[np.ndarray]) -> None:
    """A stream's frames do not depend on which other streams share its steps, nor on its chunk sizes."""
    fbank = BatchFbank()
    alone = [fbank.whole(a) for a in recordings]
    for got, want in zip(interleaved(fbank, recordings, 3, 3000), alone, strict=True):
        assert np.array_equal(got, want)


def test_edge_signals_match(recordings: list[np.ndarray]) -> None:
    """Digital silence (log floor), full-scale clipping, a DC offset, shorter than one frame, exactly one frame."""
    config = FeatureConfig()
    fbank = BatchFbank.from_config(config)
    speech = recordings[0][:16000]
    cases = {
        "silence": np.zeros(4000, np.float32),
        "clipped": np.clip(speech * 40, -32768, 32767),
        "dc": speech + 5000,
        "short": speech[:399],
        "one frame": speech[:400],
        "int16": speech.astype(np.int16),
    }
    for name, x in cases.items():
        got, want = fbank.whole(x), reference(x, config)
        assert got.shape == want.shape, name
        assert np.abs(got - want).max(initial=0.0) < TOLERANCE, name


@pytest.mark.parametrize("window", ["povey", "hanning", "rectangular"])
def test_other_settings_follow_the_config(recordings: list[np.ndarray], window: str) -> None:
    config = FeatureConfig(num_mel_bins=40, frame_length_ms=20.0, window_type=window)
    fbank = BatchFbank.from_config(config)
    x = recordings[1]
    got, want = fbank.whole(x), reference(x, config)
    assert got.shape == want.shape == (fbank.frames_for(x.size), 40)
    assert np.abs(got - want).max() < TOLERANCE


def test_bad_calls_name_the_problem() -> None:
    fbank = BatchFbank()
    with pytest.raises(ValueError, match="2 states but 1 chunks"):
        fbank.compute([FbankState(), FbankState()], [np.zeros(10)])
    with pytest.raises(ValueError, match="window type 'kaiser'"):
        BatchFbank(window_type="kaiser")
    assert fbank.compute([], []) == []
    state = FbankState()
    fbank.compute([state], [np.ones(1000)])
    state.reset()
    assert (state.frames, state.leftover.size) == (0, 0)
