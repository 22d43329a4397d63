"""The multi-stream detector: audio in, keyword detections out, one batched inference call per step.

The model sees one frame per 30 ms, so an utterance lands on one of three low-frame-rate phases, and its score
depends on which (0.997 at one phase, 0.43 at another, for the same clip). A live microphone's phase is random, so
every stream runs all three: its 10 ms fbank is computed once, spliced at each phase, and the phases are three rows
of the shared model cache and of the same batched ``session.run``. Each phase has its own keyword decoder
(:class:`PhasedDecoder`): a keyword fires when any phase's candidate passes its threshold, the first phase's hit is
held for one more model frame so the other phases' hits of the same utterance can join it, and the best-scoring one
is reported; later hits of the keyword within its refractory period are the same utterance and are dropped. A shift
of the audio by 10 or 20 ms only changes which row hears which phase, so detections do not depend on where the audio
began. Holding the hit adds at most one model frame (30 ms) to the wake latency.

Each stream owns its feature state, three rows of the model cache and three decoders. ``accept`` queues audio;
``step`` extracts features for every stream, gathers every stream with frames pending into one ``session.update``
(the batch dimension is streams x phases; the model writes the new cache rows in place and computes the output
layer only on the frames where a keyword token can pass the decoders' floor) and decodes. Streams can join and leave
between steps. Time is counted in samples from each stream's start, so a replayed file and a live microphone give the
same detections whatever the block sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from functools import partial
from itertools import pairwise

import numpy as np

from kwsd.kws.decoder import NEAR_MISS_SETTLE, Hit, Keyword, KeywordDecoder, KeywordError, tokenize
from kwsd.kws.fbank import FbankState
from kwsd.kws.features import batch_fbank, lfr_ready, lfr_rows
from kwsd.kws.session import ModelSession, concurrently
from kwsd.settings import DetectorSettings, KeywordSettings

log = logging.getLogger(__name__)

_PART_MIN = 16
"""Fewest streams per thread worth handing a part of a step (features, model call, decoders) to a thread."""
_NEAR_JOIN = 4
"""Model frames by which the phases' near misses of one utterance may end apart and still be judged together."""
_QUIET_COHORT = 8
"""Fewest streams (by cache slot) whose quiet steps share one grid."""
_QUIET_MAX_STREAMS = 32
"""Most streams for which quiet streams take long steps. Beyond it every stream steps at ``step_frames``: each call
is then big enough that the per-call cost long steps save is less than what splitting a step's batch into
cohorts costs (more, smaller calls, and cache rows that are not consecutive copied in and out). Unpaced steps of
100 ms blocks, one thread: 64 streams 17.8 ms with long steps off vs 19.8 on, 256 streams 75.1 vs 78.1 (staggered
80.0 vs 87.3); 8 to 32 streams about even, one stream 0.4 ms on vs 0.6 off."""


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
    near_miss: bool = False
    """A candidate that scored below the threshold but at least ``near_miss_ratio`` of it on its best phase,
    while no phase fired (not a wake)."""

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
    rows: int = 0
    """Frames of batch rows (stream phases) the model ran, summed over calls."""
    computed: int = 0
    """Of those, the frames whose output layer ran (the others had no keyword token that could pass the floor)."""

    def add(self, other: StepTiming) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class _Work:
    """What one part of a step produced: kept apart per thread, merged in stream order afterwards."""

    split: bool = True
    """Whether the model call may split its batch across the session's threads (not when the step is split)."""
    hits: list[Detection] = field(default_factory=list)
    near: list[Detection] = field(default_factory=list)
    timing: StepTiming = field(default_factory=StepTiming)


