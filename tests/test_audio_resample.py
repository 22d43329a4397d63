"""Streaming resampler: block-wise equals one-shot, same instants as a polyphase reference, aliases rejected, no
clicks at block boundaries."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import resample_poly

from kwsd.audio.resample import StreamResampler, resample_once


def blockwise(r: StreamResampler, x: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, list[int]]:
    parts, bounds, i, k = [], [], 0, 0
    while i < len(x):
        n = int(sizes[k % len(sizes)])
        parts.append(r.process(x[i : i + n]))
        bounds.append(sum(map(len, parts)))
        i += n
        k += 1
    parts.append(r.flush())
    return np.concatenate(parts), bounds


@pytest.mark.parametrize("rate", [48000, 44100, 22050, 8000])
def test_blockwise_equals_one_shot(rate: int) -> None:
    rng = np.random.default_rng(rate)
    x = rng.standard_normal((rate * 2, 2)) * 3000
    r = StreamResampler(rate, 16000, channels=2)
    got, _ = blockwise(r, x, rng.integers(1, 3000, 64))
    whole = StreamResampler(rate, 16000, channels=2)
    ref = np.concatenate([whole.process(x), whole.flush()])
    assert got.shape == ref.shape == (rate * 2 * 16000 // rate, 2)
    assert np.array_equal(got, ref)


def band_limited(rate: int, seconds: float, top_hz: float, seed: int) -> np.ndarray:
    n = int(rate * seconds)
    spec = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    spec[np.fft.rfftfreq(n, 1 / rate) > top_hz] = 0
    return np.fft.irfft(spec, n) * 3000


@pytest.mark.parametrize("rate", [48000, 44100, 22050, 8000])
def test_output_samples_sit_at_the_polyphase_instants(rate: int) -> None:
    """Speech-band audio: the same samples (within the reference filter's own pass-band ripple) at the same
    instants as scipy's resample_poly, so detections and segment times do not move."""
    x = band_limited(rate, 2.0, 3000, rate)
    got = resample_once(x, rate)
    g = np.gcd(16000, rate)
    ref = resample_poly(x, 16000 // g, rate // g)
    assert got.shape == ref.shape
    body = slice(500, -500)
    assert np.abs(got[body] - ref[body]).max() < 0.005 * np.abs(ref).max()
    lag = np.argmax(np.correlate(got[1000:-1000], ref[990:-990], mode="valid")) - 10
    assert lag == 0


@pytest.mark.parametrize("rate", [48000, 44100])
def test_aliases_are_rejected(rate: int) -> None:
    """Tones above the new Nyquist (8 kHz) vanish; the speech band keeps its level."""
    t = np.arange(rate * 2) / rate

    def level_db(freq: float) -> float:
        y = resample_once(np.sin(2 * np.pi * freq * t) * 10000, rate)[2000:-2000]
        return float(20 * np.log10(np.sqrt(np.mean(y**2)) / (10000 / np.sqrt(2)) + 1e-12))

    for freq in (300, 1000, 4000, 7000):
        assert abs(level_db(freq)) < 0.1, freq
    for freq in (9000, 12000, 20000):
        assert level_db(freq) < -90, freq


@pytest.mark.parametrize("rate", [48000, 44100])
def test_no_click_at_block_boundaries(rate: int) -> None:
    t = np.arange(rate * 2) / rate
    x = np.round(np.sin(2 * np.pi * 1000 * t) * 16000).astype(np.int16)
    r = StreamResampler(rate)
    y, bounds = blockwise(r, x, np.array([rate // 50]))  # 20 ms device blocks
    assert y.dtype == np.int16
    ideal = np.sin(2 * np.pi * 1000 * np.arange(y.size) / 16000) * 16000
    body = slice(200, y.size - 200)
    err = np.abs(y[body].astype(np.float64) - ideal[body])
    assert err.max() < 40, "within 0.25 % of the ideal tone everywhere, block boundaries included"
    d2 = np.abs(np.diff(y.astype(np.float64), 2))
    inner = [b for b in bounds if 200 < b < y.size - 200]
    assert d2[[b - 1 for b in inner]].max() <= d2[body].max() + 1


def test_same_rate_passes_through() -> None:
    x = np.arange(-500, 500, dtype=np.int16)
    r = StreamResampler(16000)
    assert np.array_equal(r.process(x), x) and r.flush().size == 0


def test_wrong_channel_count_names_the_problem() -> None:
    with pytest.raises(ValueError, match="2 channels"):
        StreamResampler(48000, channels=2).process(np.zeros((10, 3), np.int16))
