"""The multi-stream detector: audio in, keyword detections out, one batched inference call per step.

Each stream owns its feature state, a row of the shared model cache and a keyword decoder. ``accept`` turns audio
into model frames at once; ``step`` gathers every stream with frames pending into one ``session.run`` (the batch
dimension is the streams), scatters the new cache rows back with array indexing, and decodes each stream. Streams can
join and leave between steps. Time is counted in samples from each stream's start, so a replayed file and a live
microphone give the same detections whatever the block sizes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from kwsd.kws.decoder import Keyword, KeywordDecoder, KeywordError, tokenize
from kwsd.kws.features import FeatureStream, extract_batch
from kwsd.kws.session import ModelSession
from kwsd.settings import DetectorSettings, KeywordSettings

log = logging.getLogger(__name__)

_EXTRACT_MIN = 16
"""Fewest streams per thread worth handing feature extraction to a thread of its own."""


@dataclass(frozen=True)
class Detection:
    """A keyword heard on one stream. Sample indices count 16 kHz samples from the stream's start."""

    stream: str
    keyword: str
    wakeword_id: str
    score: float
    threshold: float
    start_sample: int
    """Start of the window of the keyword's first token peak."""
    end_sample: int
    """End of the window of the keyword's last token peak."""
    decided_sample: int
    """How much of the stream's audio the detection needed: the model frames up to the deciding one and the
    model's look-ahead (at most the audio accepted). It does not depend on how audio was blocked or batched."""
    sample_rate: int = 16000

    @property
    def start(self) -> float:
        return self.start_sample / self.sample_rate

    @property
    def end(self) -> float:
        return self.end_sample / self.sample_rate


@dataclass
class StepTiming:
    """Cumulative CPU-side wall time per stage, for benchmarks and metrics."""

    features: float = 0.0
    model: float = 0.0
    decoder: float = 0.0
    steps: int = 0
    frames: int = 0


@dataclass
class _Stream:
    name: str
    slot: int
    features: FeatureStream
    decoder: KeywordDecoder
    start_sample: int
    raw: list[np.ndarray] = field(default_factory=list)  # audio accepted, features not yet extracted
    pending: list[np.ndarray] = field(default_factory=list)
    pending_frames: int = 0
    outputs: int = 0  # model outputs produced so far (the first ``delay`` belong to the warm-up)
    samples_in: int = 0
    flushed: bool = False


def build_keywords(settings: Iterable[KeywordSettings], tokens: Sequence[str], frame_seconds: float
                   ) -> list[Keyword]:
    """Keywords from the config, spelled with the model's tokens; an unknown character is a KeywordError."""
    out = []
    for i, kw in enumerate(settings):
        try:
            ids = tokenize(kw.phrase, tokens)
        except KeywordError as exc:
            raise KeywordError(f"detector.keywords[{i}].phrase: {exc}") from exc
        out.append(Keyword(
            phrase=kw.phrase.replace(" ", ""),
            wakeword_id=kw.wakeword_id,
            token_ids=ids,
            threshold=kw.threshold,
            min_frames=max(1, math.floor(kw.min_duration / frame_seconds)),
            max_frames=math.ceil(kw.max_duration / frame_seconds),
        ))
    return out


def new_decoder(keywords: Sequence[Keyword], settings: DetectorSettings, frame_seconds: float) -> KeywordDecoder:
    """A keyword decoder with the search settings and refractory period of ``settings``.

    The one place the config becomes decoder arguments, so the detector's streams and ``kwsd eval`` decode alike.
    ``frame_seconds``: length of a model frame.
    """
    # Rounded first, so a period that is a whole number of frames is not pushed one frame up by float error.
    refractory = math.ceil(round(settings.refractory / frame_seconds, 9))
    return KeywordDecoder(keywords, beam=settings.beam, top_k=settings.top_k, token_floor=settings.token_floor,
                          refractory_frames=refractory)


