"""Streaming Kaldi features, exactly as the model was trained.

Kaldi fbank (80 mel bins, 25 ms window, 10 ms shift, hamming, int16-scale samples, no dither; computed for many
streams at once by :mod:`kwsd.kws.fbank`, equal to kaldi-native-fbank), then low frame rate stacking: each model
frame splices fbank frames ``3k-2 .. 3k+2`` (the first frame is repeated on the left at the start; the last one on
the right when the stream ends) and only every 3rd frame is kept, so one model frame covers 30 ms. Every leftover
(samples, fbank frames, the decimation phase) is carried between calls, so any chunking of the audio yields the
same frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from kwsd.kws.fbank import BatchFbank, FbankState


@dataclass(frozen=True)
class FeatureConfig:
    """Feature settings; the exported model states them in its metadata and the session checks them."""

    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    window_type: str = "hamming"
    lfr_left: int = 2
    lfr_right: int = 2
    lfr_stride: int = 3

    @property
    def frame_shift(self) -> int:
        """Fbank frame shift in samples."""
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def frame_length(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def model_frame_samples(self) -> int:
        """Samples per model frame (30 ms = 480 samples at 16 kHz)."""
        return self.frame_shift * self.lfr_stride

    @property
    def dim(self) -> int:
        return self.num_mel_bins * (self.lfr_left + 1 + self.lfr_right)

    def samples_for(self, frames: int) -> int:
        """Samples a stream must have received before it has produced ``frames`` model frames (unflushed).

        Model frame k needs fbank frame ``stride * k + right``; fbank frame f needs samples up to
        ``frame_length + f * frame_shift`` (Kaldi's snip_edges framing).
        """
        if frames <= 0:
            return 0
        last_fbank = self.lfr_stride * (frames - 1) + self.lfr_right
        return self.frame_length + last_fbank * self.frame_shift

    def fbank_options(self) -> Any:
        """The same settings as kaldi-native-fbank options (the reference the batched front end is tested on)."""
        import kaldi_native_fbank as knf

        opts = knf.FbankOptions()
        opts.frame_opts.samp_freq = float(self.sample_rate)
        opts.frame_opts.frame_length_ms = float(self.frame_length_ms)
        opts.frame_opts.frame_shift_ms = float(self.frame_shift_ms)
        opts.frame_opts.window_type = self.window_type
        opts.frame_opts.dither = 0.0
        opts.frame_opts.snip_edges = True
        opts.mel_opts.num_bins = self.num_mel_bins
        opts.energy_floor = 0.0
        return opts


class FeatureStream:
    """Per-stream feature state: 16 kHz int16-scale audio in, spliced model frames ``[n, dim]`` out."""

    def __init__(self, config: FeatureConfig | None = None) -> None:
        self.config = config or FeatureConfig()
        self._batch = batch_fbank(self.config)
        self.reset()

    def reset(self) -> None:
        self.fbank_state = FbankState()  # the 10 ms step's carried samples (see extract_batch)
        self._fbank_read = 0  # fbank frames received
        # Fbank frames kept for splicing: rows [0, _context_len) of _context, the first one is fbank frame
        # _context_start. A preallocated buffer, so a block of audio costs no concatenation.
        self._context = np.empty((64, self.config.num_mel_bins), dtype=np.float32)
        self._context_len = 0
        self._context_start = 0
        self.frames_out = 0  # model frames produced so far; the next one is centred on fbank frame 3 * frames_out
        self.finished = False

    def accept(self, samples: np.ndarray) -> np.ndarray:
        """Feed 16 kHz samples (int16, or float on the int16 scale); return the model frames now complete."""
        if self.finished:
            raise RuntimeError("stream already flushed; reset() it first")
        return self.accept_fbank(self._batch.compute([self.fbank_state], [samples])[0])

    def accept_fbank(self, fbank: np.ndarray) -> np.ndarray:
        """Add this stream's next fbank frames ``[n, num_mel_bins]`` (from :func:`extract_batch`); return the
        model frames now complete."""
        if self.finished:
            raise RuntimeError("stream already flushed; reset() it first")
        self._append_fbank(fbank)
        return self._emit(final=False)

    def flush(self) -> np.ndarray:
        """End of the stream: emit the remaining model frames, repeating the last fbank frame as right context.

        Kaldi's snip_edges framing has no frame past the last full window, so no fbank frame is added here.
        """
        out = self._emit(final=True)
        self.finished = True
        return out

    def _append_fbank(self, fbank: np.ndarray) -> None:
        new = fbank.shape[0]
        if new <= 0:
            return
        end = self._context_len + new
        if end > self._context.shape[0]:
            grown = np.empty((max(2 * self._context.shape[0], end), self._context.shape[1]), dtype=np.float32)
            grown[: self._context_len] = self._context[: self._context_len]
            self._context = grown
        self._context[self._context_len : end] = fbank
        self._fbank_read += new
        self._context_len = end

    def _emit(self, final: bool) -> np.ndarray:
        cfg = self.config
        total = self._fbank_read  # fbank frames seen so far
        # Model frame k needs fbank frames up to 3k + right; at the end, every k with 3k < total is emitted.
        if final:
            last = (total - 1) // cfg.lfr_stride
        else:
            last = (total - 1 - cfg.lfr_right) // cfg.lfr_stride
        count = last - self.frames_out + 1
        if total == 0 or count <= 0:
            return np.empty((0, cfg.dim), dtype=np.float32)
        first_row = self.frames_out * cfg.lfr_stride - cfg.lfr_left
        ctx = self._context
        if first_row >= 0 and last * cfg.lfr_stride + cfg.lfr_right < total:
            # Every spliced window lies inside the context: consecutive rows are contiguous, so model frame j is
            # the flat run starting at row first_row + 3j.
            row_bytes = ctx.strides[0]
            out = np.ndarray((count, cfg.dim), dtype=np.float32, buffer=ctx,
                             offset=(first_row - self._context_start) * row_bytes,
                             strides=(cfg.lfr_stride * row_bytes, ctx.strides[1])).copy()
        else:  # the first frames (left edge repeated) and the flush (right edge repeated)
            centers = (self.frames_out + np.arange(count)) * cfg.lfr_stride
            offsets = np.arange(-cfg.lfr_left, cfg.lfr_right + 1)
            idx = np.clip(centers[:, None] + offsets[None, :], 0, total - 1) - self._context_start
            out = ctx[idx].reshape(count, cfg.dim)
        self.frames_out += count
        # Keep only what the next model frame can still need as left context.
        keep_from = max(self.frames_out * cfg.lfr_stride - cfg.lfr_left, 0)
        drop = keep_from - self._context_start
        if drop > 0:
            left = self._context_len - drop
            if left > 0:
                ctx[:left] = ctx[drop : self._context_len]
            self._context_len = max(left, 0)
            self._context_start = keep_from
        return out


@cache
def batch_fbank(config: FeatureConfig) -> BatchFbank:
    """The fbank extractor every stream with ``config`` shares (it holds only constants)."""
    return BatchFbank.from_config(config)


def extract_batch(streams: Sequence[FeatureStream], chunks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """:meth:`FeatureStream.accept` for many streams at once: one batched fbank pass for all of them (streams
    with the same config), then each stream's splicing. The same frames as accepting each chunk alone."""
    if not streams:
        return []
    states = [s.fbank_state for s in streams]
    fbanks = streams[0]._batch.compute(states, chunks)
    return [s.accept_fbank(f) for s, f in zip(streams, fbanks, strict=True)]


def offline_features(samples: np.ndarray, config: FeatureConfig | None = None) -> np.ndarray:
    """All model frames of a whole recording (the same as streaming it, then flushing)."""
    stream = FeatureStream(config)
    head = stream.accept(samples)
    return np.concatenate([head, stream.flush()])
