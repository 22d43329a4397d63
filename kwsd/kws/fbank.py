"""Kaldi fbank for many streams at once: one vectorised numpy pass per step, whatever the number of streams.

The same frames as Kaldi's (and kaldi-native-fbank's) ``OnlineFbank`` with the options of
:meth:`kwsd.kws.features.FeatureConfig.fbank_options`: ``snip_edges`` framing (frame ``f`` covers samples
``[f * shift, f * shift + length)``), no dither, DC offset removed per frame, pre-emphasis 0.97, the configured
window, a power spectrum of the zero-padded power-of-two FFT, Kaldi's triangular mel banks (20 Hz to Nyquist), and
the natural log floored at float32 epsilon. Every stream carries only the samples its next frame still needs
(:class:`FbankState`), so any chunking of the audio gives the same frames.

All streams' frames of a step are gathered into one matrix, so the per-step cost is a handful of numpy calls plus a
few microseconds of Python per stream, instead of one extractor call (and its float vector conversion) per stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

PREEMPH = 0.97
LOW_FREQ = 20.0
_EPS = float(np.finfo(np.float32).eps)
_EMPTY = np.empty(0, dtype=np.float32)
_BLOCK = 256
"""Frames computed together: their spectra (0.5 MB) stay in the core's cache."""


_blas_limited = False


def _single_threaded_blas() -> None:
    """Keep BLAS (the mel product) on the calling thread, once per process.

    The front end and the model already spread streams over threads; OpenBLAS's own threads would busy-wait on
    those cores, doubling the front end's CPU time for the same wall time.
    """
    global _blas_limited
    if not _blas_limited:
        threadpool_limits(1, user_api="blas")
        _blas_limited = True


def _mel(freq: Any) -> Any:
    return 1127.0 * np.log(1.0 + freq / 700.0)


def mel_banks(num_bins: int, fft_size: int, sample_rate: int, low_freq: float = LOW_FREQ,
              high_freq: float = 0.0) -> np.ndarray:
    """Kaldi's triangular mel filters as a ``[fft_size // 2 + 1, num_bins]`` matrix (the Nyquist row is zero).

    ``high_freq`` <= 0 counts down from Nyquist, as in Kaldi.
    """
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    mel_low, mel_high = _mel(np.float64(low_freq)), _mel(np.float64(high))
    delta = (mel_high - mel_low) / (num_bins + 1)
    half = fft_size // 2
    mel = _mel(np.arange(half) * (sample_rate / fft_size))  # Kaldi leaves the Nyquist bin out
    bins = np.arange(num_bins)[None, :]
    left = mel_low + bins * delta
    center = left + delta
    right = center + delta
    m = mel[:, None]
    up = (m - left) / (center - left)
    down = (right - m) / (right - center)
    w = np.where((m > left) & (m < right), np.where(m <= center, up, down), 0.0)
    out = np.zeros((half + 1, num_bins), dtype=np.float32)
    out[:half] = w
    return out


def window(kind: str, length: int) -> np.ndarray:
    """Kaldi's analysis windows (``hamming``, ``hanning``, ``povey``, ``rectangular``, ``blackman``)."""
    i = np.arange(length, dtype=np.float64)
    a = 2.0 * math.pi / (length - 1)
    if kind == "hamming":
        w = 0.54 - 0.46 * np.cos(a * i)
    elif kind == "hanning":
        w = 0.5 - 0.5 * np.cos(a * i)
    elif kind == "povey":
        w = (0.5 - 0.5 * np.cos(a * i)) ** 0.85
    elif kind == "rectangular":
        w = np.ones(length)
    elif kind == "blackman":
        w = 0.42 - 0.5 * np.cos(a * i) + 0.08 * np.cos(2 * a * i)
    else:
        raise ValueError(f"unknown window type {kind!r}")
    return w


@dataclass
class FbankState:
    """One stream's carried audio: the samples from the start of its next frame on, and frames produced."""

    leftover: np.ndarray = field(default_factory=lambda: _EMPTY)
    frames: int = 0

    def reset(self) -> None:
        self.leftover = _EMPTY
        self.frames = 0


