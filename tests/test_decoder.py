"""CTC keyword decoder on synthetic posterior matrices whose outcome is known exactly."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from kwsd.kws.decoder import (
    BLANK_ID,
    Hit,
    Keyword,
    KeywordDecoder,
    KeywordError,
    load_tokens,
    tokenize,
)

V = 2599
XIAO, YUN = 1462, 976
NI, HAO = 300, 301  # stand-ins for a second keyword's tokens
FILLER = (7, 8, 9, 10)  # non-keyword tokens
XIAOYUN = (XIAO, YUN, XIAO, YUN)

Row = dict[int, float]


def keyword(
    token_ids: Sequence[int] = XIAOYUN,
    *,
    threshold: float = 0.5,
    min_frames: int = 5,
    max_frames: int = 83,
    wakeword_id: str = "xiaoyun",
) -> Keyword:
    return Keyword(
        phrase=wakeword_id,
        wakeword_id=wakeword_id,
        token_ids=tuple(token_ids),
        threshold=threshold,
        min_frames=min_frames,
        max_frames=max_frames,
    )


def matrix(rows: Sequence[Row], vocab: int = V) -> np.ndarray:
    """Posteriors from sparse rows: given tokens get their value, blank (unless given) the rest of the mass.

    If blank is given too, what is left goes to a non-keyword filler token, so every row sums to 1.
    """
    out = np.zeros((len(rows), vocab), dtype=np.float32)
    for i, row in enumerate(rows):
        for tok, p in row.items():
            out[i, tok] = p
        rest = 1.0 - sum(row.values())
        assert rest >= -1e-6, row
        out[i, FILLER[0] if BLANK_ID in row else BLANK_ID] += max(rest, 0.0)
    return out


def blanks(n: int) -> list[Row]:
    return [{} for _ in range(n)]


def say(tokens: Sequence[int], peaks: Sequence[float], gap: int = 3) -> list[Row]:
    """One frame per token at its peak value, ``gap`` blank frames after each token."""
    rows: list[Row] = []
    for tok, p in zip(tokens, peaks, strict=True):
        rows.append({tok: p})
        rows.extend(blanks(gap))
    return rows


def geo(values: Sequence[float]) -> float:
    """Expected score: geometric mean of the float32 peak values."""
    return math.exp(sum(math.log(float(np.float32(v))) for v in values) / len(values))


def run(decoder: KeywordDecoder, probs: np.ndarray, chunk: int | None = None, first: int = 0) -> list[Hit]:
    size = chunk or max(len(probs), 1)
    hits: list[Hit] = []
    for start in range(0, len(probs), size):
        hits.extend(decoder.step(probs[start : start + size], first + start))
    return hits


def summary(hits: Sequence[Hit]) -> list[tuple[str, int, int, int, float]]:
    return [
        (h.keyword.wakeword_id, h.start_frame, h.end_frame, h.decided_frame, round(h.score, 12)) for h in hits
    ]


# --- tokens and keywords ---------------------------------------------------------------------------------


def test_tokenize_with_the_model_token_list(model_mirror: Path) -> None:
    tokens = load_tokens(model_mirror / "funasr" / "tokens_2599.txt")
    assert len(tokens) == V
    assert tokens[BLANK_ID] == "<blank>"
    assert tokenize("小云小云", tokens) == XIAOYUN
    assert tokenize(" 小云 小云 ", tokens) == XIAOYUN
    with pytest.raises(KeywordError, match="'☃'"):
        tokenize("小云☃", tokens)


def test_tokenize_rejects_empty_and_unknown() -> None:
    tokens = ["<blank>", "<unk>", "小", "云"]
    assert tokenize("小 云", tokens) == (2, 3)
    with pytest.raises(KeywordError, match="empty"):
        tokenize("  ", tokens)
    with pytest.raises(KeywordError, match="'雨'"):
        tokenize("小雨", tokens)
    kw = Keyword.from_phrase("小云 小云", tokens, threshold=0.3, min_frames=3, max_frames=80)
    assert kw.token_ids == (2, 3, 2, 3)
    assert kw.wakeword_id == "小云小云"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"token_ids": ()}, "no tokens"),
        ({"token_ids": (XIAO, BLANK_ID)}, "token id 0"),
        ({"threshold": 0.0}, "threshold 0.0"),
        ({"threshold": 1.5}, "threshold 1.5"),
        ({"min_frames": 0}, "min_frames 0"),
        ({"min_frames": 10, "max_frames": 9}, "max_frames 9"),
    ],
)
def test_keyword_rejects_bad_values(changes: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "phrase": "小云小云",
        "wakeword_id": "xiaoyun",
        "token_ids": XIAOYUN,
        "threshold": 0.5,
        "min_frames": 5,
        "max_frames": 83,
    }
    values.update(changes)
    with pytest.raises(KeywordError, match=message):
        Keyword(**values)  # type: ignore[arg-type]


def test_decoder_rejects_bad_parameters_and_input() -> None:
    with pytest.raises(KeywordError, match="no keywords"):
        KeywordDecoder([])
    with pytest.raises(ValueError, match="beam 0"):
        KeywordDecoder([keyword()], beam=0)
    with pytest.raises(ValueError, match=r"token_floor 1\.0"):
        KeywordDecoder([keyword()], token_floor=1.0)
    decoder = KeywordDecoder([keyword()])
    with pytest.raises(ValueError, match="needs more"):
        decoder.step(np.zeros((2, 1000), np.float32), 0)
    with pytest.raises(ValueError, match="shape"):
        decoder.step(np.zeros(V, np.float32), 0)
    decoder.step(matrix(blanks(10)), 0)
    with pytest.raises(ValueError, match="first_frame 5"):
        decoder.step(matrix(blanks(10)), 5)
    assert decoder.step(matrix(blanks(0)), 10) == []


# --- basic detection -------------------------------------------------------------------------------------


def test_fires_with_geometric_mean_of_peaks_and_peak_frames() -> None:
    peaks = (0.9, 0.8, 0.7, 0.95)
    probs = matrix(blanks(20) + say(XIAOYUN, peaks) + blanks(20))
    decoder = KeywordDecoder([keyword()])
    hits = run(decoder, probs, first=1000)
    assert len(hits) == 1
    hit = hits[0]
    assert hit.keyword.wakeword_id == "xiaoyun"
    assert hit.score == pytest.approx(geo(peaks), rel=1e-9)
    assert (hit.start_frame, hit.end_frame, hit.decided_frame) == (1020, 1032, 1032)
    assert decoder.rejected == 0
    assert decoder.best_score() == pytest.approx(geo(peaks), rel=1e-9)
    assert decoder.beam_frames == 4
    assert decoder.frames == len(probs)


def test_silence_and_other_speech_never_fire() -> None:
    rows = blanks(50) + [{FILLER[1]: 0.9} for _ in range(50)] + [{FILLER[2]: 0.5, BLANK_ID: 0.5}] * 50
    decoder = KeywordDecoder([keyword()])
    assert run(decoder, matrix(rows)) == []
    assert decoder.beam_frames == 0
    assert decoder.best_score() == 0.0


def test_bug_a_keyword_at_the_very_end_of_the_prefix_and_input() -> None:
    """The keyword's last token is the last token of the prefix and the last frame of the input."""
    peaks = (0.9, 0.9, 0.9, 0.9)
    rows = blanks(5) + say(XIAOYUN, peaks, gap=2)[:-2]  # input ends on the last token's frame
    decoder = KeywordDecoder([keyword()])
    hits = run(decoder, matrix(rows))
    assert [h.end_frame for h in hits] == [len(rows) - 1]
    # The prefix is longer than the keyword (a stray 云 first) and the keyword sits at its end.
    rows = blanks(5) + say((YUN, *XIAOYUN), (0.9, *peaks), gap=2)[:-2]
    decoder = KeywordDecoder([keyword()])
    hits = run(decoder, matrix(rows))
    assert [(h.start_frame, h.end_frame) for h in hits] == [(8, len(rows) - 1)]
    assert hits[0].score == pytest.approx(geo(peaks), rel=1e-9)


