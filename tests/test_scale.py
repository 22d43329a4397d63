"""Many streams in one detector: batching and the batch-wide decoder scan change nothing, on real recordings."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from kwsd.audio.wavfile import read_wav
from kwsd.kws import detector as detector_module
from kwsd.kws import session as session_module
from kwsd.kws.decoder import KeywordDecoder
from kwsd.kws.detector import Detection, Detector, detect_samples
from kwsd.kws.features import offline_features
from kwsd.kws.session import ModelSession
from kwsd.settings import DetectorSettings

BLOCK = 1600  # 100 ms, as a live capture delivers it


@contextmanager
def split_from(rows: int) -> Iterator[None]:
    """Split batches and feature extraction across threads from ``rows`` streams per thread (test batches are
    small)."""
    saved = session_module._SPLIT_MIN, detector_module._PART_MIN
    session_module._SPLIT_MIN = detector_module._PART_MIN = rows
    try:
        yield
    finally:
        session_module._SPLIT_MIN, detector_module._PART_MIN = saved


@pytest.fixture(scope="module")
def session(model_path: Path) -> ModelSession:
    return ModelSession(model_path, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def recordings(positives: list[Path], negatives: list[Path]) -> dict[str, np.ndarray]:
    files = positives + negatives
    assert len(positives) >= 10 and len(negatives) >= 10
    return {p.name: read_wav(p) for p in files}


def _alone(session: ModelSession, name: str, samples: np.ndarray) -> tuple[list[Detection], int]:
    """One stream alone in its own detector, every decoder call on the plain path."""
    det = Detector(session, DetectorSettings(), scan=False)
    det.add_stream(name)
    hits: list[Detection] = []
    for i in range(0, samples.size, BLOCK):
        det.accept(name, samples[i : i + BLOCK])
        hits.extend(det.step())
    hits.extend(det.finish(name))
    return hits, det.rejected(name)


def _together(session: ModelSession, audio: dict[str, np.ndarray], scan: bool, leave_early: dict[str, int]
              ) -> tuple[dict[str, list[Detection]], dict[str, int], Detector]:
    """All streams in one detector: stream i joins at tick 2*i, streams in ``leave_early`` leave after that many
    blocks (removed without finishing), the others finish and leave when their audio ends."""
    det = Detector(session, DetectorSettings(), scan=scan)
    names = list(audio)
    got: dict[str, list[Detection]] = {n: [] for n in names}
    rejected: dict[str, int] = {}
    joined = dict(zip(names, range(0, 2 * len(names), 2), strict=True))
    ends = {n: min(leave_early.get(n, 1 << 30) * BLOCK, a.size) for n, a in audio.items()}
    pos = dict.fromkeys(names, 0)
    live: set[str] = set()
    tick = 0
    while tick < 10_000 and (len(live) or any(pos[n] < ends[n] for n in names)):
        for n in names:
            if tick == joined[n]:
                det.add_stream(n)
                live.add(n)
            if n in live and pos[n] < ends[n]:
                det.accept(n, audio[n][pos[n] : min(pos[n] + BLOCK, ends[n])])
                pos[n] += BLOCK
                if pos[n] >= ends[n]:
                    if n not in leave_early:
                        got[n].extend(det.finish(n))
                    rejected[n] = det.rejected(n)
                    det.remove_stream(n)
                    live.discard(n)
        for hit in det.step():
            got[hit.stream].append(hit)
        tick += 1
    assert not live and det.streams == []
    return got, rejected, det


def test_batched_detections_equal_each_stream_alone(session: ModelSession, model_path: Path,
                                                    recordings: dict[str, np.ndarray]) -> None:
    """Every real recording as its own stream, joining and leaving at different steps, some leaving early."""
    names = list(recordings)
    leave_early = {names[3]: 25, names[-2]: 12}  # removed without finish(): their hits so far only
    batched, rejected, det = _together(session, recordings, True, leave_early)
    assert det.timing.steps < sum(-(-a.size // BLOCK) for a in recordings.values()) / 5  # really batched
    # Two threads: a step of 6 streams or more runs as two parts, one per thread (each part's call in batches of
    # at most 7); a smaller step runs one call, its batches of 7 across 2 concurrent calls (3 and 4 streams).
    small = ModelSession(model_path, providers=["CPUExecutionProvider"], max_batch=7, intra_op_threads=2)
    assert small._split == 2
    with split_from(3):
        split, _, threaded = _together(small, recordings, True, leave_early)
    assert threaded._pool is not None and small._pool is not None  # both the parts and the split calls ran
    small.close()
    threaded.close()
    total = 0
    for n, samples in recordings.items():
        if n in leave_early:
            want: list[Detection] = []
            alone_det = Detector(session, DetectorSettings(), scan=False)
            alone_det.add_stream(n)
            for i in range(0, leave_early[n] * BLOCK, BLOCK):
                alone_det.accept(n, samples[i : i + BLOCK])
                want.extend(alone_det.step())
            want_rejected = alone_det.rejected(n)
        else:
            want, want_rejected = _alone(session, n, samples)
        assert batched[n] == want, n  # every field, scores bit for bit
        assert split[n] == want, n
        assert rejected[n] == want_rejected, n
        total += len(want)
    assert total >= 20  # the positives fire: the comparison is not between empty lists


def test_scan_fast_path_keeps_every_decoder_state(session: ModelSession, recordings: dict[str, np.ndarray]
                                                  ) -> None:
    """The batch-wide scan skips idle decoders; detections, rejections and frame counters stay exact."""
    fast, fast_rejected, _ = _together(session, recordings, True, {})
    plain, plain_rejected, _ = _together(session, recordings, False, {})
    assert fast == plain and fast_rejected == plain_rejected
    assert sum(len(h) for h in fast.values()) >= 20


def _state(d: KeywordDecoder) -> dict[str, object]:
    return {k: v for k, v in vars(d).items() if not isinstance(v, np.ndarray)}


def test_scan_and_skip_match_step_frame_by_frame(session: ModelSession, recordings: dict[str, np.ndarray]
                                                 ) -> None:
    """Decoder level: the real model's posteriors of a batch, decoded by step() alone or by scan()+skip()."""
    det = Detector(session, DetectorSettings())
    feats = offline_features(np.concatenate(list(recordings.values())))  # every recording, one after another
    streams, frames = 8, 3
    length = feats.shape[0] // streams // frames * frames
    batch = feats[: streams * length].reshape(streams, length, -1)
    probs, _ = session.run(batch, session.new_cache(streams))
    names = range(streams)
    plain = [det._new_decoder() for _ in names]
    fast = [det._new_decoder() for _ in names]
    scanner: KeywordDecoder = det._new_decoder()
    skipped = 0
    for start in range(0, length, frames):
        block = probs[:, start : start + frames]
        busy, blank = scanner.scan(block)
        for i in range(len(names)):
            want = plain[i].step(block[i], start)
            if busy[i]:
                assert fast[i].step(block[i], start) == want
            else:
                assert want == []
                fast[i].skip(start, frames, bool(blank[i]))
                skipped += 1
            assert _state(fast[i]) == _state(plain[i])
    assert skipped > len(names) * length // frames // 2  # most blocks take the fast path