class BatchFbank:
    """Fbank frames ``[n, num_mel_bins]`` (float32) for a batch of streams per call.

    ``frame_length``/``frame_shift`` in samples. One instance serves any number of streams; each stream's state
    is a :class:`FbankState`.
    """

    def __init__(self, sample_rate: int = 16000, num_mel_bins: int = 80, frame_length: int = 400,
                 frame_shift: int = 160, window_type: str = "hamming") -> None:
        self.frame_length = int(frame_length)
        self.frame_shift = int(frame_shift)
        self.num_mel_bins = int(num_mel_bins)
        self.fft_size = 1 << (self.frame_length - 1).bit_length()
        self._window = window(window_type, self.frame_length).astype(np.float32)
        self._mel = mel_banks(num_mel_bins, self.fft_size, sample_rate)
        _single_threaded_blas()

    @classmethod
    def from_config(cls, config: object) -> BatchFbank:
        """From a :class:`kwsd.kws.features.FeatureConfig` (duck-typed, so this module imports nothing else)."""
        c = config
        return cls(c.sample_rate, c.num_mel_bins, c.frame_length, c.frame_shift, c.window_type)  # type: ignore[attr-defined]

    def frames_for(self, samples: int) -> int:
        """Frames that ``samples`` samples complete (snip_edges framing)."""
        return 0 if samples < self.frame_length else (samples - self.frame_length) // self.frame_shift + 1

    def compute(self, states: Sequence[FbankState], chunks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Append ``chunks[i]`` (1-D, int16-scale) to stream ``states[i]``; return each stream's new frames.

        The returned arrays are views into one result matrix (rows of stream i, possibly zero of them).
        """
        n = len(states)
        if len(chunks) != n:
            raise ValueError(f"{n} states but {len(chunks)} chunks")
        if n == 0:
            return []
        if n == 1:
            return [self._one(states[0], chunks[0])]
        # Plain Python lists and ints in the per-stream loops: numpy scalars cost several times more per access.
        parts: list[np.ndarray] = []
        sizes: list[int] = []
        for st, chunk in zip(states, chunks, strict=True):
            left = st.leftover
            if left.size:
                parts.append(left)
            c = chunk if chunk.dtype == np.float32 and chunk.ndim == 1 else np.asarray(chunk, np.float32).ravel()
            parts.append(c)
            sizes.append(left.size + c.size)
        flat = np.concatenate(parts) if len(parts) > 1 else parts[0]
        lengths = np.array(sizes, dtype=np.intp)
        starts = np.zeros(n, dtype=np.intp)
        np.cumsum(lengths[:-1], out=starts[1:])
        counts = np.where(lengths >= self.frame_length, (lengths - self.frame_length) // self.frame_shift + 1, 0)
        total = int(counts.sum())
        # Stream i keeps its samples from its next frame on.
        keep_from = (starts + counts * self.frame_shift).tolist()
        ends = (starts + lengths).tolist()
        # Views into this call's own concatenation (no copy per stream); a lone chunk is the caller's buffer.
        own = len(parts) > 1
        for st, a, b, k in zip(states, keep_from, ends, counts.tolist(), strict=True):
            st.leftover = flat[a:b] if own else flat[a:b].copy()
            st.frames += k
        edges = np.zeros(n + 1, dtype=np.intp)
        np.cumsum(counts, out=edges[1:])
        if total == 0:
            empty = np.empty((0, self.num_mel_bins), dtype=np.float32)
            return [empty] * n
        # Frame k of the batch (the j-th of its stream i) starts at starts[i] + j * shift.
        owner = np.repeat(np.arange(n), counts)
        j = np.arange(total) - edges[owner]
        frame_starts = starts[owner] + j * self.frame_shift
        feats = np.empty((total, self.num_mel_bins), dtype=np.float32)
        windows = self._windows(flat, 1)  # row i: samples i .. i+len-1
        for a in range(0, total, _BLOCK):  # blocks small enough for the intermediates to stay in cache
            b = min(a + _BLOCK, total)
            feats[a:b] = self.frames(windows[frame_starts[a:b]])
        bounds = edges.tolist()
        return [feats[bounds[i] : bounds[i + 1]] for i in range(n)]

    def _windows(self, flat: np.ndarray, step: int) -> np.ndarray:
        """Overlapping views ``[n, frame_length]`` of contiguous float32 samples, ``step`` samples apart."""
        count = (flat.shape[0] - self.frame_length) // step + 1
        item = flat.itemsize
        return np.ndarray((count, self.frame_length), dtype=np.float32, buffer=flat,
                          strides=(step * item, item))

    def _one(self, st: FbankState, chunk: np.ndarray) -> np.ndarray:
        """:meth:`compute` for a single stream (one live site): the same frames, a few numpy calls fewer."""
        c = chunk if chunk.dtype == np.float32 and chunk.ndim == 1 else np.asarray(chunk, np.float32).ravel()
        x = np.concatenate([st.leftover, c]) if st.leftover.size else np.ascontiguousarray(c)
        count = self.frames_for(x.shape[0])
        keep = count * self.frame_shift
        st.leftover = x[keep:] if x is not chunk else x[keep:].copy()  # never a view of the caller's buffer
        st.frames += count
        if count == 0:
            return np.empty((0, self.num_mel_bins), dtype=np.float32)
        if count <= _BLOCK:
            return self.frames(self._windows(x[: keep - self.frame_shift + self.frame_length], self.frame_shift))
        return np.concatenate([self.frames(self._windows(x[a * self.frame_shift : (b - 1) * self.frame_shift
                                                            + self.frame_length], self.frame_shift))
                               for a, b in ((a, min(a + _BLOCK, count)) for a in range(0, count, _BLOCK))])

    def frames(self, frames: np.ndarray) -> np.ndarray:
        """Log mel energies of already cut frames ``[n, frame_length]`` (float32)."""
        if frames.shape[0] == 1:
            # numpy hands a single row to BLAS gemv, which sums in another order than gemm: two rows keep a
            # stream's frames bit for bit the same however the streams are batched.
            return self.frames(np.concatenate([frames, frames]))[:1]
        frames = np.asarray(frames, dtype=np.float32)
        # The frames go straight into the zero-padded FFT input (numpy would otherwise pad a copy of its own):
        # the same spectra, bit for bit, one pass over the frames fewer.
        padded = np.zeros((frames.shape[0], self.fft_size), dtype=np.float32)
        x = padded[:, : self.frame_length]
        np.subtract(frames, frames.mean(axis=1, keepdims=True), out=x)
        # Pre-emphasis, right to left as Kaldi does it: x[i] -= 0.97 x[i-1], and x[0] -= 0.97 x[0].
        x[:, 1:] -= np.float32(PREEMPH) * x[:, :-1]
        x[:, 0] *= np.float32(1.0 - PREEMPH)
        x *= self._window
        spec = np.fft.rfft(padded, axis=1)
        power = spec.real * spec.real
        power += spec.imag * spec.imag
        mel = power.astype(np.float32, copy=False) @ self._mel
        np.maximum(mel, np.float32(_EPS), out=mel)
        return np.log(mel, out=mel)

    def whole(self, samples: np.ndarray) -> np.ndarray:
        """Every frame of one whole recording."""
        return self.compute([FbankState()], [samples])[0]