def test_bug_b_rejected_candidate_then_real_one_fires_with_its_own_score() -> None:
    weak = (0.2, 0.2, 0.2, 0.2)
    strong = (0.9, 0.85, 0.9, 0.85)
    rows = blanks(10) + say(XIAOYUN, weak) + blanks(30) + say(XIAOYUN, strong) + blanks(10)
    decoder = KeywordDecoder([keyword(threshold=0.5)])
    hits = run(decoder, matrix(rows))
    assert decoder.rejected >= 1  # the weak one (and weak/strong mixtures) failed the threshold
    assert len(hits) == 1
    assert hits[0].score == pytest.approx(geo(strong), rel=1e-9)
    assert hits[0].start_frame == 10 + 16 + 30


def test_bug_b_rejected_for_duration_then_real_one() -> None:
    """A too-short keyword is rejected; a normal one right after fires with its own peaks and frames."""
    short = say(XIAOYUN, (0.95, 0.95, 0.95, 0.95), gap=0)
    normal = (0.8, 0.7, 0.8, 0.7)
    # Further apart than max_frames, so the short one's tail cannot pair with the normal one's head.
    rows = blanks(5) + short + blanks(90) + say(XIAOYUN, normal) + blanks(5)
    decoder = KeywordDecoder([keyword(min_frames=5, max_frames=83)])
    hits = run(decoder, matrix(rows))
    assert decoder.rejected == 1
    assert len(hits) == 1
    start = 5 + len(short) + 90
    assert (hits[0].start_frame, hits[0].end_frame) == (start, start + 12)
    assert hits[0].score == pytest.approx(geo(normal), rel=1e-9)


