"""CTC keyword decoder: one per stream (and LFR phase), fed the model's posteriors, emits keyword hits.

Each keyword has its own search: a CTC prefix beam search restricted to ``{blank} + its tokens``, in the log domain,
with its own refractory period, so one keyword never masks another (你好小云 and 小云小云 in "你好我是小云小云" both
fire). Per model frame (30 ms) only the top-k tokens above a floor count; a frame whose surviving tokens are neither
blank nor one of the keyword's tokens changes nothing for it. Every prefix remembers, per token, the frame and value
of its peak posterior; a prefix that ends with the keyword's token sequence is a candidate, scored by the geometric
mean of those peaks (so thresholds compare across keywords of different length) and bounded by the keyword's shape:
the span from the first to the last peak and the gap between consecutive peaks. A hit resets that keyword's search
and starts its refractory period. A candidate fires on the first frame it passes, so ``Hit.score`` is the score at
that frame. Tokens that peaked longer ago than the keyword may last are dropped from the prefixes: a keyword run that
long is never formed (so it is not counted as rejected either).

Speed: most frames are blank-dominated. A vectorised pass over the whole ``[T, V]`` block finds the few frames that
carry a keyword token; only those run the Python beam update. A run of blank-only frames changes the search in one
way only (every prefix ends in blank), applied once. Path scores are renormalised after every update, so hours of
frames cannot underflow. Frames are processed one at a time in order, so detections do not depend on how a stream's
frames are split across :meth:`KeywordDecoder.step` calls. :meth:`KeywordDecoder.columns` keeps only what the search
reads of a posterior row (the keyword columns and the row's k-th largest value), so long recordings can be decoded
at several thresholds without holding the model's 2599 outputs per frame.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

BLANK_ID = 0
"""Token id of the CTC blank (``<blank>``, first line of the token list)."""
SAMPLES_PER_FRAME = 480
"""One model frame: 3 fbank frames of 10 ms at 16 kHz."""

_NEG_INF = -math.inf
_SUM_SLACK = 1e-3
"""Allowed excess of a posterior row's sum over 1 (float32 softmax rounding) in the top-k shortcut."""
_MAX_PENDING = 256
"""Distinct rejected/suppressed candidates remembered for de-duplication, then folded into counts."""
NEAR_MISS_SETTLE = 17
"""Model frames (about 0.5 s) after a near miss's last token peak before it is final: its score can still grow."""

Peaks = tuple[tuple[int, float], ...]
"""Per token of a prefix: (frame, log posterior) of its peak."""


class KeywordError(ValueError):
    """A keyword that cannot be decoded (unknown character, bad limit); the message names the value."""


