"""Streaming Kaldi features, exactly as the model was trained, at every low-frame-rate phase.

Two steps, so either can be replaced on its own:

1. The 10 ms step: Kaldi fbank (80 mel bins, 25 ms window, 10 ms shift, hamming, int16-scale samples, no dither;
   equal to kaldi-native-fbank), one frame per 10 ms (:class:`FbankStream`), computed for many streams in one
   vectorised pass (:class:`kwsd.kws.fbank.BatchFbank`).
2. Splice + LFR per phase (:class:`LfrStacker`): model frame ``k`` of phase ``p`` splices fbank frames
   ``3k+p-2 .. 3k+p+2`` (the first fbank frame is repeated on the left at the start; the last one on the right
   when the stream ends), so one model frame covers 30 ms. The model was trained on phase 0 of every utterance;
   a live microphone's audio may start anywhere, so the detector runs all three phases and an utterance is always
   heard at the framing that suits it best.

Every leftover (samples, fbank frames, the decimation phase) is carried between calls, so any chunking of the audio
yields the same frames.
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

    def samples_for(self, frames: int, phase: int = 0) -> int:
        """Samples a stream must have received before phase ``phase`` has produced ``frames`` model frames
        (unflushed).

        Model frame k of phase p needs fbank frame ``stride * k + p + right``; fbank frame f needs samples up to
        ``frame_length + f * frame_shift`` (Kaldi's snip_edges framing).
        """
        if frames <= 0:
            return 0
        last_fbank = self.lfr_stride * (frames - 1) + phase + self.lfr_right
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


class FbankStream:
    """The 10 ms step of one stream: 16 kHz int16-scale audio in, fbank frames ``[n, num_mel_bins]`` out."""

    def __init__(self, config: FeatureConfig | None = None) -> None:
        self.config = config or FeatureConfig()
        self._batch = batch_fbank(self.config)
        self.reset()

    def reset(self) -> None:
        self.state = FbankState()  # the samples the next frame still needs

    def accept(self, samples: np.ndarray) -> np.ndarray:
        """Feed 16 kHz samples (int16, or float on the int16 scale); return the fbank frames now complete."""
        return self._batch.compute([self.state], [samples])[0]

    def flush(self) -> np.ndarray:
        """End of the stream: the last fbank frames (snip_edges framing: none past the last full window)."""
        return np.empty((0, self.config.num_mel_bins), dtype=np.float32)


@cache
def batch_fbank(config: FeatureConfig) -> BatchFbank:
    """The fbank extractor every stream with ``config`` shares (it holds only constants)."""
    return BatchFbank.from_config(config)


def lfr_rows(config: FeatureConfig, phases: tuple[int, ...], first: np.ndarray, frames: int,
             fbank_total: np.ndarray, final: bool = False) -> np.ndarray:
    """Which fbank frames model frames ``first .. first+frames-1`` of ``n`` streams splice, at each phase.

    ``first`` and ``fbank_total`` [n] (fbank frames each stream has); returns absolute fbank frame indices
    ``[n, len(phases), frames, left + 1 + right]``. The first fbank frame repeats on the left. ``final``: the
    streams end here; the last fbank frame repeats on the right, and model frames past a stream's last one (the
    model's look-ahead being flushed) repeat that last frame. Gathering these rows of the fbank frames gives the
    model's input for a whole batch in one indexing operation.
    """
    stride = config.lfr_stride
    start = stride * first[:, None, None, None]
    if not final:
        rows = start + _splice_pattern(stride, config.lfr_left, config.lfr_right, phases, frames)[None]
        if int(first.min()) * stride + min(phases) >= config.lfr_left:  # no left edge: every row is there
            return rows
        return np.maximum(rows, 0)
    k = first[:, None, None, None] + np.arange(frames)[None, None, :, None]
    total = fbank_total[:, None, None, None]
    k = np.minimum(k, (total - 1 - min(phases)) // stride)
    rows = stride * k + np.array(phases)[None, :, None, None] + np.arange(-config.lfr_left, config.lfr_right + 1)
    return np.clip(rows, 0, np.maximum(total - 1, 0))


@cache
def _splice_pattern(stride: int, left: int, right: int, phases: tuple[int, ...], frames: int) -> np.ndarray:
    """Row offsets ``[phases, frames, left + 1 + right]`` of model frames 0 .. frames-1 (read-only)."""
    k = np.arange(frames)[None, :, None]
    out = stride * k + np.array(phases)[:, None, None] + np.arange(-left, right + 1)[None, None, :]
    out.setflags(write=False)
    return out


def lfr_ready(config: FeatureConfig, phases: Sequence[int], fbank_total: int, final: bool = False) -> int:
    """Model frames (per phase) that ``fbank_total`` fbank frames complete: every phase's right context is
    there, or, ``final``, every model frame whose centre exists at the first phase."""
    if fbank_total <= 0:
        return 0
    if final:
        return (fbank_total - 1 - min(phases)) // config.lfr_stride + 1
    return max(0, (fbank_total - 1 - config.lfr_right - max(phases)) // config.lfr_stride + 1)


class LfrStacker:
    """Splice + LFR of one stream's fbank frames, for one or more phases at once.

    :meth:`accept` returns ``[phases, m, dim]``: the same model frame indices for every phase (frame ``k`` of a
    phase is emitted once every phase has it), so the phases run side by side as rows of one model batch.
    """

    def __init__(self, config: FeatureConfig | None = None, phases: Sequence[int] = (0,)) -> None:
        self.config = config or FeatureConfig()
        if not phases or any(not 0 <= p < self.config.lfr_stride for p in phases):
            raise ValueError(f"phases {tuple(phases)!r} must be distinct values in 0..{self.config.lfr_stride - 1}")
        self.phases = tuple(phases)
        self.reset()

    def reset(self) -> None:
        # Fbank frames kept for splicing: rows [0, _context_len) of _context, the first one is fbank frame
        # _context_start. A preallocated buffer, so a block of audio costs no concatenation.
        self._context = np.empty((64, self.config.num_mel_bins), dtype=np.float32)
        self._context_len = 0
        self._context_start = 0
        self.fbank_in = 0  # fbank frames seen so far
        self.frames_out = 0  # model frames produced so far, per phase
        self.finished = False

    def accept(self, fbank: np.ndarray, final: bool = False) -> np.ndarray:
        """Add fbank frames ``[n, num_mel_bins]``; return the model frames now complete, ``[phases, m, dim]``.

        ``final``: the stream ends here; the right context of the last frames repeats the last fbank frame.
        """
        if self.finished:
            raise RuntimeError("stream already flushed; reset() it first")
        self._append(fbank)
        out = self._emit(final)
        self.finished = final
        return out

    def _append(self, fbank: np.ndarray) -> None:
        new = fbank.shape[0]
        if not new:
            return
        end = self._context_len + new
        if end > self._context.shape[0]:
            grown = np.empty((max(2 * self._context.shape[0], end), self._context.shape[1]), dtype=np.float32)
            grown[: self._context_len] = self._context[: self._context_len]
            self._context = grown
        self._context[self._context_len : end] = fbank
        self._context_len = end
        self.fbank_in += new

    def _emit(self, final: bool) -> np.ndarray:
        cfg = self.config
        total = self.fbank_in
        count = lfr_ready(cfg, self.phases, total, final) - self.frames_out
        n_phases = len(self.phases)
        if count <= 0:
            return np.empty((n_phases, 0, cfg.dim), dtype=np.float32)
        stride, left, lo = cfg.lfr_stride, cfg.lfr_left, min(self.phases)
        rows = lfr_rows(cfg, self.phases, np.array([self.frames_out]), count, np.array([total]), final)[0]
        ctx = self._context
        out = ctx[rows - self._context_start].reshape(n_phases, count, cfg.dim)
        self.frames_out += count
        # Keep only what the next model frame of any phase can still need as left context.
        keep_from = max(self.frames_out * stride + lo - left, 0)
        drop = min(keep_from - self._context_start, self._context_len)
        if drop > 0:
            left_rows = self._context_len - drop
            if left_rows > 0:
                ctx[:left_rows] = ctx[drop : self._context_len]
            self._context_len = left_rows
            self._context_start += drop
        return out


class FeatureStream:
    """Per-stream features: audio in, spliced model frames out, for the given LFR phases.

    With the default single phase 0 (the model's training framing), :meth:`accept` returns ``[n, dim]``; use
    :meth:`accept_phases` for ``[phases, n, dim]``.
    """

    def __init__(self, config: FeatureConfig | None = None, phases: Sequence[int] = (0,)) -> None:
        self.config = config or FeatureConfig()
        self.fbank = FbankStream(self.config)
        self.lfr = LfrStacker(self.config, phases)

    @property
    def frames_out(self) -> int:
        return self.lfr.frames_out

    @property
    def finished(self) -> bool:
        return self.lfr.finished

    def reset(self) -> None:
        self.fbank.reset()
        self.lfr.reset()

    def accept_phases(self, samples: np.ndarray) -> np.ndarray:
        """Feed 16 kHz samples (int16, or float on the int16 scale); return ``[phases, n, dim]`` now complete."""
        if self.lfr.finished:
            raise RuntimeError("stream already flushed; reset() it first")
        return self.lfr.accept(self.fbank.accept(samples))

    def flush_phases(self) -> np.ndarray:
        """End of the stream: the remaining model frames of every phase, ``[phases, n, dim]``."""
        if self.lfr.finished:
            raise RuntimeError("stream already flushed; reset() it first")
        return self.lfr.accept(self.fbank.flush(), final=True)

    def accept(self, samples: np.ndarray) -> np.ndarray:
        """Like :meth:`accept_phases`, for the first phase only: ``[n, dim]``."""
        return self.accept_phases(samples)[0]

    def flush(self) -> np.ndarray:
        """Like :meth:`flush_phases`, for the first phase only."""
        return self.flush_phases()[0]


def offline_features(samples: np.ndarray, config: FeatureConfig | None = None, phase: int = 0) -> np.ndarray:
    """All model frames of a whole recording at one LFR phase (the same as streaming it, then flushing)."""
    stream = FeatureStream(config, (phase,))
    head = stream.accept(samples)
    return np.concatenate([head, stream.flush()])