@dataclass
class _Stream:
    name: str
    slot: int
    """Cache rows ``slot * phases .. slot * phases + phases - 1``, one per LFR phase."""
    phased: PhasedDecoder
    """One decoder per phase and the fusion of their hits."""
    start_sample: int
    fbank: FbankState = field(default_factory=FbankState)
    """The 10 ms step, once per stream: the samples its next fbank frame needs, and fbank frames so far."""
    context: list[np.ndarray] = field(default_factory=list)
    """Fbank frames ``context_start ..`` (pieces in order): what the model frames not yet run still splice."""
    context_start: int = 0
    taken: int = 0  # model frames (per phase) run so far
    raw: list[np.ndarray] = field(default_factory=list)  # audio accepted, features not yet extracted
    pending_frames: int = 0  # model frames (per phase) whose fbank frames are all there, not yet run
    outputs: int = 0  # model outputs produced so far (the first ``delay`` belong to the warm-up)
    samples_in: int = 0
    flushed: bool = False
    forming: bool = False  # a keyword may be forming: the stream steps at ``step_frames``


@dataclass(frozen=True)
class PhaseHit:
    """A keyword heard on one stream after fusing its phases: the best phase's hit."""

    phase: int
    hit: Hit
    first_decided: int
    """10 ms frame (``stride * model frame + phase``) at which the first phase decided."""


@dataclass
class _Held:
    first: int
    phase: int
    hit: Hit


@dataclass
class _Near:
    end: int  # 10 ms frame of the first phase's near miss's last peak
    phase: int
    hit: Hit