def load_tokens(path: Path) -> tuple[str, ...]:
    """Read a token list (one token per line, id = line number - 1; an optional second column is ignored)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeywordError(f"token list {path}: {exc.strerror or exc}") from exc
    tokens = tuple(line.split()[0] if line.strip() else line for line in text.splitlines())
    if not tokens or tokens[0] != "<blank>":
        raise KeywordError(f"token list {path}: first token must be <blank>, got {tokens[:1]!r}")
    return tokens


def tokenize(phrase: str, tokens: Sequence[str]) -> tuple[int, ...]:
    """Token ids of ``phrase``, one per character; whitespace is ignored.

    ``小云小云`` -> ``(1462, 976, 1462, 976)`` with the model's token list. A character missing
    from ``tokens`` raises :class:`KeywordError` naming it.
    """
    index: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        index.setdefault(tok, i)
    ids: list[int] = []
    for pos, char in enumerate(phrase):
        if char.isspace():
            continue
        tid = index.get(char)
        if tid is None:
            raise KeywordError(
                f"keyword {phrase!r}: character {char!r} (position {pos}) is not in the model's token list"
            )
        if tid == BLANK_ID:
            raise KeywordError(f"keyword {phrase!r}: character {char!r} is the CTC blank token")
        ids.append(tid)
    if not ids:
        raise KeywordError(f"keyword {phrase!r} is empty")
    return tuple(ids)


@dataclass(frozen=True)
class Keyword:
    """One keyword to detect, with its own threshold and duration limits (in model frames)."""

    phrase: str
    wakeword_id: str
    token_ids: tuple[int, ...]
    threshold: float
    """Minimum length-normalised score (geometric mean of the token peak posteriors), 0 < threshold <= 1."""
    min_frames: int
    """Shortest accepted keyword, model frames (first token's peak to last token's peak, inclusive)."""
    max_frames: int
    """Longest accepted keyword, model frames."""
    max_gap_frames: int | None = None
    """Longest accepted distance between the peaks of two consecutive tokens, model frames; None: no limit.
    Syllables of one spoken keyword follow each other closely; a longer gap means they came from different words."""

    def __post_init__(self) -> None:
        name = self.wakeword_id or self.phrase
        if not self.token_ids:
            raise KeywordError(f"keyword {name!r}: no tokens")
        for tid in self.token_ids:
            if not isinstance(tid, int | np.integer) or tid <= BLANK_ID:
                raise KeywordError(f"keyword {name!r}: token id {tid!r} is not a non-blank token id")
        if not 0.0 < self.threshold <= 1.0:
            raise KeywordError(f"keyword {name!r}: threshold {self.threshold!r} is not in (0, 1]")
        if self.min_frames < 1:
            raise KeywordError(f"keyword {name!r}: min_frames {self.min_frames!r} is below 1")
        if self.max_frames < self.min_frames:
            raise KeywordError(
                f"keyword {name!r}: max_frames {self.max_frames!r} is below min_frames {self.min_frames!r}"
            )
        if self.max_gap_frames is not None and self.max_gap_frames < 1:
            raise KeywordError(f"keyword {name!r}: max_gap_frames {self.max_gap_frames!r} is below 1")

    @classmethod
    def from_phrase(
        cls,
        phrase: str,
        tokens: Sequence[str],
        *,
        threshold: float,
        min_frames: int,
        max_frames: int,
        max_gap_frames: int | None = None,
        wakeword_id: str = "",
    ) -> Keyword:
        """Build a keyword from its spelling; the wake word id defaults to the phrase without spaces."""
        return cls(
            phrase=phrase,
            wakeword_id=wakeword_id or "".join(phrase.split()),
            token_ids=tokenize(phrase, tokens),
            threshold=threshold,
            min_frames=min_frames,
            max_frames=max_frames,
            max_gap_frames=max_gap_frames,
        )


@dataclass(frozen=True)
class Hit:
    """A detection. Frames are stream-absolute model frame indices (inclusive)."""

    keyword: Keyword
    score: float
    """Geometric mean of the keyword tokens' peak posteriors."""
    start_frame: int
    """Peak frame of the first keyword token."""
    end_frame: int
    """Peak frame of the last keyword token."""
    decided_frame: int
    """Frame whose posterior completed the decision (>= end_frame): the hit is known after it."""


# A hypothesis, per prefix: [log P(paths ending in blank), log P(paths ending in the last token),
# log P(best single path ending in blank), its peaks, log P(best path ending in the token), its peaks].
# Peaks follow the most probable single alignment (Viterbi): when paths of one prefix merge, the
# peaks of the alignment that explains the frames best are kept, whole, so they stay in token order.
_Hyp = list[Any]
_B, _NB, _VB, _PKB, _VNB, _PKNB = range(6)


def _logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    if b == _NEG_INF:
        return a
    return a + math.log1p(math.exp(b - a))


def _add_blank(nxt: dict[tuple[int, ...], _Hyp], prefix: tuple[int, ...], p: float, v: float,
               peaks: Peaks) -> None:
    cur = nxt.get(prefix)
    if cur is None:
        nxt[prefix] = [p, _NEG_INF, v, peaks, _NEG_INF, ()]
        return
    cur[_B] = _logaddexp(cur[_B], p)
    if v > cur[_VB]:
        cur[_VB] = v
        cur[_PKB] = peaks