def test_stale_strong_tokens_do_not_hide_a_fresh_keyword() -> None:
    """A slow, strong 小云小云 (too long) must not keep its alignment in place of a fresh one."""
    slow = say(XIAOYUN, (0.9, 0.9, 0.9, 0.9), gap=40)
    fresh = (0.8, 0.7, 0.8, 0.7)
    rows = blanks(5) + slow + say(XIAOYUN, fresh) + blanks(5)
    decoder = KeywordDecoder([keyword(max_frames=83)])
    hits = run(decoder, matrix(rows))
    assert len(hits) == 1
    start = 5 + len(slow)
    assert (hits[0].start_frame, hits[0].end_frame) == (start, start + 12)
    assert hits[0].score == pytest.approx(geo(fresh), rel=1e-9)


def test_bug_c_an_hour_of_frames_does_not_break_scores() -> None:
    """120,000 frames (an hour) with keyword-token noise throughout: no underflow, exact final score.

    Every 10th frame carries weak 小 or 云 (weak 小云小云 candidates, below threshold), so the
    beam update runs all hour long; the frames between are speech-like, with blank at 0.6 (a
    probability product over them would underflow within seconds).
    """
    hour = 120_000
    block = 4_000
    decoder = KeywordDecoder([keyword(threshold=0.5)])
    hits: list[Hit] = []
    noise = matrix([{XIAO: 0.3, BLANK_ID: 0.6}, {YUN: 0.25, BLANK_ID: 0.6}, {BLANK_ID: 0.6}], vocab=1500)
    for start in range(0, hour, block):
        probs = np.repeat(noise[2:3], block, axis=0)
        probs[::20] = noise[0]
        probs[10::20] = noise[1]
        hits.extend(decoder.step(probs, start))
    assert hits == []
    assert decoder.rejected > 0
    assert decoder.beam_frames == hour // 10
    peaks = (0.9, 0.8, 0.85, 0.9)
    tail = matrix(blanks(60) + say(XIAOYUN, peaks) + blanks(5), vocab=1500)
    hits = decoder.step(tail, hour)
    assert len(hits) == 1
    assert hits[0].score == pytest.approx(geo(peaks), rel=1e-9)
    assert hits[0].start_frame == hour + 60


# --- limits -------------------------------------------------------------------------------------------------


def test_duration_limits_are_inclusive() -> None:
    # Tokens 4 frames apart: the keyword spans 13 frames from the first peak to the last.
    rows = blanks(3) + say(XIAOYUN, (0.9,) * 4) + blanks(3)
    for lo, hi, fires, rejected in [(13, 13, True, 0), (14, 20, False, 1), (1, 13, True, 0), (5, 12, False, 0)]:
        decoder = KeywordDecoder([keyword(min_frames=lo, max_frames=hi)])
        hits = run(decoder, matrix(rows))
        assert bool(hits) is fires, (lo, hi)
        # Too short is a rejected candidate; too long is never formed (tokens older than the limit drop out).
        assert decoder.rejected == rejected, (lo, hi)
        if fires:
            assert hits[0].end_frame - hits[0].start_frame + 1 == 13
    decoder = KeywordDecoder([keyword(min_frames=5, max_frames=12)])
    assert run(decoder, matrix(rows)) == []
    assert decoder.beam_frames == 4


