"""Streaming polyphase resampling with carried state.

The filter is the one ``scipy.signal.resample_poly`` designs (Kaiser-windowed sinc, ``half_len = 10 * max(up,
down)``; designed here with numpy, so importing this module costs no scipy) and the output samples sit at the same
instants, so resampling a stream block by block gives the same samples as resampling it in one call: nothing is
padded or trimmed at block boundaries (no clicks). The price is a look-ahead of ``half_len / up`` input samples
(0.6 ms for 48 kHz, 0.6 ms for 44.1 kHz), released by ``flush()``, and every block yields its output at once: a
block-based resampler such as libsoxr holds back tens of milliseconds, which a wake word's latency would pay.
"""

from __future__ import annotations

from math import gcd

import numpy as np


def lowpass(taps: int, cutoff: float, beta: float = 5.0) -> np.ndarray:
    """Kaiser-windowed sinc low-pass, unity gain at DC; ``cutoff`` relative to Nyquist (``firwin``'s design)."""
    n = np.arange(taps) - (taps - 1) / 2
    h = cutoff * np.sinc(cutoff * n) * np.kaiser(taps, beta)
    return h / h.sum()


class StreamResampler:
    """Resample a stream of (frames,) or (frames, channels) blocks from ``rate_in`` to ``rate_out``.

    int16 blocks give int16 output (rounded, clipped); float blocks give float64. Equal rates pass through
    unchanged.
    """

    def __init__(self, rate_in: int, rate_out: int = 16000, channels: int = 1) -> None:
        if rate_in <= 0 or rate_out <= 0:
            raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
        self.rate_in = int(rate_in)
        self.rate_out = int(rate_out)
        self.channels = int(channels)
        g = gcd(self.rate_in, self.rate_out)
        self.up = self.rate_out // g
        self.down = self.rate_in // g
        self.passthrough = self.up == self.down
        max_rate = max(self.up, self.down)
        self.half_len = 10 * max_rate
        if self.passthrough:
            h = np.ones(1)
        else:
            h = lowpass(2 * self.half_len + 1, 1.0 / max_rate) * self.up
        # Polyphase bank: phase p holds h[p], h[p+up], ...; row j multiplies x[n0 - j].
        self.taps = -(-h.size // self.up)
        bank = np.zeros((self.up, self.taps))
        for p in range(self.up):
            part = h[p :: self.up]
            bank[p, : part.size] = part
        self._bank = bank
        self._offsets = np.arange(self.taps)
        # History: the last ``taps`` input frames before ``_hist_start`` plus everything not yet consumed.
        self._hist = np.zeros((self.taps, self.channels))
        self._hist_start = -self.taps  # absolute input index of _hist[0]; negatives are the zero pre-roll
        self._n_in = 0  # input frames received
        self._n_out = 0  # output frames produced
        self._dtype: np.dtype | None = None

    @property
    def delay_in(self) -> int:
        """Input frames the resampler must see beyond an output instant before it can produce that output."""
        return 0 if self.passthrough else -(-self.half_len // self.up)

    def outputs_after(self, more: int) -> int:
        """Output samples the next ``process`` would return if given ``more`` input frames."""
        if self.passthrough:
            return max(0, more)
        n_in = self._n_in + max(0, more)
        m_stop = (n_in - 1) * self.up - self.half_len
        m_stop = m_stop // self.down + 1 if m_stop >= 0 else 0
        return max(0, m_stop - self._n_out)

    def process(self, block: np.ndarray) -> np.ndarray:
        """Resample the next block; returns every output sample that the input so far fully determines."""
        mono = block.ndim == 1
        if self._dtype is None:
            self._dtype = block.dtype
        if self.passthrough:
            return block.copy()
        x = block.reshape(block.shape[0], -1).astype(np.float64, copy=False)
        if x.shape[1] != self.channels:
            raise ValueError(f"resampler set up for {self.channels} channels, got a block with {x.shape[1]}")
        self._hist = np.concatenate((self._hist, x))
        self._n_in += x.shape[0]
        # Output m needs input up to n0 = floor((m*down + half_len) / up).
        m_stop = (self._n_in - 1) * self.up - self.half_len
        m_stop = m_stop // self.down + 1 if m_stop >= 0 else 0
        return self._emit(m_stop, mono)

    def flush(self) -> np.ndarray:
        """End of stream: produce the remaining outputs as if zeros followed (same length as
        resample_poly)."""
        if self.passthrough:
            return np.zeros((0,) if self.channels == 1 else (0, self.channels), dtype=self._dtype or np.int16)
        total = -(-self._n_in * self.up // self.down)
        pad = self.delay_in + 1
        self._hist = np.concatenate((self._hist, np.zeros((pad, self.channels))))
        out = self._emit(total, self.channels == 1)
        self._hist = self._hist[: self._hist.shape[0] - pad]
        return out

    def _emit(self, m_stop: int, mono: bool) -> np.ndarray:
        m = np.arange(self._n_out, max(m_stop, self._n_out))
        if m.size:
            pos = m * self.down + self.half_len
            n0 = pos // self.up
            phase = pos - n0 * self.up
            idx = (n0 - self._hist_start)[:, None] - self._offsets[None, :]
            weights = self._bank[phase]
            y = np.empty((m.size, self.channels))
            for c in range(self.channels):  # per channel: einsum over (M, taps, channels) is several times slower
                y[:, c] = np.einsum("mt,mt->m", self._hist[idx, c], weights)
            self._n_out = int(m[-1]) + 1
            # Keep only what the next output can still reach.
            next_n0 = (self._n_out * self.down + self.half_len) // self.up
            keep_from = next_n0 - self.taps + 1 - self._hist_start
            if keep_from > 0:
                self._hist = self._hist[keep_from:]
                self._hist_start += keep_from
        else:
            y = np.zeros((0, self.channels))
        if self._dtype is not None and np.issubdtype(self._dtype, np.integer):
            info = np.iinfo(self._dtype)
            y = np.clip(np.rint(y), info.min, info.max).astype(self._dtype)
        return y[:, 0] if mono else y


def resample_once(samples: np.ndarray, rate_in: int, rate_out: int = 16000) -> np.ndarray:
    """A whole 1-D recording at ``rate_in`` resampled to ``rate_out`` (the same samples as ``resample_poly``)."""
    r = StreamResampler(rate_in, rate_out)
    return np.concatenate((r.process(samples), r.flush()))