def _add_token(nxt: dict[tuple[int, ...], _Hyp], prefix: tuple[int, ...], p: float, v: float,
               peaks: Peaks) -> None:
    cur = nxt.get(prefix)
    if cur is None:
        nxt[prefix] = [_NEG_INF, p, _NEG_INF, (), v, peaks]
        return
    cur[_NB] = _logaddexp(cur[_NB], p)
    if v > cur[_VNB]:
        cur[_VNB] = v
        cur[_PKNB] = peaks


def _stale_count(peaks: Peaks, horizon: int) -> int:
    n = 0
    for frame, _ in peaks:
        if frame >= horizon:
            break
        n += 1
    return n


class _Search:
    """The prefix beam search of one keyword, its refractory period and its candidate counts."""

    def __init__(self, keyword: Keyword, columns: tuple[int, ...], token_ids: tuple[int, ...],
                 near_miss_ratio: float = 0.0) -> None:
        self.keyword = keyword
        self.near_floor = near_miss_ratio * keyword.threshold if near_miss_ratio > 0 else math.inf
        """Candidates in [near_floor, threshold) within the shape limits are near misses."""
        self.columns = columns
        """Positions of blank and of this keyword's distinct tokens among the decoder's relevant columns."""
        self.token_ids = token_ids
        """Token id of each of those columns."""
        self.reset()

    def __eq__(self, other: object) -> bool:
        """Same keyword and same state (two decoders fed the same frames compare equal)."""
        return isinstance(other, _Search) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]

    def reset(self) -> None:
        self.reset_search()
        self.last_hit_end: int | None = None
        self.rejected = 0
        self.suppressed = 0
        self.pending_rejects: set[int] = set()  # start frames of candidates rejected since the last fold
        self.pending_suppressed: set[int] = set()
        self.best = 0.0
        self.best_shaped = 0.0  # best candidate within the keyword's span and gap limits
        self.near: Hit | None = None  # the best near miss of the candidate still forming
        self.near_done: list[Hit] = []

    def reset_search(self) -> None:
        self.hyps: dict[tuple[int, ...], _Hyp] = {(): [0.0, _NEG_INF, 0.0, (), _NEG_INF, ()]}
        self.collapsed = True

    def collapse(self) -> None:
        """Apply a blank-only frame: every prefix now ends in blank. Ranking is unchanged; idempotent."""
        if self.collapsed:
            return
        for hyp in self.hyps.values():
            hyp[_B] = _logaddexp(hyp[_B], hyp[_NB])
            hyp[_NB] = _NEG_INF
            if hyp[_VNB] > hyp[_VB]:
                hyp[_VB] = hyp[_VNB]
                hyp[_PKB] = hyp[_PKNB]
            hyp[_VNB] = _NEG_INF
            hyp[_PKNB] = ()
        self.collapsed = True

    def advance(self, frame: int, toks: list[tuple[int, float]], beam: int) -> None:
        """One frame of prefix beam search over the surviving ``(token, log posterior)``."""
        nxt: dict[tuple[int, ...], _Hyp] = {}
        max_len = len(self.keyword.token_ids)
        # A token that peaked before the horizon can no longer start a keyword short enough for its limit: drop
        # it, so a stale alignment cannot stand in for a fresh one of the same tokens.
        horizon = frame - self.keyword.max_frames + 1
        for prefix, (pb, pnb, vb, pkb, vnb, pknb) in self.hyps.items():
            if prefix:
                stale = min(
                    _stale_count(pkb, horizon) if vb > _NEG_INF else len(prefix),
                    _stale_count(pknb, horizon) if vnb > _NEG_INF else len(prefix),
                )
                if stale == len(prefix) and pnb > _NEG_INF:
                    stale -= 1  # a token still held decides whether a repeat is a new token
                if stale:
                    prefix = prefix[stale:]
                    pkb = pkb[stale:]
                    pknb = pknb[stale:]
            last = prefix[-1] if prefix else -1
            total = _logaddexp(pb, pnb)
            if vnb > vb:
                vbest, pkbest = vnb, pknb
            else:
                vbest, pkbest = vb, pkb
            for tok, lp in toks:
                if tok == BLANK_ID:
                    _add_blank(nxt, prefix, total + lp, vbest + lp, pkbest)
                    continue
                if tok == last:
                    # Staying in the last token (no blank between) extends nothing; it may raise that token's
                    # peak. A repeat is a new token only after a blank.
                    if pnb > _NEG_INF:
                        stay = (*pknb[:-1], (frame, lp)) if lp > pknb[-1][1] else pknb
                        _add_token(nxt, prefix, pnb + lp, vnb + lp, stay)
                    if pb == _NEG_INF:
                        continue
                    p_src, v_src, pk_src = pb, vb, pkb
                else:
                    p_src, v_src, pk_src = total, vbest, pkbest
                new_prefix = (*prefix, tok)
                new_peaks = (*pk_src, (frame, lp))
                # Only the last max_len tokens can still become part of the keyword: older ones are dropped,
                # which also merges prefixes that can no longer be told apart.
                if len(new_prefix) > max_len:
                    new_prefix = new_prefix[1:]
                    new_peaks = new_peaks[1:]
                _add_token(nxt, new_prefix, p_src + lp, v_src + lp, new_peaks)

        ranked = sorted(nxt.items(), key=lambda item: _logaddexp(item[1][_B], item[1][_NB]), reverse=True)
        del ranked[beam:]
        top = _logaddexp(ranked[0][1][_B], ranked[0][1][_NB])
        hyps: dict[tuple[int, ...], _Hyp] = {}
        for prefix, hyp in ranked:
            hyp[_B] -= top
            hyp[_NB] -= top
            hyp[_VB] -= top
            hyp[_VNB] -= top
            hyps[prefix] = hyp
        self.hyps = hyps
        self.collapsed = False

    def detect(self, frame: int, refractory: int) -> Hit | None:
        """Check the prefixes whose last token peaked at ``frame`` for the keyword ending there."""
        kw = self.keyword
        ids = kw.token_ids
        n = len(ids)
        best: Hit | None = None
        for prefix, hyp in self.hyps.items():
            peaks = hyp[_PKNB]
            if not peaks or peaks[-1][0] != frame or len(prefix) < n or prefix[-n:] != ids:
                continue  # unchanged since the previous frame (already judged), or not the keyword
            run = peaks[-n:]
            start, end = run[0][0], run[-1][0]
            score = math.exp(math.fsum(v for _, v in run) / n)
            if score > self.best:
                self.best = score
            duration = end - start + 1
            gap_ok = kw.max_gap_frames is None or all(
                b[0] - a[0] <= kw.max_gap_frames for a, b in pairwise(run))
            shaped = gap_ok and kw.min_frames <= duration <= kw.max_frames
            if shaped and score > self.best_shaped:
                self.best_shaped = score
            if score < kw.threshold or not shaped:
                self._note(self.pending_rejects, start, True)
                if (shaped and score >= self.near_floor
                        and (self.last_hit_end is None or end - self.last_hit_end >= refractory)
                        and (self.near is None or score > self.near.score)):
                    self.near = Hit(keyword=kw, score=score, start_frame=start, end_frame=end, decided_frame=frame)
                log.debug("keyword %s rejected at frame %d: score %.3f, %d frames, peaks %s", kw.wakeword_id,
                          frame, score, duration, [f for f, _ in run])
                continue
            if self.last_hit_end is not None and end - self.last_hit_end < refractory:
                self._note(self.pending_suppressed, start, False)
                continue
            if best is None or score > best.score:
                best = Hit(keyword=kw, score=score, start_frame=start, end_frame=end, decided_frame=frame)
        if best is None:
            return None
        # A candidate that was rejected on its rising edge and fired once its peak grew is not a rejection.
        self.pending_rejects.discard(best.start_frame)
        self.pending_suppressed.discard(best.start_frame)
        self.fold()
        self.last_hit_end = best.end_frame
        self.near = None  # the rising edge of this hit, not a miss
        self.reset_search()
        log.debug("keyword %s hit: score %.3f, frames %d-%d", kw.wakeword_id, best.score, best.start_frame,
                  best.end_frame)
        return best

    def forming(self, frame: int) -> bool:
        """Whether the keyword may be decided within its next few tokens: a prefix ends with its first two tokens
        or more of them (all of them: the score can still grow), the last of them no further back than the
        keyword's longest gap (or its whole length) before ``frame``. A one- or two-token keyword is always
        forming."""
        ids = self.keyword.token_ids
        n = len(ids)
        least = n - 2
        if least < 1:
            return True
        reach = self.keyword.max_gap_frames or self.keyword.max_frames
        for prefix, hyp in self.hyps.items():
            if len(prefix) < least:
                continue
            for k in range(min(n, len(prefix)), least - 1, -1):
                if prefix[-k:] == ids[:k]:
                    break
            else:
                continue
            for peaks in (hyp[_PKB], hyp[_PKNB]):
                if peaks and frame - peaks[-1][0] <= reach:
                    return True
        return False

    def settle(self, next_frame: int) -> None:
        """Make the near miss final once ``NEAR_MISS_SETTLE`` frames past its last peak were decoded."""
        miss = self.near
        if miss is not None and next_frame - miss.end_frame > NEAR_MISS_SETTLE:
            self.near = None
            self.near_done.append(miss)
            log.debug("keyword %s near miss: score %.3f, frames %d-%d", miss.keyword.wakeword_id, miss.score,
                      miss.start_frame, miss.end_frame)

    def _note(self, pending: set[int], start: int, rejected: bool) -> None:
        pending.add(start)
        if len(pending) > _MAX_PENDING:
            if rejected:
                self.rejected += len(pending)
            else:
                self.suppressed += len(pending)
            pending.clear()

    def fold(self) -> None:
        """Move the pending candidates (distinct start frames) into the counts."""
        self.rejected += len(self.pending_rejects)
        self.pending_rejects.clear()
        self.suppressed += len(self.pending_suppressed)
        self.pending_suppressed.clear()