def test_gap_limit_between_consecutive_peaks_is_inclusive() -> None:
    """Syllables of one keyword follow closely; one long gap (two words) rejects the candidate."""
    even = say(XIAOYUN, (0.9,) * 4, gap=5)  # peaks 6 frames apart
    split = say((XIAO, YUN), (0.9, 0.9), gap=3) + blanks(12) + say((XIAO, YUN), (0.9, 0.9), gap=3)  # 4, 16, 4
    for rows, gap, fires in [(even, 6, True), (even, 5, False), (split, 16, True), (split, 15, False)]:
        decoder = KeywordDecoder([Keyword(phrase="x", wakeword_id="x", token_ids=XIAOYUN, threshold=0.5,
                                          min_frames=1, max_frames=83, max_gap_frames=gap)])
        hits = run(decoder, matrix(blanks(5) + rows + blanks(5)))
        assert bool(hits) is fires, gap
        assert decoder.rejected == (0 if fires else 1), gap
    with pytest.raises(KeywordError, match="max_gap_frames 0"):
        Keyword(phrase="x", wakeword_id="x", token_ids=XIAOYUN, threshold=0.5, min_frames=1, max_frames=83,
                max_gap_frames=0)


@pytest.mark.parametrize(("spacing", "refractory", "count"), [(40, 40, 2), (40, 41, 1), (40, 0, 2)])
def test_refractory_period_counts_from_the_hit_end_frame(spacing: int, refractory: int, count: int) -> None:
    one = say(XIAOYUN, (0.9,) * 4)  # 16 frames, last token peak at offset 12
    rows = blanks(5) + one + blanks(spacing - len(one)) + one + blanks(5)
    decoder = KeywordDecoder([keyword()], refractory_frames=refractory)
    hits = run(decoder, matrix(rows))
    assert len(hits) == count
    assert hits[0].end_frame == 5 + 12
    if count == 2:
        assert hits[1].end_frame - hits[0].end_frame == spacing
    else:
        assert decoder.suppressed == 1
    assert decoder.rejected == 0


def test_reset_forgets_refractory_and_search() -> None:
    one = say(XIAOYUN, (0.9,) * 4)
    decoder = KeywordDecoder([keyword()], refractory_frames=1000)
    assert len(decoder.step(matrix(one), 0)) == 1
    assert decoder.step(matrix(one), 16) == []
    assert decoder.suppressed == 1
    decoder.reset()
    assert decoder.suppressed == 0
    assert decoder.next_frame == 0
    # Half a keyword, then reset: the second half alone must not complete it.
    assert decoder.step(matrix(say((XIAO, YUN), (0.9, 0.9))), 0) == []
    decoder.reset()
    assert decoder.step(matrix(say((XIAO, YUN), (0.9, 0.9))), 0) == []
    assert len(decoder.step(matrix(one), 100)) == 1


# --- several keywords -----------------------------------------------------------------------------------


def test_several_keywords_each_with_its_own_threshold() -> None:
    xiaoyun = keyword(threshold=0.6)
    nihao = keyword((NI, HAO), threshold=0.3, min_frames=2, wakeword_id="nihao")
    rows = (
        blanks(5)
        + say((NI, HAO), (0.4, 0.35))  # passes nihao's 0.3
        + blanks(40)
        + say(XIAOYUN, (0.6, 0.5, 0.6, 0.5))  # 0.548: below xiaoyun's 0.6
        + blanks(90)  # further apart than max_frames: its tail cannot pair with the next one
        + say(XIAOYUN, (0.9, 0.8, 0.9, 0.8))
        + blanks(40)
        + say((NI, HAO), (0.25, 0.3))  # below 0.3
        + blanks(5)
    )
    decoder = KeywordDecoder([xiaoyun, nihao], refractory_frames=10)
    hits = run(decoder, matrix(rows))
    assert [(h.keyword.wakeword_id, round(h.score, 6)) for h in hits] == [
        ("nihao", round(geo((0.4, 0.35)), 6)),
        ("xiaoyun", round(geo((0.9, 0.8, 0.9, 0.8)), 6)),
    ]
    assert decoder.rejected == 2
    assert decoder.rejected_by_keyword() == {"xiaoyun": 1, "nihao": 1}
    assert decoder.best_score("nihao") == pytest.approx(geo((0.4, 0.35)), rel=1e-9)
    with pytest.raises(KeywordError, match="'other'"):
        decoder.best_score("other")