class PhasedDecoder:
    """The keyword decoders of one stream's LFR phases, and the fusion of their hits into one per utterance.

    Hits are taken in the order they were decided (10 ms resolution). The first phase's hit of a keyword is held
    until every phase has decoded one more model frame; the other phases' hits of it until then are the same
    utterance, and the best-scoring one is reported. Later hits of the keyword within the refractory period of the
    reported one are dropped (the same utterance heard late by another phase).

    Near misses (:meth:`fuse_near`) are fused the same way, later: a phase's near miss is final some frames after
    its last peak, so the group is judged once every phase is past that point. It is reported with the best
    phase's score only if no phase fired the keyword within the refractory period around it.
    """

    def __init__(self, decoders: Sequence[KeywordDecoder], stride: int = 3) -> None:
        self.decoders = list(decoders)
        self.stride = stride
        self.refractory = decoders[0].refractory_frames * stride  # 10 ms frames
        self._last_end: dict[str, int] = {}  # per keyword, the end (10 ms frames) of its last reported hit
        self._held: dict[str, _Held] = {}
        self._hit_ends: dict[str, deque[int]] = {}  # per keyword, the ends (10 ms frames) of recent hits
        self._near: dict[str, _Near] = {}  # per keyword, the near miss being fused
        self._last_near: dict[str, int] = {}  # per keyword, the end of its last reported near miss

    @property
    def idle(self) -> bool:
        """No hit held, no near miss forming or being fused: frames without keyword tokens change nothing here
        beyond the decoders' own :meth:`KeywordDecoder.skip`."""
        if self._held or self._near:
            return False
        for dec in self.decoders:
            if dec.near_pending:
                return False
        return True

    def fuse(self, found: Sequence[tuple[int, Hit]], last_frame: int | None) -> list[PhaseHit]:
        """Add the phases' hits ``(phase, hit)`` of frames up to ``last_frame`` (the last model frame every phase
        has decoded; None: the stream ended) and return the fused hits now complete."""
        stride = self.stride
        out: list[PhaseHit] = []
        for phase, hit in sorted(found, key=lambda ph: (stride * ph[1].decided_frame + ph[0], ph[0])):
            wid = hit.keyword.wakeword_id
            decided = stride * hit.decided_frame + phase
            held = self._held.get(wid)
            if held is not None and decided > held.first + stride:
                out.append(self._release(wid))
                held = None
            if held is not None:
                if hit.score > held.hit.score:
                    held.phase, held.hit = phase, hit
                continue
            last = self._last_end.get(wid)
            if last is not None and stride * hit.end_frame + phase - last < self.refractory:
                continue
            self._held[wid] = _Held(decided, phase, hit)
        for wid in [w for w, h in self._held.items() if last_frame is None or last_frame > h.first // stride]:
            out.append(self._release(wid))
        return out

    def _release(self, wid: str) -> PhaseHit:
        held = self._held.pop(wid)
        end = self.stride * held.hit.end_frame + held.phase
        self._last_end[wid] = end
        self._hit_ends.setdefault(wid, deque(maxlen=8)).append(end)
        return PhaseHit(held.phase, held.hit, held.first)

    def take_near(self, last_frame: int | None) -> list[PhaseHit]:
        """The phases' final near misses (:meth:`KeywordDecoder.take_near_misses`), fused; call after
        :meth:`fuse` with the same ``last_frame``."""
        if not self._near and not any(dec.near_pending for dec in self.decoders):
            return []
        final = last_frame is None
        return self.fuse_near(
            [(p, m) for p, dec in enumerate(self.decoders) for m in dec.take_near_misses(final)], last_frame)

    def fuse_near(self, found: Sequence[tuple[int, Hit]], last_frame: int | None) -> list[PhaseHit]:
        """Add the phases' near misses ``(phase, hit)`` and return the fused near misses now complete."""
        stride = self.stride
        out: list[PhaseHit] = []
        for phase, miss in sorted(found, key=lambda ph: (stride * ph[1].end_frame + ph[0], ph[0])):
            wid = miss.keyword.wakeword_id
            end = stride * miss.end_frame + phase
            near = self._near.get(wid)
            if near is not None and end - near.end >= self.refractory:
                self._release_near(wid, out)
                near = None
            if near is not None:
                if miss.score > near.hit.score:
                    near.phase, near.hit = phase, miss
                continue
            last = self._last_near.get(wid)
            if last is not None and end - last < self.refractory:
                continue  # the same candidate, final later on another phase
            self._near[wid] = _Near(end, phase, miss)
        for wid in [w for w, n in self._near.items()
                    if last_frame is None or last_frame > n.end // stride + NEAR_MISS_SETTLE + _NEAR_JOIN]:
            self._release_near(wid, out)
        return out

    def _release_near(self, wid: str, out: list[PhaseHit]) -> None:
        near = self._near.pop(wid)
        self._last_near[wid] = near.end
        ends = list(self._hit_ends.get(wid, ()))
        held = self._held.get(wid)
        if held is not None:
            ends.append(self.stride * held.hit.end_frame + held.phase)
        if any(abs(near.end - e) < self.refractory for e in ends):
            return  # a phase fired: the candidate was heard
        out.append(PhaseHit(near.phase, near.hit, self.stride * near.hit.decided_frame + near.phase))

    def best_score(self, wakeword_id: str | None = None, shaped: bool = False) -> float:
        """Best candidate score over every phase (fired, rejected or suppressed); 0 if none."""
        return max(dec.best_score(wakeword_id, shaped) for dec in self.decoders)

    def rejected_by_keyword(self) -> dict[str, int]:
        """Rejected candidates per wake word id; the phases judge the same candidates: the most any phase had."""
        out: dict[str, int] = {}
        for dec in self.decoders:
            for wid, n in dec.rejected_by_keyword().items():
                out[wid] = max(out.get(wid, 0), n)
        return out


def build_keywords(settings: Iterable[KeywordSettings], tokens: Sequence[str], frame_seconds: float
                   ) -> list[Keyword]:
    """Keywords from the config, spelled with the model's tokens; an unknown character is a KeywordError."""
    out = []
    for i, kw in enumerate(settings):
        try:
            ids = tokenize(kw.phrase, tokens)
        except KeywordError as exc:
            raise KeywordError(f"detector.keywords[{i}].phrase: {exc}") from exc
        try:
            keyword = Keyword(
                phrase=kw.phrase.replace(" ", ""),
                wakeword_id=kw.wakeword_id,
                token_ids=ids,
                threshold=kw.threshold,
                min_frames=max(1, math.floor(round(kw.min_duration / frame_seconds, 9))),
                max_frames=math.ceil(round(kw.max_duration / frame_seconds, 9)),
                max_gap_frames=math.ceil(round(kw.max_gap / frame_seconds, 9)) if kw.max_gap else None,
            )
        except KeywordError as exc:
            raise KeywordError(f"detector.keywords[{i}]: {exc}") from exc
        out.append(keyword)
    return out


def new_decoder(keywords: Sequence[Keyword], settings: DetectorSettings, frame_seconds: float,
                near_miss_ratio: float = 0.0) -> KeywordDecoder:
    """A keyword decoder with the search settings and refractory period of ``settings``.

    The one place the config becomes decoder arguments, so the detector's streams and ``kwsd eval`` decode alike.
    ``frame_seconds``: length of a model frame; ``near_miss_ratio``: see :class:`KeywordDecoder` (0: none).
    """
    # Rounded first, so a period that is a whole number of frames is not pushed one frame up by float error.
    refractory = math.ceil(round(settings.refractory / frame_seconds, 9))
    return KeywordDecoder(keywords, beam=settings.beam, top_k=settings.top_k, token_floor=settings.token_floor,
                          refractory_frames=refractory, near_miss_ratio=near_miss_ratio)


class Detector:
    def __init__(self, session: ModelSession, settings: DetectorSettings, *, scan: bool = True,
                 threads: int | None = None, phases: int = 3, near_miss_ratio: float = 0.0) -> None:
        """``scan``: judge each batch's posteriors in one vectorised pass and run only the decoders of streams
        whose frames carry a keyword token (the detections are identical; false decodes every stream).
        ``threads``: threads sharing a step's streams; default: the session's (``model.intra_op_threads``).
        ``phases``: LFR phases run per stream; 3 makes detection independent of the audio's offset (the default),
        1 runs only the model's training framing at a third of the model's cost (for measurements).
        ``near_miss_ratio``: report candidates scoring at least this fraction of the threshold (and below it, on
        no phase above it) through :meth:`near_misses`; 0: none.
        """
        self.session = session
        self.settings = settings
        c = session.contract
        self.contract = c
        self.frame_samples = c.features.model_frame_samples
        self.shift_samples = c.features.frame_shift
        self.sample_rate = c.features.sample_rate
        self.frame_seconds = self.frame_samples / self.sample_rate
        if not 1 <= phases <= c.features.lfr_stride:
            raise ValueError(f"phases {phases!r} must be 1..{c.features.lfr_stride}")
        self.phases = phases
        self._phase_list = tuple(range(phases))
        self._fbank = batch_fbank(c.features)
        self.keywords = build_keywords(settings.keywords, c.tokens, self.frame_seconds)
        self.step_frames = max(1, settings.step_frames)
        # A stream on which no keyword is forming (no phase's search holds its first tokens in order; see
        # ``KeywordDecoder.forming``) cannot be decided within its next steps: it steps at the cheaper
        # ``quiet_step_frames``, a stream with a keyword forming at ``step_frames`` (the wake latency's share).
        # Needs the batch scan (which says when a quiet stream's state cannot have changed).
        self.quiet_step_frames = max(self.step_frames, settings.quiet_step_frames) if scan else self.step_frames
        self.near_miss_ratio = near_miss_ratio
        self._near_misses: list[Detection] = []
        self._site_keywords = {  # a site's threshold replaces every keyword's own there
            site: [dataclasses.replace(kw, threshold=t) for kw in self.keywords]
            for site, t in settings.site_thresholds.items()}
        self._streams: dict[str, _Stream] = {}
        self._cache = session.new_layer_cache(0)  # [layers, slots * phases, ...]: each layer's rows contiguous
        self._free: list[int] = []
        self._slots = 0
        self._cohort = _QUIET_COHORT  # slots per quiet grid: the slots spread over at most quiet_step_frames grids
        self.timing = StepTiming()
        self.scan = scan
        self.threads = session.threads if threads is None else max(1, threads)
        self._pool: ThreadPoolExecutor | None = None
        self._scanner = self._new_decoder()  # judges the whole batch's posteriors for the per-stream decoders
        self._columns = self._scanner.column_ids  # blank, then the keyword tokens: what bounds a row's need
        # A little below the floor (1 %), so a frame left out cannot have a token the full posteriors put above it:
        # the bounds' logits take another path through the last two layers than the posteriors (float32 rounding).
        self._log_floor = math.log(self._scanner.token_floor) - 0.01 if self._scanner.token_floor > 0 else -math.inf
        self.refractory_frames = self._scanner.refractory_frames

    def close(self) -> None:
        """Stop the step's threads (the detector stays usable, single-threaded)."""
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
            grow = max(16, self._slots)
            self._free = list(range(self._slots + grow - 1, self._slots - 1, -1))
            self._cache = np.concatenate([self._cache, self.session.new_layer_cache(grow * self.phases)], axis=1)
            self._slots += grow
            self._cohort = max(_QUIET_COHORT, -(-self._slots // max(1, self.quiet_step_frames)))
        slot = self._free.pop()
        self._cache[:, slot * self.phases : (slot + 1) * self.phases] = 0.0
        fc = self.contract.features
        self._streams[name] = _Stream(
            name=name,
            slot=slot,
            phased=PhasedDecoder([self._new_decoder(name) for _ in range(self.phases)], fc.lfr_stride),
            start_sample=start_sample,
        )

    def _new_decoder(self, stream: str | None = None) -> KeywordDecoder:
        keywords = self.keywords if stream is None else self._site_keywords.get(stream, self.keywords)
        return new_decoder(keywords, self.settings, self.frame_seconds, self.near_miss_ratio)

    def keywords_of(self, name: str) -> list[Keyword]:
        """The keywords as a stream (site) decodes them: with its ``detector.site_thresholds`` entry, if any."""
        return self._site_keywords.get(name, self.keywords)

    def report_near_misses(self, ratio: float) -> None:
        """Report near misses at ``ratio`` (see ``near_miss_ratio``) on the streams added from now on; for a
        detector built by a factory that does not take the ratio."""
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"near_miss_ratio {ratio!r} is not in [0, 1)")
        if self._streams:
            raise ValueError("near misses must be asked for before the detector's first stream")
        self.near_miss_ratio = ratio

    def near_misses(self) -> list[Detection]:
        """Near misses (``near_miss`` set, score below the threshold) that became final since the last call."""
        out, self._near_misses = self._near_misses, []
        return out

    def remove_stream(self, name: str) -> None:
        stream = self._streams.pop(name)
        self._free.append(stream.slot)

    def reset_stream(self, name: str, start_sample: int | None = None) -> None:
        """Forget a stream's audio (after a gap in capture): new features, cache and decoder."""
        stream = self._streams[name]
        self.remove_stream(name)
        self.add_stream(name, stream.start_sample + stream.samples_in if start_sample is None else start_sample)

    def samples_needed(self, name: str) -> int:
        """Samples the stream must still receive before :meth:`step` can run its next model step (0: it can now)."""
        stream = self._streams[name]
        frames = stream.outputs + self._due(stream)[1]
        return max(0, self.contract.features.samples_for(frames, self.phases - 1) - stream.samples_in)

    def rejected(self, name: str) -> dict[str, int]:
        """Rejected keyword candidates on a stream since it started (or was reset), per wake word id (the phases
        judge the same candidates: the most any phase rejected)."""
        return self._streams[name].phased.rejected_by_keyword()

    def best_score(self, name: str, wakeword_id: str | None = None) -> float:
        """Best candidate score on a stream since it started, over every phase (diagnostics: ``kwsd eval``)."""
        return self._streams[name].phased.best_score(wakeword_id)

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
            stream.raw.append(block)

    def _extract(self, streams: list[_Stream]) -> None:
        """Features of the audio the streams accepted since their last step: one batched fbank pass."""
        chunks = [s.raw[0] if len(s.raw) == 1 else np.concatenate(s.raw) for s in streams]
        fc, phases = self.contract.features, self._phase_list
        for stream, fbank in zip(streams, self._fbank.compute([s.fbank for s in streams], chunks), strict=True):
            stream.raw = []
            if fbank.shape[0]:
                stream.context.append(fbank)
                stream.pending_frames = lfr_ready(fc, phases, stream.fbank.frames) - stream.taken

    def finish(self, name: str) -> list[Detection]:
        """End of a stream's input: flush its features and look-ahead and return the last detections."""
        stream = self._streams[name]
        work = _Work()
        if stream.raw:
            t0 = time.perf_counter()
            self._extract([stream])
            work.timing.features += time.perf_counter() - t0
        frames = lfr_ready(self.contract.features, self._phase_list, stream.fbank.frames, final=True) - stream.taken
        if stream.taken or frames > 0:  # the model's look-ahead: the last frame repeats so every real frame decodes
            frames += self.contract.delay_frames
        stream.flushed = True
        if frames > 0:
            self._run([stream], frames, work, final=True)
        work.hits.extend(self._detections(stream, stream.phased.fuse([], None)))
        if self.near_miss_ratio:
            work.near.extend(self._detections(stream, stream.phased.take_near(None), near_miss=True))
        return self._merged([work])

    # -- inference ------------------------------------------------------------------------------------------

    def _due(self, s: _Stream) -> tuple[bool, int]:
        """(hot, frames): whether the stream steps at ``step_frames`` (a keyword may be forming on it, a hit is
        held, or quiet steps are off, as they are beyond ``_QUIET_MAX_STREAMS`` streams), and the frames it must
        have pending for its next step. A quiet stream steps at its next point on a grid of ``quiet_step_frames``
        of its outputs, so quiet streams that began together step together (one batched call, not one wake-up
        each). Each cohort of slots (``_QUIET_COHORT``, more once the slots outnumber that on every one of the
        ``quiet_step_frames`` grids) has its grid a frame after the last one's, so many quiet streams take their
        long steps in turns (a few sites share one grid)."""
        q = self.quiet_step_frames
        if q <= self.step_frames or len(self._streams) > _QUIET_MAX_STREAMS or s.forming or not s.phased.idle:
            return True, self.step_frames
        return False, q - (s.outputs + s.slot // self._cohort) % q

    def step(self) -> list[Detection]:
        """Run every stream with at least its step's frames pending (``step_frames``, or ``quiet_step_frames``
        for a quiet stream) on all its pending frames.

        Streams fed in real time have ``step_frames`` or one frame more pending (100 ms blocks are 3.33 model
        frames): each of those two groups is one batched call, so no stream carries a frame to the next step
        (where it would be decided a block later) and no step runs more than one frame above the average.
        Backlogs of other sizes (whole files) run in rounds of the smallest one, all of them in every round.
        Quiet streams and streams at ``step_frames`` are batched apart, so a quiet stream keeps its long steps.

        With ``threads`` > 1 and enough streams, the streams are cut into one part per thread and each thread
        runs its part's whole step (features, model call, decoders). The parts' interpreter-bound work (the
        splice gather, the decoders) then overlaps the others' fbank and model time, which release the lock.
        """
        streams = list(self._streams.values())
        if not any(s.raw or s.pending_frames for s in streams):
            return []
        parts = min(self.threads, len(streams) // _PART_MIN) if self.threads > 1 else 1
        if parts <= 1:
            work = _Work()
            self._step_part(streams, work)
            return self._merged([work])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="kwsd-step")
        edges = np.linspace(0, len(streams), parts + 1).astype(int).tolist()
        works = [_Work(split=False) for _ in range(parts)]
        concurrently(self._pool, [partial(self._step_part, streams[a:b], w)
                                  for (a, b), w in zip(pairwise(edges), works, strict=True)])
        return self._merged(works)

    def _merged(self, works: list[_Work]) -> list[Detection]:
        """The hits of a step's parts in stream order; their near misses and timings added to the detector's."""
        hits: list[Detection] = []
        for w in works:
            hits.extend(w.hits)
            self._near_misses.extend(w.near)
            self.timing.add(w.timing)
        return hits

    def _step_part(self, streams: list[_Stream], work: _Work) -> None:
        """One step of ``streams`` (all of them, or one thread's part): their features, then their model calls."""
        fresh = [s for s in streams if s.raw]
        if fresh:
            t0 = time.perf_counter()
            self._extract(fresh)
            work.timing.features += time.perf_counter() - t0
        while True:
            groups: tuple[list[_Stream], list[_Stream]] = ([], [])  # forming (hot) streams, quiet ones
            for s in streams:
                hot, frames = self._due(s)
                if s.pending_frames >= frames:
                    groups[0 if hot else 1].append(s)
            if not groups[0] and not groups[1]:
                return
            for group in groups:
                if group:
                    self._run_ready(group, work)

    def _run_ready(self, ready: list[_Stream], work: _Work) -> None:
        least = min(s.pending_frames for s in ready)
        longer = [s for s in ready if s.pending_frames > least]
        if longer and all(s.pending_frames == least + 1 for s in longer):
            self._run([s for s in ready if s.pending_frames == least], least, work)
            self._run(longer, least + 1, work)
            return
        self._run(ready, least, work)

    def _features(self, streams: list[_Stream], frames: int, final: bool) -> np.ndarray:
        """Model input ``[streams * phases, frames, dim]``: one gather from all the streams' fbank frames."""
        fc = self.contract.features
        pieces: list[np.ndarray] = []
        bases: list[int] = []
        ends: list[int] = []
        offset = 0
        for s in streams:
            bases.append(offset - s.context_start)
            pieces.extend(s.context)
            offset += sum(p.shape[0] for p in s.context)
            ends.append(offset)
        fbank = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        taken = np.fromiter((s.taken for s in streams), dtype=np.intp, count=len(streams))
        total = np.fromiter((s.fbank.frames for s in streams), dtype=np.intp, count=len(streams))
        base = np.array(bases, dtype=np.intp)
        rows = lfr_rows(fc, self._phase_list, taken, frames, total, final)
        feats = fbank[rows + base[:, None, None, None]].reshape(len(streams) * self.phases, frames, fc.dim)
        # Keep the fbank frames from the last model frame run on (a view of this step's gathered frames: no copy
        # per stream): the next frames splice part of them, and a flush may repeat the last frame.
        stride, left = fc.lfr_stride, fc.lfr_left
        for s, b, end in zip(streams, bases, ends, strict=True):
            s.taken += frames
            s.pending_frames -= frames
            keep = min(max(stride * (s.taken - 1) - left, 0), s.fbank.frames)
            s.context = [fbank[b + keep : end]] if end > b + keep else []
            s.context_start = keep
        return feats

    def _run(self, streams: list[_Stream], frames: int, work: _Work, final: bool = False) -> None:
        """One batched model call on ``frames`` pending frames of ``streams``, then their decoders."""
        t0 = time.perf_counter()
        n_phases = self.phases
        feats = self._features(streams, frames, final)  # [streams * phases, frames, dim]
        slots = np.fromiter((s.slot for s in streams), dtype=np.intp, count=len(streams))
        first, n = int(slots[0]), len(streams)
        rows: slice | np.ndarray
        if int(slots[-1]) == first + n - 1 and (n < 3 or bool((np.diff(slots) == 1).all())):
            rows = slice(first * n_phases, (first + n) * n_phases)  # consecutive slots: a view in, a block copy out
        else:
            rows = (slots[:, None] * n_phases + np.arange(n_phases)).ravel()
        t1 = time.perf_counter()
        delay = self.contract.delay_frames
        need = self._need(streams)
        if isinstance(rows, slice):  # the model writes the new cache rows over the old ones
            out = self.session.update(feats, self._cache[:, rows], need, self._columns, self._log_floor,
                                      split=work.split)
        else:
            cache = self._cache.take(rows, axis=1)  # C-contiguous (a mixed slice + index view need not be)
            out = self.session.update(feats, cache, need, self._columns, self._log_floor, split=work.split)
            self._cache[:, rows] = cache
        t2 = time.perf_counter()
        n_rows = feats.shape[0]
        probs, computed = out.probs, out.rows
        # Row -> where its computed frames (the last ``size`` of the step's) begin in ``probs``.
        lengths = frames - out.starts
        size, at = np.zeros(n_rows, dtype=np.intp), np.zeros(n_rows, dtype=np.intp)
        size[computed] = lengths
        at[computed] = np.cumsum(lengths) - lengths
        at_l, size_l = at.tolist(), size.tolist()
        if self.scan:
            # A row (or the first frames of one) the model did not compute has no keyword token above the floor,
            # and its decoders are collapsed there, so whether a frame was blank-only changes nothing.
            busy, blank = np.zeros(n_rows, dtype=bool), np.zeros(n_rows, dtype=bool)
            if computed.size:
                busy_f, blank_f = self._scanner.scan(probs[:, None, :])  # per computed frame
                busy[computed] = np.logical_or.reduceat(busy_f, at[computed])
                blank[computed] = np.logical_or.reduceat(blank_f, at[computed])
            busy_l, blank_l = busy.tolist(), blank.tolist()
            quiet: list[bool] = (~busy.reshape(-1, n_phases).any(axis=1)).tolist()  # type: ignore[assignment]
        for i, s in enumerate(streams):
            first = s.outputs - delay  # model frame index of this block's first output
            s.outputs += frames
            if self.scan and first >= 0 and quiet[i] and s.phased.idle:
                # Nothing to decode, hold or report: the cheap path of most streams in most steps.
                for phase, dec in enumerate(s.phased.decoders):
                    dec.skip(first, frames, blank_l[i * n_phases + phase])
                if s.forming:  # the searches did not change, but their tokens grow older
                    s.forming = any(dec.forming for dec in s.phased.decoders)
                continue
            found: list[tuple[int, Hit]] = []
            for phase, dec in enumerate(s.phased.decoders):
                row = i * n_phases + phase
                if self.scan and first >= 0 and not busy_l[row]:
                    dec.skip(first, frames, blank_l[row])  # no keyword token in these frames
                    continue
                n = size_l[row]
                p, start = probs[at_l[row] : at_l[row] + n], first + frames - n  # the frames computed
                if start < 0:  # outputs before the stream's first frame: the look-ahead warming up
                    p, start = p[-start:], 0
                if start > max(first, 0):  # frames the model left out: no keyword token, the searches collapsed
                    dec.skip(max(first, 0), start - max(first, 0), False)
                if p.shape[0]:
                    found.extend((phase, hit) for hit in dec.step(p, start))
            work.hits.extend(self._detections(s, s.phased.fuse(found, first + frames - 1)))
            if self.near_miss_ratio:
                work.near.extend(self._detections(s, s.phased.take_near(first + frames - 1), near_miss=True))
            if self.quiet_step_frames > self.step_frames:
                s.forming = any(dec.forming for dec in s.phased.decoders)
        t3 = time.perf_counter()
        timing = work.timing
        timing.features += t1 - t0
        timing.model += t2 - t1
        timing.decoder += t3 - t2
        timing.steps += 1
        timing.frames += frames * len(streams)
        timing.rows += n_rows * frames
        timing.computed += probs.shape[0]

    def _need(self, streams: list[_Stream]) -> np.ndarray | None:
        """Per row of this step's batch, whether all its posteriors are needed whatever its keyword tokens' bounds
        (None: every row's): without the batch scan, and where a decoder's search is not collapsed, since a
        blank-only frame then changes it, and telling one needs the posteriors. Elsewhere (a new stream's decoders
        too) a row's posteriors are needed from its first frame where a keyword token may pass the floor."""
        if not self.scan:
            return None
        need: list[bool] = []
        for s in streams:
            need.extend([not dec.collapsed for dec in s.phased.decoders])
        return np.array(need, dtype=bool)

    def _detections(self, s: _Stream, fused: list[PhaseHit], near_miss: bool = False) -> list[Detection]:
        stride = self.contract.features.lfr_stride
        shift = self.shift_samples
        out = []
        for ph in fused:
            hit, phase = ph.hit, ph.phase
            # Known once every phase decoded the frame after the first decision, and the model's look-ahead.
            decided = stride * (ph.first_decided // stride + 1 + self.contract.delay_frames + 1)
            out.append(Detection(
                stream=s.name,
                keyword=hit.keyword.phrase,
                wakeword_id=hit.keyword.wakeword_id,
                score=float(hit.score),
                threshold=hit.keyword.threshold,
                start_sample=s.start_sample + (stride * hit.start_frame + phase) * shift,
                end_sample=s.start_sample + (stride * hit.end_frame + phase) * shift
                + self.contract.features.frame_length,
                decided_sample=s.start_sample + min(s.samples_in, decided * shift),
                sample_rate=self.sample_rate,
                near_miss=near_miss,
            ))
        return out


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