class KeywordDecoder:
    """Per-stream CTC keyword search; :meth:`reset` clears its state. Use from one thread at a time."""

    def __init__(
        self,
        keywords: Sequence[Keyword],
        *,
        beam: int = 20,
        top_k: int = 3,
        token_floor: float = 0.05,
        refractory_frames: int = 34,
        near_miss_ratio: float = 0.0,
    ) -> None:
        if not keywords:
            raise KeywordError("no keywords to detect")
        if beam < 1:
            raise ValueError(f"beam {beam!r} must be at least 1")
        if top_k < 1:
            raise ValueError(f"top_k {top_k!r} must be at least 1")
        if not 0.0 <= token_floor < 1.0:
            raise ValueError(f"token_floor {token_floor!r} is not in [0, 1)")
        if refractory_frames < 0:
            raise ValueError(f"refractory_frames {refractory_frames!r} is negative")
        self.keywords: tuple[Keyword, ...] = tuple(keywords)
        self.beam = beam
        self.top_k = top_k
        self.token_floor = token_floor
        self.refractory_frames = refractory_frames
        """Frames after a keyword's hit (from its last peak) during which the same keyword cannot fire again."""
        if not 0.0 <= near_miss_ratio < 1.0:
            raise ValueError(f"near_miss_ratio {near_miss_ratio!r} is not in [0, 1)")
        self.near_miss_ratio = near_miss_ratio
        """Candidates within the shape limits scoring in [ratio x threshold, threshold) are near misses (0: none)."""

        relevant = sorted({t for kw in self.keywords for t in kw.token_ids})
        self._rel = np.array([BLANK_ID, *relevant], dtype=np.intp)
        self._rel_ids: tuple[int, ...] = tuple(int(t) for t in self._rel)
        self._max_id = int(self._rel.max())
        position = {t: i for i, t in enumerate(self._rel_ids)}
        self._searches = []
        for kw in self.keywords:
            own = (BLANK_ID, *sorted(set(kw.token_ids)))
            self._searches.append(_Search(kw, tuple(position[t] for t in own), own, near_miss_ratio))
        # A token at or above this posterior is certainly among the top k of a row summing to at most
        # 1 + slack: fewer than k other tokens can each exceed it. Only rows with a relevant token
        # between the floor and this bound need an exact rank check.
        self._sure = (1.0 + _SUM_SLACK) / (top_k + 1)
        self.reset()

    # --- state -----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything: searches, refractory periods, counters and the expected next frame."""
        for search in self._searches:
            search.reset()
        self._near_open = False  # some search holds a near miss, forming or final (the fast path skips them)
        self._next_frame = 0
        self.frames = 0
        """Frames decoded since reset."""
        self.beam_frames = 0
        """Frames that ran the beam update (carried a keyword token in the top-k above the floor)."""

    @property
    def rejected(self) -> int:
        """Candidates that matched a keyword but failed its threshold or shape limits (and never fired)."""
        return sum(s.rejected + len(s.pending_rejects) for s in self._searches)

    def rejected_by_keyword(self) -> dict[str, int]:
        """:attr:`rejected` per wake word id, every keyword listed (keywords sharing an id are added up)."""
        out: dict[str, int] = {}
        for s in self._searches:
            wid = s.keyword.wakeword_id
            out[wid] = out.get(wid, 0) + s.rejected + len(s.pending_rejects)
        return out

    @property
    def suppressed(self) -> int:
        """Candidates that passed but fell inside the refractory period of their keyword's previous hit."""
        return sum(s.suppressed + len(s.pending_suppressed) for s in self._searches)

    @property
    def next_frame(self) -> int:
        """The frame index the next :meth:`step` call may start at (at the earliest)."""
        return self._next_frame

    def best_score(self, wakeword_id: str | None = None, shaped: bool = False) -> float:
        """Best candidate score since :meth:`reset` (fired, rejected or suppressed); 0 if none.

        For one keyword (by wake word id) or, by default, all of them; ``shaped``: only candidates within the
        keyword's span and gap limits (the threshold a missed keyword would have needed). Diagnostics: threshold
        tuning.
        """
        scores = [s.best_shaped if shaped else s.best for s in self._searches
                  if wakeword_id is None or s.keyword.wakeword_id == wakeword_id]
        if not scores:
            raise KeywordError(f"wakeword_id {wakeword_id!r} is not one of this decoder's keywords")
        return max(scores)

    def take_near_misses(self, final: bool = False) -> list[Hit]:
        """Near misses that became final since the last call (``Hit.score`` below the keyword's threshold), in
        the order of their last peak. A near miss is final ``NEAR_MISS_SETTLE`` frames after its last peak, if it
        did not grow into a hit by then; none are kept within the refractory period after a hit. ``final``: the
        stream ended, the near misses still forming are final too."""
        if not self._near_open:
            return []
        done: list[Hit] = []
        for search in self._searches:
            if final and search.near is not None:
                search.settle(search.near.end_frame + NEAR_MISS_SETTLE + 1)
            if search.near_done:
                done.extend(search.near_done)
                search.near_done = []
        self._near_open = any(s.near is not None for s in self._searches)
        done.sort(key=lambda h: h.end_frame)
        return done

    @property
    def forming(self) -> bool:
        """Whether a keyword may be decided within its next few tokens (see ``_Search.forming``): the frames
        after those decoded so far can fire one only then."""
        frame = self._next_frame - 1
        return any(search.forming(frame) for search in self._searches)

    @property
    def collapsed(self) -> bool:
        """Whether every search's prefixes end in blank: a blank-only frame would change nothing."""
        for search in self._searches:
            if not search.collapsed:
                return False
        return True

    @property
    def near_pending(self) -> bool:
        """Whether a near miss is forming or final and not yet taken."""
        return self._near_open

    def _settle(self) -> None:
        if self._near_open:
            for search in self._searches:
                search.settle(self._next_frame)

    # --- decoding --------------------------------------------------------------------------------

    @property
    def column_ids(self) -> tuple[int, ...]:
        """Token ids of the columns :meth:`columns` keeps (blank first); the last column is the rank bound."""
        return self._rel_ids

    def columns(self, probs: npt.NDArray[np.floating]) -> np.ndarray:
        """What the search reads of posteriors ``[T, V]``: ``[T, R + 1]`` float32.

        The first R columns are blank and the keyword tokens; the last is the row's k-th largest posterior
        where the rank decides whether a keyword token counts (0 elsewhere). Decoders with the same keyword
        tokens and search settings accept each other's columns (:meth:`step_columns`).
        """
        p = np.asarray(probs)
        if p.ndim != 2:
            raise ValueError(f"posteriors must be [frames, tokens], got shape {p.shape}")
        vocab = p.shape[1]
        if vocab <= self._max_id:
            raise ValueError(f"posteriors have {vocab} tokens; keyword token id {self._max_id} needs more")
        out = np.zeros((p.shape[0], len(self._rel) + 1), dtype=np.float32)
        sub = out[:, :-1]
        sub[:] = p[:, self._rel]
        if self.top_k < vocab and self.token_floor < self._sure:
            unsure = ((sub > self.token_floor) & (sub < self._sure)).any(axis=1)
            if unsure.any():
                rows = np.flatnonzero(unsure)
                out[rows, -1] = np.partition(p[rows], vocab - self.top_k, axis=1)[:, vocab - self.top_k]
        return out

    def _members(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The relevant columns ``[N, R]`` (blank first) of :meth:`columns` output and which of them count.

        A token counts when it is above the floor and among the row's top k. Each row is judged on its own, so
        judging a whole batch at once gives every row the same answer as judging its stream alone.
        """
        sub = cols[:, :-1]
        return sub, (sub > self.token_floor) & (sub >= cols[:, -1:])

    def step(self, probs: npt.NDArray[np.floating], first_frame: int) -> list[Hit]:
        """Decode consecutive model frames ``first_frame .. first_frame+T-1``; return the hits they complete.

        ``probs`` is ``[T, V]`` softmax posteriors (each row sums to 1). Frames must not go backwards
        across calls; a gap is allowed (its frames count as never heard).
        """
        return self.step_columns(self.columns(probs), first_frame)

    def step_columns(self, cols: npt.NDArray[np.floating], first_frame: int) -> list[Hit]:
        """:meth:`step` on what :meth:`columns` kept of the posteriors."""
        hits = self._step_columns(cols, first_frame)
        self._settle()
        return hits

    def _step_columns(self, cols: npt.NDArray[np.floating], first_frame: int) -> list[Hit]:
        c = np.asarray(cols)
        if c.ndim != 2 or c.shape[1] != len(self._rel) + 1:
            raise ValueError(f"keyword columns must be [frames, {len(self._rel) + 1}], got shape {c.shape}")
        if first_frame < self._next_frame:
            raise ValueError(
                f"first_frame {first_frame} goes back before frame {self._next_frame} already decoded"
            )
        n_frames = c.shape[0]
        self._next_frame = first_frame + n_frames
        self.frames += n_frames
        if n_frames == 0:
            return []
        sub, member = self._members(c)
        any_rows = member[:, 1:].any(axis=1)
        if not any_rows.any():
            if member[:, 0].any():
                for search in self._searches:
                    search.collapse()
            return []
        self.beam_frames += int(any_rows.sum())
        hits: list[Hit] = []
        for search in self._searches:
            hits.extend(self._run_search(search, sub, member, first_frame))
        if len(self._searches) > 1:
            hits.sort(key=lambda h: h.decided_frame)
        return hits

    def _run_search(self, search: _Search, sub: np.ndarray, member: np.ndarray, first_frame: int) -> list[Hit]:
        cols = search.columns
        own = member[:, cols]
        keyword_rows = own[:, 1:].any(axis=1)
        blank_only = own[:, 0] & ~keyword_rows
        rows_idx = np.flatnonzero(keyword_rows)
        if rows_idx.size == 0:
            if blank_only.any():
                search.collapse()
            return []
        hits: list[Hit] = []
        blank_seen = np.cumsum(blank_only)
        sub_rows = sub[rows_idx][:, cols].tolist()
        member_rows = own[rows_idx].tolist()
        seen_before = 0
        ids = search.token_ids
        for i, values, keep in zip(rows_idx.tolist(), sub_rows, member_rows, strict=True):
            seen = int(blank_seen[i])
            if seen > seen_before:
                search.collapse()
            seen_before = seen
            toks = [(ids[j], math.log(values[j])) for j in range(len(keep)) if keep[j]]
            frame = first_frame + i
            search.advance(frame, toks, self.beam)
            hit = search.detect(frame, self.refractory_frames)
            if hit is not None:
                hits.append(hit)
            elif search.near is not None:
                self._near_open = True
        if int(blank_seen[-1]) > seen_before:
            search.collapse()
        return hits

    def scan(self, probs: npt.NDArray[np.floating]) -> tuple[np.ndarray, np.ndarray]:
        """Judge a batch of streams' posteriors ``[B, T, V]`` at once, for decoders with this one's settings.

        Returns per stream whether any frame carries a keyword token (``busy [B]``: that stream needs
        :meth:`step`) and whether any frame is blank-only (``blank [B]``: what :meth:`skip` needs otherwise).
        Most streams are idle most of the time, so one vectorised pass replaces most per-stream calls.
        """
        p = np.asarray(probs)
        if p.ndim != 3:
            raise ValueError(f"posteriors must be [streams, frames, tokens], got shape {p.shape}")
        n_streams, n_frames, vocab = p.shape
        if vocab <= self._max_id:
            raise ValueError(f"posteriors have {vocab} tokens; keyword token id {self._max_id} needs more")
        flat = p.reshape(n_streams * n_frames, vocab)
        sub = flat[:, self._rel]
        member = sub > self.token_floor
        if self.top_k < vocab and self.token_floor < self._sure:
            unsure = (member & (sub < self._sure)).any(axis=1)
            if unsure.any():
                rows = np.flatnonzero(unsure)
                kth = np.partition(flat[rows], vocab - self.top_k, axis=1)[:, vocab - self.top_k]
                member[rows] &= sub[rows] >= kth[:, None]
        member = member.reshape(n_streams, n_frames, -1)
        keyword_rows = member[:, :, 1:].any(axis=2)
        busy = np.any(keyword_rows, axis=1)
        blank = np.any(member[:, :, 0] & ~keyword_rows, axis=1)
        return np.asarray(busy), np.asarray(blank)

    def skip(self, first_frame: int, n_frames: int, blank_only: bool) -> None:
        """Account for frames ``first_frame .. first_frame+n_frames-1`` that :meth:`scan` found free of keyword
        tokens; ``blank_only`` says whether one of them was blank-only. Same effect as :meth:`step` on them."""
        if first_frame < self._next_frame:
            raise ValueError(
                f"first_frame {first_frame} goes back before frame {self._next_frame} already decoded"
            )
        self._next_frame = first_frame + n_frames
        self.frames += n_frames
        if n_frames and blank_only:
            for search in self._searches:
                search.collapse()
        self._settle()