def test_overlapping_keywords_do_not_mask_each_other() -> None:
    """你好小云 and 小云小云 in "你好我是小云小云": each keyword has its own search and refractory period, so the
    hit of 你好小云 on the first 小云 leaves 小云小云 its first half, and both fire."""
    nihao_xiaoyun = keyword((NI, HAO, XIAO, YUN), threshold=0.5, min_frames=2, wakeword_id="nihaoxiaoyun")
    other_speech = [{FILLER[1]: 0.9}, {FILLER[2]: 0.9}, *blanks(2)]  # 我是
    rows = blanks(5) + say((NI, HAO), (0.9, 0.9)) + other_speech + say(XIAOYUN, (0.9,) * 4) + blanks(5)
    decoder = KeywordDecoder([keyword(), nihao_xiaoyun], refractory_frames=34)
    hits = run(decoder, matrix(rows))
    assert [(h.keyword.wakeword_id, h.start_frame, h.end_frame) for h in hits] == [
        ("nihaoxiaoyun", 5, 21), ("xiaoyun", 17, 29)]
    # The same keyword inside its own refractory period is still suppressed.
    again = rows + say(XIAOYUN, (0.9,) * 4)
    decoder = KeywordDecoder([keyword(), nihao_xiaoyun], refractory_frames=34)
    assert [h.keyword.wakeword_id for h in run(decoder, matrix(again))] == ["nihaoxiaoyun", "xiaoyun"]
    assert decoder.suppressed == 1


def test_weak_keyword_between_halves_is_no_barrier() -> None:
    """A weak 你好 (mostly blank) inside 小云..小云 does not stop 小云小云 from being read."""
    nihao = keyword((NI, HAO), threshold=0.5, min_frames=2, wakeword_id="nihao")
    half = say((XIAO, YUN), (0.9, 0.9))
    rows = blanks(5) + half + say((NI, HAO), (0.2, 0.2)) + half
    decoder = KeywordDecoder([keyword(), nihao])
    hits = run(decoder, matrix(rows))
    assert [(h.keyword.wakeword_id, h.start_frame, h.end_frame) for h in hits] == [("xiaoyun", 5, 25)]
    assert decoder.rejected_by_keyword() == {"xiaoyun": 0, "nihao": 1}
    assert decoder.rejected == 1


def test_rejections_are_counted_per_keyword_past_the_pending_limit() -> None:
    """More distinct rejected candidates than are remembered for de-duplication: each stays with its keyword."""
    nihao = keyword((NI, HAO), threshold=0.5, min_frames=2, wakeword_id="nihao")
    apart = blanks(90)  # further apart than max_frames: no candidate pairs with a neighbour's tokens
    rows = blanks(5) + say(XIAOYUN, (0.3,) * 4) + apart
    for _ in range(300):
        rows += say((NI, HAO), (0.2, 0.2)) + apart
    decoder = KeywordDecoder([keyword(), nihao])
    assert run(decoder, matrix(rows), chunk=4000) == []
    assert decoder.rejected_by_keyword() == {"xiaoyun": 1, "nihao": 300}
    assert decoder.rejected == 301
    decoder.reset()
    assert decoder.rejected_by_keyword() == {"xiaoyun": 0, "nihao": 0}


# --- CTC details -----------------------------------------------------------------------------------------


