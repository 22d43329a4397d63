"""Streaming resampler: block-wise equals one-shot, no clicks at block boundaries."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import firwin, resample_poly

from kwsd.audio.resample import StreamResampler, lowpass


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
    ref = resample_poly(x, r.up, r.down, axis=0)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-6


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


@pytest.mark.parametrize(("taps", "cutoff"), [(61, 1 / 3), (8821, 1 / 441), (41, 1 / 2)])
def test_filter_is_scipys_design(taps: int, cutoff: float) -> None:
    assert np.abs(lowpass(taps, cutoff) - firwin(taps, cutoff, window=("kaiser", 5.0))).max() < 1e-15


def test_same_rate_passes_through() -> None:
    x = np.arange(-500, 500, dtype=np.int16)
    r = StreamResampler(16000)
    assert np.array_equal(r.process(x), x) and r.flush().size == 0


def test_wrong_channel_count_names_the_problem() -> None:
    with pytest.raises(ValueError, match="2 channels"):
        StreamResampler(48000, channels=2).process(np.zeros((10, 3), np.int16))
