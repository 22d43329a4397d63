"""``kwsd eval``'s engine: every recording streamed once through the model at all LFR phases, decoded at every
threshold while the model runs, in bounded memory.

Only what the decoder reads is kept of the model's output (blank and the keyword tokens, plus each row's rank bound:
:meth:`KeywordDecoder.columns`), a block at a time, so memory does not grow with the length of a recording (a 10 h
file needs what a 10 s one does). Every threshold has its own decoders, exactly as the daemon's, because a hit resets
the search and starts the refractory period: counting candidates above a threshold would not be the same.
Positives are also evaluated started 10 and 20 ms later (the model frame is 30 ms), which checks that the
detections do not depend on where the audio began.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TextIO

import numpy as np

from kwsd.audio.wavfile import AudioFileError, read_wav_blocks, wav_seconds
from kwsd.kws.decoder import Keyword, KeywordDecoder
from kwsd.kws.detector import PhasedDecoder, PhaseHit, build_keywords, new_decoder
from kwsd.kws.features import FbankStream, LfrStacker
from kwsd.kws.session import ModelSession
from kwsd.settings import DetectorSettings, KeywordSettings

log = logging.getLogger(__name__)

CHUNK_FRAMES = 400
"""Model frames per phase in one inference call (12 s of audio)."""
SHIFTS = (0, 160, 320)
"""Offsets at which positives are evaluated, samples (0, 10 and 20 ms: the three framings of a 30 ms frame)."""


def keyword_columns(session: ModelSession, blocks: Iterable[np.ndarray], template: KeywordDecoder,
                    phases: int = 3, chunk_frames: int = CHUNK_FRAMES) -> Iterator[tuple[int, np.ndarray]]:
    """Stream a recording's audio blocks through the model at ``phases`` LFR phases.

    Yields ``(first_frame, columns [phases, T, R + 1])``: what ``template`` (and any decoder with its keywords and
    search settings) reads of the posteriors of model frames ``first_frame .. first_frame + T - 1``.
    """
    fc = session.contract.features
    fbank = FbankStream(fc)
    lfr = LfrStacker(fc, tuple(range(phases)))
    delay = session.contract.delay_frames
    cache = session.new_layer_cache(phases)
    outputs = 0
    pending: list[np.ndarray] = []
    pending_frames = 0

    def run(feats: np.ndarray) -> tuple[int, np.ndarray] | None:
        nonlocal outputs
        probs = session.update(feats, cache).probs.reshape(feats.shape[0], feats.shape[1], -1)  # every frame
        first = outputs - delay
        outputs += feats.shape[1]
        if first < 0:  # outputs before the first frame: the look-ahead warming up
            probs, first = probs[:, -first:], 0
        if probs.shape[1] == 0:
            return None
        return first, np.stack([template.columns(probs[p]) for p in range(phases)])

    def drain(final: bool) -> Iterator[tuple[int, np.ndarray]]:
        nonlocal pending, pending_frames
        while pending_frames >= chunk_frames or (final and pending_frames):
            data = np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
            n = min(chunk_frames, data.shape[1])
            pending = [data[:, n:]] if data.shape[1] > n else []
            pending_frames -= n
            out = run(data[:, :n])
            if out is not None:
                yield out

    last: np.ndarray | None = None  # the latest model frame of every phase
    for block in blocks:
        feats = lfr.accept(fbank.accept(block))
        if feats.shape[1]:
            pending.append(feats)
            pending_frames += feats.shape[1]
            last = feats[:, -1:]
            yield from drain(False)
    tail = lfr.accept(fbank.flush(), final=True)
    if tail.shape[1]:
        pending.append(tail)
        pending_frames += tail.shape[1]
        last = tail[:, -1:]
    if last is not None:  # the model's look-ahead: repeat the last frame so every real frame is decoded
        pending.append(np.repeat(last, delay, axis=1))
        pending_frames += delay
    yield from drain(True)


@dataclass(frozen=True)
class Found:
    """A detection in a recording (seconds in the recording's own time)."""

    wakeword_id: str
    start: float
    end: float
    score: float


@dataclass
class RecordingResult:
    """What the decoders at every threshold found in one recording at one offset."""

    hits: dict[float, list[Found]]
    best: dict[str, float]
    """Best score per keyword of a candidate within the keyword's shape limits, at the configured thresholds, over
    every phase: the threshold a missed positive would have needed."""
    seconds: float


def decode_recording(session: ModelSession, settings: DetectorSettings, blocks: Iterable[np.ndarray],
                     thresholds: Sequence[float], shift: int = 0, phases: int = 3,
                     on_audio: Callable[[float], None] | None = None) -> RecordingResult:
    """Detections in one recording at every threshold, plus the configured thresholds' best scores.

    ``shift``: samples dropped from the start (times stay in the original recording's time). ``on_audio`` is
    called with the seconds of audio each block adds (progress).
    """
    fc = session.contract.features
    rate = fc.sample_rate
    frame_seconds = fc.model_frame_samples / rate
    tokens = session.contract.tokens
    stride = fc.lfr_stride

    def decoders(threshold: float | None) -> PhasedDecoder:
        keywords = _keywords(settings.keywords, threshold, tokens, frame_seconds)
        return PhasedDecoder([new_decoder(keywords, settings, frame_seconds) for _ in range(phases)], stride)

    sets = {t: decoders(t) for t in thresholds}
    configured = decoders(None)
    template = configured.decoders[0]
    found: dict[float, list[PhaseHit]] = {t: [] for t in thresholds}
    seconds = 0.0

    def audio() -> Iterator[np.ndarray]:
        nonlocal seconds
        skip = shift
        for block in blocks:
            if on_audio is not None:
                on_audio(block.shape[0] / rate)
            seconds += block.shape[0] / rate
            if skip:
                cut = min(skip, block.shape[0])
                block, skip = block[cut:], skip - cut
            if block.shape[0]:
                yield block

    for first, cols in keyword_columns(session, audio(), template, phases):
        last = first + cols.shape[1] - 1
        for t, pd in [*sets.items(), (None, configured)]:
            hits = [(p, h) for p in range(phases) for h in pd.decoders[p].step_columns(cols[p], first)]
            fused = pd.fuse(hits, last)
            if t is not None:
                found[t].extend(fused)
    for t, pd in sets.items():
        found[t].extend(pd.fuse([], None))
    shift_samples = fc.frame_shift

    def to_found(ph: PhaseHit) -> Found:
        h = ph.hit
        start = (stride * h.start_frame + ph.phase) * shift_samples + shift
        end = (stride * h.end_frame + ph.phase) * shift_samples + fc.frame_length + shift
        return Found(h.keyword.wakeword_id, start / rate, end / rate, float(h.score))

    best = {k.wakeword_id: configured.best_score(k.wakeword_id, shaped=True) for k in settings.keywords}
    return RecordingResult({t: [to_found(ph) for ph in v] for t, v in found.items()}, best, seconds)


@lru_cache(maxsize=512)
def _keywords(keywords: tuple[KeywordSettings, ...], threshold: float | None, tokens: tuple[str, ...],
              frame_seconds: float) -> tuple[Keyword, ...]:
    """The configured keywords (all at ``threshold``, unless None), spelled once per evaluation rather than once
    per recording and threshold (spelling indexes the 2599 tokens: 0.6 ms, a quarter of a whole evaluation)."""
    kws = keywords if threshold is None else [dataclasses.replace(k, threshold=threshold) for k in keywords]
    return tuple(build_keywords(kws, tokens, frame_seconds))


# ---------------------------------------------------------------------------------------------------------------
# A whole evaluation


@dataclass(frozen=True)
class Positives:
    """A folder of recordings that say a keyword (``wakeword_id``; empty: every configured keyword)."""

    folder: Path
    wakeword_id: str = ""


@dataclass
class DetRow:
    threshold: float
    recall: float
    """Share of positives detected at every offset."""
    recall_by_shift: list[float]
    detected: int
    """Positives detected at every offset."""
    positives: int
    false_alarms: int
    false_alarms_per_hour: float
    negative_hours: float


@dataclass
class KeywordReport:
    keyword: str
    wakeword_id: str
    threshold: float
    """The configured threshold."""
    positives: int
    shifts_ms: list[float]
    rows: list[DetRow]
    false_alarms: list[dict[str, object]] = field(default_factory=list)
    """At the configured threshold: file, start, end (s), score."""
    missed: list[dict[str, object]] = field(default_factory=list)
    """At the configured threshold: file, shift_ms, best_score of every positive not detected."""


@dataclass
class Evaluation:
    keywords: list[KeywordReport]
    negative_hours: float
    negative_files: int
    unreadable: list[dict[str, str]]


class Progress:
    """A one-line progress bar on a terminal (stderr); silent when stderr is not a terminal."""

    def __init__(self, total_seconds: float, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.total = max(total_seconds, 1e-9)
        self.done = 0.0
        self.t0 = time.monotonic()
        self._shown = 0.0
        self._lock = threading.Lock()  # recordings decoded on several threads add to it

    def add(self, seconds: float) -> None:
        with self._lock:
            self._add(seconds)

    def _add(self, seconds: float) -> None:
        self.done += seconds
        now = time.monotonic()
        if self.enabled and now - self._shown >= 0.2:
            self._shown = now
            share = min(self.done / self.total, 1.0)
            elapsed = now - self.t0
            eta = elapsed / share - elapsed if share > 0 else 0.0
            bar = "#" * int(30 * share)
            self.stream.write(f"\reval [{bar:<30}] {share:6.1%}  {self.done / 60:7.1f}/{self.total / 60:.1f} min "
                              f"of audio  ETA {eta:4.0f} s ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def evaluate(session: ModelSession, settings: DetectorSettings, positives: Sequence[Positives],
             negatives: Sequence[Path], thresholds: Sequence[float], shifts: Sequence[int] = SHIFTS,
             progress: bool = True, jobs: int = 1) -> Evaluation:
    """Run every recording once per offset (positives) or once (negatives); one DET table per keyword, with a row
    for every threshold given and every configured one.

    ``jobs`` recordings are decoded at once, each on a thread of its own (the model and the numpy front end
    release the interpreter lock); every recording is decoded alone either way, so the result does not depend on
    ``jobs``.
    """
    rate = session.contract.features.sample_rate
    thresholds = sorted(set(thresholds) | {k.threshold for k in settings.keywords})
    pos_files = [(p, src.wakeword_id) for src in positives for p in sorted(src.folder.glob("*.wav"))]
    neg_files = [p for folder in negatives for p in sorted(folder.glob("*.wav"))]
    total = sum(wav_seconds(p) for p, _ in pos_files) * len(shifts) + sum(wav_seconds(p) for p in neg_files)
    bar = Progress(total) if progress else None
    unreadable: list[dict[str, str]] = []

    def run(task: tuple[Path, int]) -> RecordingResult | AudioFileError:
        path, shift = task
        try:
            return decode_recording(session, settings, read_wav_blocks(path), thresholds, shift,
                                    on_audio=bar.add if bar else None)
        except AudioFileError as exc:
            return exc

    tasks = [(path, shift) for path, _ in pos_files for shift in shifts] + [(path, 0) for path in neg_files]
    jobs = max(1, min(jobs, len(tasks)))
    with ThreadPoolExecutor(jobs, thread_name_prefix="kwsd-eval") if jobs > 1 else nullcontext() as pool:
        done = iter(pool.map(run, tasks) if pool is not None else map(run, tasks))

        def outcome(path: Path) -> RecordingResult | None:
            r = next(done)
            if isinstance(r, AudioFileError):
                if str(path) not in {u["file"] for u in unreadable}:
                    log.error("%s (skipped)", r)
                    unreadable.append({"file": str(path), "error": str(r)})
                return None
            return r

        pos_results: list[tuple[Path, str, list[RecordingResult]]] = []
        for path, wid in pos_files:
            results = [outcome(path) for _ in shifts]
            if all(r is not None for r in results):
                pos_results.append((path, wid, [r for r in results if r is not None]))
        neg_results: list[tuple[Path, RecordingResult]] = []
        for path in neg_files:
            r = outcome(path)
            if r is not None:
                neg_results.append((path, r))
    if bar:
        bar.close()
    hours = sum(r.seconds for _, r in neg_results) / 3600
    reports = []
    for kw in settings.keywords:
        wid = kw.wakeword_id
        mine = [(path, res) for path, w, res in pos_results if w in ("", wid)]
        rows = []
        for t in thresholds:
            hit = [[any(f.wakeword_id == wid for f in res[i].hits[t]) for i in range(len(shifts))] for _, res in mine]
            by_shift = [sum(h[i] for h in hit) / max(1, len(mine)) for i in range(len(shifts))]
            every = sum(all(h) for h in hit)
            fa = sum(1 for _, r in neg_results for f in r.hits[t] if f.wakeword_id == wid)
            rows.append(DetRow(t, every / max(1, len(mine)), by_shift, every, len(mine), fa,
                               fa / hours if hours else 0.0, hours))
        fas = [{"file": str(path), "start": round(f.start, 3), "end": round(f.end, 3), "score": round(f.score, 4)}
               for path, r in neg_results for f in r.hits[kw.threshold] if f.wakeword_id == wid]
        missed = [{"file": str(path), "shift_ms": 1000 * shifts[i] / rate, "best_score": round(res[i].best[wid], 4)}
                  for path, res in mine for i in range(len(shifts))
                  if not any(f.wakeword_id == wid for f in res[i].hits[kw.threshold])]
        reports.append(KeywordReport(kw.phrase.replace(" ", ""), wid, kw.threshold, len(mine),
                                     [1000 * s / rate for s in shifts], rows, fas, missed))
    return Evaluation(reports, hours, len(neg_results), unreadable)