def test_repeated_frames_of_one_token_are_one_token_with_its_peak() -> None:
    """小 held over 3 frames is one 小 (no blank between), scored by its peak frame."""
    rows = (
        *blanks(4),
        *[{XIAO: 0.5}, {XIAO: 0.9}, {XIAO: 0.6}],
        *[{YUN: 0.7}, {YUN: 0.8}],  # 小 -> 云 directly, no blank
        *blanks(2),
        *[{XIAO: 0.95}, {XIAO: 0.4}],
        *blanks(1),
        *[{YUN: 0.3}, {YUN: 0.85}, {YUN: 0.2}],
        *blanks(4),
    )
    decoder = KeywordDecoder([keyword(threshold=0.8)])
    hits = run(decoder, matrix(rows))
    assert len(hits) == 1
    assert hits[0].score == pytest.approx(geo((0.9, 0.8, 0.95, 0.85)), rel=1e-9)
    assert (hits[0].start_frame, hits[0].end_frame) == (5, 15)


def test_held_token_does_not_count_twice() -> None:
    """小云 held long, without the second 小云, is not 小云小云."""
    rows = blanks(3) + [{XIAO: 0.9}] * 6 + [{YUN: 0.9}] * 6 + blanks(3)
    decoder = KeywordDecoder([keyword()])
    assert run(decoder, matrix(rows)) == []
    assert decoder.rejected == 0


def test_doubled_token_needs_a_blank_between() -> None:
    double = keyword((XIAO, XIAO), min_frames=1, wakeword_id="xiaoxiao")
    held = {XIAO: 0.9, BLANK_ID: 0.0}  # blank under the floor: no path can split the token
    decoder = KeywordDecoder([double])
    assert run(decoder, matrix(blanks(3) + [held] * 4 + blanks(3))) == []
    # With blank above the floor in those frames, 小 blank 小 is a possible reading: it fires.
    assert len(run(KeywordDecoder([double]), matrix(blanks(3) + [{XIAO: 0.9}] * 4 + blanks(3)))) == 1
    decoder = KeywordDecoder([double])
    rows = [held, {XIAO: 0.7, BLANK_ID: 0.0}, {}, {XIAO: 0.8, BLANK_ID: 0.0}]
    hits = run(decoder, matrix(blanks(3) + rows + blanks(3)))
    assert [(h.start_frame, h.end_frame) for h in hits] == [(3, 6)]
    assert hits[0].score == pytest.approx(geo((0.9, 0.8)), rel=1e-9)


def test_keyword_token_below_the_floor_is_never_heard() -> None:
    rows = blanks(3) + say(XIAOYUN, (0.9, 0.9, 0.9, 0.04)) + blanks(3)
    decoder = KeywordDecoder([keyword(threshold=0.1)])
    assert run(decoder, matrix(rows)) == []
    assert decoder.rejected == 0
    assert decoder.beam_frames == 3
    # The same token just above the floor is heard (and with a low threshold, fires).
    rows = blanks(3) + say(XIAOYUN, (0.9, 0.9, 0.9, 0.06)) + blanks(3)
    assert len(run(KeywordDecoder([keyword(threshold=0.1)]), matrix(rows))) == 1


def test_keyword_token_outside_the_top_k_is_never_heard() -> None:
    """云 at 0.1 loses to three louder tokens: with top_k=3 that frame changes nothing."""
    crowded = {FILLER[1]: 0.3, FILLER[2]: 0.3, FILLER[3]: 0.25, YUN: 0.1, BLANK_ID: 0.05}
    rows = blanks(3) + say((XIAO, YUN, XIAO), (0.9, 0.9, 0.9)) + [crowded] + blanks(3)
    assert run(KeywordDecoder([keyword(threshold=0.1)]), matrix(rows)) == []
    assert len(run(KeywordDecoder([keyword(threshold=0.1)], top_k=4), matrix(rows))) == 1


def test_frame_without_blank_or_keyword_token_changes_nothing() -> None:
    """Other speech between the tokens (blank under the floor) leaves the search as it was."""
    other = {FILLER[1]: 0.6, FILLER[2]: 0.38, BLANK_ID: 0.02}
    rows = [*blanks(3), {XIAO: 0.9}, other, {YUN: 0.9}, other, {XIAO: 0.9}, other, other, {YUN: 0.9}]
    hits = run(KeywordDecoder([keyword(min_frames=1)]), matrix(rows))
    assert [(h.start_frame, h.end_frame) for h in hits] == [(3, 10)]


# --- independence from chunking --------------------------------------------------------------------------