class Detector:
    def __init__(self, session: ModelSession, settings: DetectorSettings, *, scan: bool = True,
                 threads: int | None = None) -> None:
        """``scan``: judge each batch's posteriors in one vectorised pass and run only the decoders of streams
        whose frames carry a keyword token (the detections are identical; false decodes every stream).
        ``threads``: threads extracting features in a step; default: the session's (``model.intra_op_threads``).
        """
        self.session = session
        self.settings = settings
        c = session.contract
        self.contract = c
        self.frame_samples = c.features.model_frame_samples
        self.sample_rate = c.features.sample_rate
        self.frame_seconds = self.frame_samples / self.sample_rate
        self.keywords = build_keywords(settings.keywords, c.tokens, self.frame_seconds)
        self.step_frames = max(1, settings.step_frames)
        self._streams: dict[str, _Stream] = {}
        self._cache = session.new_cache(0)
        self._free: list[int] = []
        self.timing = StepTiming()
        self.scan = scan
        self.threads = session.threads if threads is None else max(1, threads)
        self._raw: dict[str, _Stream] = {}  # streams with audio waiting for feature extraction
        self._pool: ThreadPoolExecutor | None = None
        self._scanner = self._new_decoder()  # judges the whole batch's posteriors for the per-stream decoders
        self.refractory_frames = self._scanner.refractory_frames

    def close(self) -> None:
        """Stop the feature threads (the detector stays usable, single-threaded)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.threads = 1

    # -- streams --------------------------------------------------------------------------------------------

    @property
    def streams(self) -> list[str]:
        return list(self._streams)

    def add_stream(self, name: str, start_sample: int = 0) -> None:
        """Start detecting on a new stream whose first sample has index ``start_sample``."""
        if name in self._streams:
            raise ValueError(f"stream {name!r} already exists")
        if not self._free:
            grow = max(16, self._cache.shape[0])
            self._free = list(range(self._cache.shape[0] + grow - 1, self._cache.shape[0] - 1, -1))
            self._cache = np.concatenate([self._cache, self.session.new_cache(grow)])
        slot = self._free.pop()
        self._cache[slot] = 0.0
        self._streams[name] = _Stream(
            name=name,
            slot=slot,
            features=FeatureStream(self.contract.features),
            decoder=self._new_decoder(),
            start_sample=start_sample,
        )

    def _new_decoder(self) -> KeywordDecoder:
        return new_decoder(self.keywords, self.settings, self.frame_seconds)

    def remove_stream(self, name: str) -> None:
        stream = self._streams.pop(name)
        self._raw.pop(name, None)
        self._free.append(stream.slot)

    def reset_stream(self, name: str, start_sample: int | None = None) -> None:
        """Forget a stream's audio (after a gap in capture): new features, cache and decoder."""
        stream = self._streams[name]
        self.remove_stream(name)
        self.add_stream(name, stream.start_sample + stream.samples_in if start_sample is None else start_sample)

    def samples_needed(self, name: str) -> int:
        """Samples the stream must still receive before :meth:`step` can run its next model step (0: it can now)."""
        stream = self._streams[name]
        frames = stream.outputs + self.step_frames
        return max(0, self.contract.features.samples_for(frames) - stream.samples_in)

    def rejected(self, name: str) -> dict[str, int]:
        """Rejected keyword candidates on a stream since it started (or was reset), per wake word id."""
        return self._streams[name].decoder.rejected_by_keyword()

    # -- audio ----------------------------------------------------------------------------------------------

    def accept(self, name: str, samples: np.ndarray) -> None:
        """Queue 16 kHz mono audio (int16, or float on the int16 scale) for a stream.

        The audio is copied (the caller may reuse its buffer); its features are extracted by the next
        :meth:`step` (or :meth:`finish`), for all streams at once and across ``threads`` threads.
        """
        stream = self._streams[name]
        block = np.array(samples, dtype=np.float32).ravel()
        stream.samples_in += int(block.shape[0])
        if block.shape[0]:
            if not stream.raw:
                self._raw[name] = stream
            stream.raw.append(block)

    def _extract(self, streams: list[_Stream]) -> None:
        chunks = [s.raw[0] if len(s.raw) == 1 else np.concatenate(s.raw) for s in streams]
        for stream, frames in zip(streams, extract_batch([s.features for s in streams], chunks), strict=True):
            stream.raw = []
            if frames.shape[0]:
                stream.pending.append(frames)
                stream.pending_frames += frames.shape[0]

    def _extract_all(self) -> None:
        """Features for every stream with audio accepted since the last step: one batched fbank pass per thread
        (numpy releases the interpreter lock, so ``threads`` threads work on separate streams at once)."""
        if not self._raw:
            return
        t0 = time.perf_counter()
        streams = list(self._raw.values())
        self._raw.clear()
        parts = min(self.threads, len(streams) // _EXTRACT_MIN) if self.threads > 1 else 1
        if parts > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="kwsd-features")
            edges = np.linspace(0, len(streams), parts + 1).astype(int).tolist()
            futures = [self._pool.submit(self._extract, streams[a:b]) for a, b in pairwise(edges[1:])]
            self._extract(streams[: edges[1]])
            for f in futures:
                f.result()
        else:
            self._extract(streams)
        self.timing.features += time.perf_counter() - t0

    def finish(self, name: str) -> list[Detection]:
        """End of a stream's input: flush its features and look-ahead and return the last detections."""
        stream = self._streams[name]
        if stream.raw:
            self._raw.pop(name, None)
            t0 = time.perf_counter()
            self._extract([stream])
            self.timing.features += time.perf_counter() - t0
        tail = stream.features.flush()
        if tail.shape[0]:
            stream.pending.append(tail)
            stream.pending_frames += tail.shape[0]
        last = tail[-1:] if tail.shape[0] else (stream.pending[-1][-1:] if stream.pending else None)
        if last is not None:  # the model's look-ahead: repeat the last frame so every real frame is decoded
            stream.pending.append(np.repeat(last, self.contract.delay_frames, axis=0))
            stream.pending_frames += self.contract.delay_frames
        stream.flushed = True
        hits = []
        while stream.pending_frames:
            hits.extend(self._run([stream], stream.pending_frames))
        return hits

    # -- inference ------------------------------------------------------------------------------------------

    def step(self) -> list[Detection]:
        """Run every stream with at least ``step_frames`` frames pending; repeat until none has."""
        self._extract_all()
        hits: list[Detection] = []
        while True:
            ready = [s for s in self._streams.values() if s.pending_frames >= self.step_frames]
            if not ready:
                return hits
            frames = self.step_frames * min(s.pending_frames // self.step_frames for s in ready)
            hits.extend(self._run(ready, frames))

    def _take(self, stream: _Stream, frames: int) -> np.ndarray:
        data = stream.pending[0] if len(stream.pending) == 1 else np.concatenate(stream.pending)
        stream.pending = [data[frames:]] if data.shape[0] > frames else []
        stream.pending_frames -= frames
        return data[:frames]

    def _run(self, streams: list[_Stream], frames: int) -> list[Detection]:
        t0 = time.perf_counter()
        feats = np.stack([self._take(s, frames) for s in streams])
        slots = np.fromiter((s.slot for s in streams), dtype=np.intp, count=len(streams))
        first, n = int(slots[0]), len(streams)
        rows: slice | np.ndarray = slots
        if int(slots[-1]) == first + n - 1 and (n < 3 or bool((np.diff(slots) == 1).all())):
            rows = slice(first, first + n)  # consecutive slots (the usual case): a view in, a block copy out
        t1 = time.perf_counter()
        probs, cache = self.session.run(feats, self._cache[rows])
        self._cache[rows] = cache
        t2 = time.perf_counter()
        delay = self.contract.delay_frames
        hits: list[Detection] = []
        if self.scan:
            busy, blank = self._scanner.scan(probs)
            busy_l, blank_l = busy.tolist(), blank.tolist()
        for i, s in enumerate(streams):
            first = s.outputs - delay  # model frame index of this block's first output
            s.outputs += frames
            if self.scan and first >= 0 and not busy_l[i]:
                s.decoder.skip(first, frames, blank_l[i])  # no keyword token in these frames
                continue
            p = probs[i]
            if first < 0:  # outputs before the stream's first frame: the look-ahead warming up
                p, first = p[-first:], 0
                if p.shape[0] == 0:
                    continue
            for hit in s.decoder.step(p, first):
                hits.append(Detection(
                    stream=s.name,
                    keyword=hit.keyword.phrase,
                    wakeword_id=hit.keyword.wakeword_id,
                    score=float(hit.score),
                    threshold=hit.keyword.threshold,
                    start_sample=s.start_sample + hit.start_frame * self.frame_samples,
                    end_sample=s.start_sample + hit.end_frame * self.frame_samples
                    + self.contract.features.frame_length,
                    decided_sample=s.start_sample + min(s.samples_in, (hit.decided_frame + delay + 1)
                                                        * self.frame_samples),
                    sample_rate=self.sample_rate,
                ))
        t3 = time.perf_counter()
        self.timing.features += t1 - t0
        self.timing.model += t2 - t1
        self.timing.decoder += t3 - t2
        self.timing.steps += 1
        self.timing.frames += frames * len(streams)
        return hits


def detect_samples(detector: Detector, name: str, samples: np.ndarray, block: int | None = None
                   ) -> list[Detection]:
    """Run one whole recording through ``detector`` as stream ``name`` (in blocks of ``block`` samples)."""
    detector.add_stream(name)
    hits: list[Detection] = []
    try:
        step = block or max(1, samples.shape[0])
        for i in range(0, samples.shape[0], step):
            detector.accept(name, samples[i : i + step])
            hits.extend(detector.step())
        hits.extend(detector.finish(name))
    finally:
        detector.remove_stream(name)
    return hits
