"""Step cadence: a stream where no keyword can be forming steps at ``quiet_step_frames``, one with a keyword token
heard lately at ``step_frames``; the cadence changes when a detection is known, never what is detected.

Real model, real recordings (positives and negatives, then silence), fed in 20 ms blocks as a live capture
delivers them, one ``step`` per block as the pipeline runs it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kwsd.audio.wavfile import read_wav
from kwsd.kws import detector as detector_module
from kwsd.kws.detector import Detection, Detector
from kwsd.kws.session import ModelSession
from kwsd.settings import DetectorSettings

BLOCK = 320  # 20 ms


@pytest.fixture(scope="module")
def session(model_path: Path) -> ModelSession:
    return ModelSession(model_path, providers=["CPUExecutionProvider"])


def feed(det: Detector, audio: np.ndarray) -> tuple[list[tuple[Detection, int]], int]:
    """Blocks of real-time capture into one stream; returns each detection with the samples accepted when it
    came, and the number of model steps (batched calls) the stream took."""
    det.add_stream("s")
    out: list[tuple[Detection, int]] = []
    fed = 0
    for i in range(0, audio.size, BLOCK):
        block = audio[i : i + BLOCK]
        det.accept("s", block)
        fed += block.size
        out.extend((hit, fed) for hit in det.step())
    return out, det.timing.steps


def recording(positives: list[Path], negatives: list[Path]) -> np.ndarray:
    parts = []
    for path in [*positives[:4], *negatives[:3]]:
        parts += [read_wav(path), np.zeros(16000, np.float32)]
    return np.concatenate(parts)


def test_quiet_streams_step_less_often_and_detect_the_same(session: ModelSession, positives: list[Path],
                                                           negatives: list[Path]) -> None:
    audio = recording(positives, negatives)
    plain, plain_steps = feed(Detector(session, DetectorSettings(step_frames=3, quiet_step_frames=3)), audio)
    paced, paced_steps = feed(Detector(session, DetectorSettings(step_frames=1, quiet_step_frames=9)), audio)
    assert len(plain) == 4, "every positive is detected"
    key = [(h.keyword, round(h.score, 5), h.start_sample, h.end_sample, h.decided_sample) for h, _ in plain]
    assert [(h.keyword, round(h.score, 5), h.start_sample, h.end_sample, h.decided_sample) for h, _ in paced] == key
    # Known at least as early (steps of one frame while the keyword forms), never later.
    for (_, fed_a), (b, fed_b) in zip(plain, paced, strict=True):
        assert fed_b <= fed_a, f"{b} known after {fed_b} samples, with plain steps after {fed_a}"
    assert sum(fed_a - fed_b for (_, fed_a), (_, fed_b) in zip(plain, paced, strict=True)) > 0
    frames = audio.size // 480
    assert plain_steps >= frames // 3 - 2
    assert paced_steps < plain_steps, f"{paced_steps} steps with quiet steps of 9 frames, {plain_steps} without"


def test_silence_steps_at_the_quiet_cadence(session: ModelSession) -> None:
    silence = np.zeros(16000 * 6, np.float32)
    det = Detector(session, DetectorSettings(step_frames=1, quiet_step_frames=9))
    hits, steps = feed(det, silence)
    frames = silence.size // 480
    assert not hits
    assert steps <= frames // 9 + 2, f"{steps} steps for {frames} frames of silence"
    # Every frame the audio completes is decoded by the time the next quiet step is due.
    assert det.samples_needed("s") <= 9 * 480


def test_quiet_steps_are_off_without_the_scan_or_below_step_frames(session: ModelSession) -> None:
    assert Detector(session, DetectorSettings(step_frames=3, quiet_step_frames=9), scan=False).quiet_step_frames == 3
    assert Detector(session, DetectorSettings(step_frames=4, quiet_step_frames=2)).quiet_step_frames == 4


def test_many_quiet_streams_take_their_long_steps_in_turns(session: ModelSession,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A few sites share one grid (one call per quiet step); 32 silent streams fed alike take their long steps in
    cohorts of 8, a frame apart, so no call carries them all (a step's time stays near the average). With more
    streams than that, every stream steps at each frame, all in one call."""
    silence = np.zeros(BLOCK, np.float32)

    def calls(n: int) -> list[int]:
        det = Detector(session, DetectorSettings(step_frames=1, quiet_step_frames=9))
        sizes: list[int] = []
        run = det._run

        def spy(streams, frames, final=False):  # type: ignore[no-untyped-def]
            sizes.append(len(streams))
            return run(streams, frames, final)

        monkeypatch.setattr(det, "_run", spy)
        for i in range(n):
            det.add_stream(f"s{i}")
        for _ in range(16000 * 4 // BLOCK):
            for i in range(n):
                det.accept(f"s{i}", silence)
            det.step()
        return sizes[4:]  # past the look-ahead's warm-up

    few = calls(8)
    assert set(few) == {8}, few
    many = calls(32)
    frames = 16000 * 4 // 480
    assert max(many) <= 16, many
    assert sum(many) / 32 <= frames / 9 + 2, "each stream still steps at the quiet cadence"
    crowd = calls(detector_module._QUIET_MAX_STREAMS + 1)
    assert set(crowd) == {detector_module._QUIET_MAX_STREAMS + 1}, crowd
    assert len(crowd) >= frames - 8, "a crowd of streams steps at every model frame"