def _random_stream(seed: int, n_frames: int) -> np.ndarray:
    """Mostly blank, speech-like stretches, keyword-token noise and keywords of varied strength."""
    rnd = random.Random(seed)
    rows: list[Row] = []
    while len(rows) < n_frames:
        kind = rnd.random()
        if kind < 0.3:
            rows += blanks(rnd.randint(1, 30))
        elif kind < 0.55:
            for _ in range(rnd.randint(1, 20)):
                a = rnd.uniform(0.2, 0.9)
                rows.append({rnd.choice(FILLER): a, BLANK_ID: rnd.uniform(0.0, 1.0 - a)})
        elif kind < 0.75:
            tok = rnd.choice((XIAO, YUN, NI, HAO))
            p = rnd.uniform(0.03, 0.7)
            rows.append({tok: p, BLANK_ID: rnd.uniform(0.0, 1.0 - p)})
        else:
            tokens = XIAOYUN if rnd.random() < 0.7 else (NI, HAO)
            for tok in tokens:
                for _ in range(rnd.randint(1, 4)):
                    rows.append({tok: rnd.uniform(0.2, 0.95)})
                rows += blanks(rnd.randint(0, 3))
    return matrix(rows[:n_frames])


def _splits(n: int, seed: int) -> Iterator[int]:
    rnd = random.Random(seed)
    while n > 0:
        size = min(n, rnd.choice((1, 1, 2, 3, 5, 17, 100)))
        yield size
        n -= size


def test_detections_do_not_depend_on_chunking() -> None:
    probs = _random_stream(seed=1, n_frames=3000)
    keywords = [keyword(threshold=0.55), keyword((NI, HAO), threshold=0.5, min_frames=2, wakeword_id="nihao")]

    def decode(sizes: Iterator[int]) -> tuple[list[tuple[str, int, int, int, float]], dict[str, int], int, float]:
        decoder = KeywordDecoder(keywords, refractory_frames=34)
        hits: list[Hit] = []
        start = 0
        for size in sizes:
            hits += decoder.step(probs[start : start + size], start)
            start += size
        assert start == len(probs)
        rejected = decoder.rejected_by_keyword()
        assert sum(rejected.values()) == decoder.rejected
        return summary(hits), rejected, decoder.suppressed, decoder.best_score()

    whole = decode(iter([len(probs)]))
    hits, rejected, suppressed, _ = whole
    # The stream exercises what chunking could disturb: hits of both keywords, rejections, refractory.
    assert {h[0] for h in hits} == {"xiaoyun", "nihao"}
    assert len(hits) >= 10 and min(rejected.values()) > 0 and suppressed > 0
    for size in (1, 3, 7, 1000):
        assert decode(iter([size] * (len(probs) // size) + [len(probs) % size])) == whole, size
    assert decode(_splits(len(probs), seed=2)) == whole


def _reference_hits(decoder: KeywordDecoder, probs: np.ndarray) -> list[Hit]:
    """The same search without the vectorised pre-pass: every frame through every keyword's beam update, top-k by
    sort."""
    hits: list[Hit] = []
    for t, row in enumerate(probs):
        order = np.argsort(-row, kind="stable")
        kth = row[order[decoder.top_k - 1]]
        for search in decoder._searches:
            toks = [(tok, math.log(float(row[tok]))) for tok in search.token_ids
                    if row[tok] > decoder.token_floor and row[tok] >= kth]
            if toks:
                search.advance(t, toks, decoder.beam)
                hit = search.detect(t, decoder.refractory_frames)
                if hit is not None:
                    hits.append(hit)
    return hits


def test_prepass_matches_a_frame_by_frame_reference() -> None:
    probs = _random_stream(seed=3, n_frames=1500)
    # Spread the remaining mass so ranks around the k-th place are really contested.
    rng = np.random.default_rng(4)
    probs = probs * 0.9 + rng.dirichlet(np.full(V, 0.05), size=len(probs)).astype(np.float32) * 0.1
    keywords = [keyword(threshold=0.4), keyword((NI, HAO), threshold=0.4, min_frames=2, wakeword_id="nihao")]
    fast = KeywordDecoder(keywords)
    expected = _reference_hits(KeywordDecoder(keywords), probs)
    assert len(expected) >= 5
    assert summary(run(fast, probs)) == summary(expected)