def test_detect_samples_is_unchanged_by_the_scan(session: ModelSession, positives: list[Path]) -> None:
    for path in positives[:4]:
        samples = read_wav(path)
        assert detect_samples(Detector(session, DetectorSettings()), "s", samples, BLOCK) == \
            detect_samples(Detector(session, DetectorSettings(), scan=False), "s", samples, BLOCK)


def test_io_binding_path_gives_the_same_outputs(model_path: Path, recordings: dict[str, np.ndarray]) -> None:
    """The I/O-binding path (used on a GPU) runs here on the CPU provider: outputs equal plain runs bit for bit."""
    plain = ModelSession(model_path, providers=["CPUExecutionProvider"], max_batch=3)
    bound = ModelSession(model_path, providers=["CPUExecutionProvider"], max_batch=3)
    assert plain.provider == bound.provider == "CPUExecutionProvider" and not plain.io_binding
    bound.io_binding = True
    feats = np.stack([offline_features(a)[:30] for a in list(recordings.values())[:5]])
    cache_a = cache_b = plain.new_cache(5)
    for t in range(0, 30, 3):
        probs_a, cache_a = plain.run(feats[:, t : t + 3], cache_a)
        probs_b, cache_b = bound.run(feats[:, t : t + 3], cache_b)
        assert probs_a.shape == (5, 3, len(plain.contract.tokens))
        assert np.array_equal(probs_a, probs_b) and np.array_equal(cache_a, cache_b)
    assert np.abs(cache_a).sum() > 0


def test_accept_copies_the_callers_buffer(session: ModelSession, positives: list[Path]) -> None:
    """A capture loop reuses one buffer for every block; features are extracted later, from the copies."""
    samples = read_wav(positives[0])
    want, _ = _alone(session, "s", samples)
    det = Detector(session, DetectorSettings())
    det.add_stream("s")
    buf = np.empty(BLOCK, dtype=np.float32)
    got: list[Detection] = []
    for i in range(0, samples.size, BLOCK):
        block = samples[i : i + BLOCK]
        buf[: block.size] = block
        det.accept("s", buf[: block.size])
        if (i // BLOCK) % 3 == 2:  # several blocks queued before a step
            got.extend(det.step())
        buf[:] = 12345.0  # the next capture overwrites it
    got.extend(det.step())
    got.extend(det.finish("s"))
    assert got == want and len(want) == 1


def test_a_failed_part_of_a_threaded_step_raises_only_once_every_part_is_done(
        model_path: Path, recordings: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    """A step cut into parts across threads: when one part's model call fails, the step raises, but not before
    the other part's call (which writes its streams' cache rows) has finished."""
    threaded = ModelSession(model_path, providers=["CPUExecutionProvider"], intra_op_threads=2)
    det = Detector(threaded, DetectorSettings())
    audio = list(recordings.values())
    for i in range(max(2 * detector_module._PART_MIN, detector_module._QUIET_MAX_STREAMS + 1)):  # all hot
        det.add_stream(f"s{i}")
        det.accept(f"s{i}", audio[i % len(audio)][: 2 * BLOCK])
    update = threaded.update
    finished: list[str] = []

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("the model call failed")
        time.sleep(0.3)
        out = update(*args, **kwargs)
        finished.append("worker")
        return out

    monkeypatch.setattr(threaded, "update", failing)
    with pytest.raises(RuntimeError, match="the model call failed"):
        det.step()
    assert finished == ["worker"]
    det.close()
    threaded.close()
