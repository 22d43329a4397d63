"""The review archive's parts on real files and real audio: bounds, verdicts, the feedback message, the pipeline
tap, near misses from the real model, the CLI's errors and the review settings."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml

from kwsd.audio.wavfile import read_wav, write_wav
from kwsd.kws.detector import Detector, detect_samples
from kwsd.kws.session import ModelSession
from kwsd.metrics import Metrics
from kwsd.mqtt.messages import MessageError, WakeEvent
from kwsd.review.archive import Archive
from kwsd.review.feedback import Feedback
from kwsd.review.store import Entry, file_stem, scan, sidecar_bytes
from kwsd.review.tap import ReviewTap
from kwsd.segments import Segment
from kwsd.settings import ConfigError, DetectorSettings, ReviewSettings, loads
from kwsd.supervisor import Daemon, Factories
from kwsd.systemd import Notifier
from tests.fixtures_systemd import NotifySocket

REPO = Path(__file__).resolve().parent.parent
POSITIVE = "positive/20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_15.wav"


def event(site: str = "kitchen", when: datetime | None = None, score: float = 0.6) -> WakeEvent:
    stamp = (when or datetime.now(UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return WakeEvent(
        site_id=site, wakeword_id="小云小云", keyword="小云小云", score=score, threshold=0.4, start=1.0, end=1.8,
        session_id=f"s{time.monotonic_ns()}", device="mic", energy=-30.0, latency=250.0, timestamp=stamp)


def segment(ev: WakeEvent, seconds: float) -> Segment:
    n = int(seconds * 16000)
    return Segment(site=ev.site_id, session_id=ev.session_id, samples=np.full(n, 100, dtype=np.int16),
                   start_sample=11200, keyword_start_sample=16000, keyword_end_sample=28800, reason="silence")


def test_bounds_evict_the_oldest_first_each_kind_on_its_own(tmp_path: Path) -> None:
    settings = ReviewSettings(max_bytes=300_000, near_miss_max_bytes=100_000)
    metrics = Metrics()
    archive = Archive(settings, tmp_path / "review", metrics=metrics)
    archive.start()
    wakes = []
    for _ in range(4):  # 3 s of audio each: 96 kB + a sidecar; three fit in 300 kB, four do not
        ev = event()
        wakes.append(ev)
        archive.put_wake(ev)
        archive.put_segment(segment(ev, 3.0))
        time.sleep(0.005)
    near = [event(site="porch") for _ in range(2)]
    for ev in near:  # 2 s each (64 kB): only the newest fits in 100 kB
        archive.put_clip(ev, np.zeros(32000, dtype=np.int16), 0, near_miss=True)
        time.sleep(0.005)
    archive.stop()
    kept = [e.session_id for e in scan(tmp_path / "review", ["wake"])]
    assert kept == [w.session_id for w in wakes[1:]]
    assert [e.session_id for e in scan(tmp_path / "review", ["near_miss"])] == [near[1].session_id]
    assert not list((tmp_path / "review" / "wakes").glob(f"*{wakes[0].session_id}*"))  # WAV and sidecar gone
    assert archive.evicted == 2
    summary = metrics.summary()["review"]
    assert summary["near_misses"] == {"porch": {"小云小云": 2}} and summary["errors"] == {}


def test_entries_older_than_max_days_go_at_start_and_verdicts_survive_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "review"
    (root / "wakes").mkdir(parents=True)
    old, new = event(when=datetime.now(UTC) - timedelta(days=40)), event(when=datetime.now(UTC) - timedelta(days=3))
    for ev in (old, new):
        path = root / "wakes" / f"{file_stem(ev.timestamp, ev.site_id, ev.session_id)}.json"
        path.write_bytes(sidecar_bytes({**ev.to_dict(), "kind": "wake", "verdict": None}))
    metrics = Metrics()
    archive = Archive(ReviewSettings(max_days=30), root, metrics=metrics)
    archive.start()
    try:
        assert [e.session_id for e in scan(root)] == [new.session_id]
        archive.feedback("kitchen", json.dumps({"sessionId": new.session_id, "verdict": "false_wake"}).encode())
        with pytest.raises(MessageError, match="unknown sessionId"):
            archive.feedback("kitchen", json.dumps({"sessionId": old.session_id, "verdict": "wake"}).encode())
    finally:
        archive.stop()  # writes everything handed over first
    [entry] = scan(root)
    assert entry.verdict == "false_wake" and entry.data["verdictSource"] == "mqtt"
    assert metrics.summary()["review"]["false_wakes"] == {"kitchen": {"小云小云": 1}}
    again = Archive(ReviewSettings(), root)
    again.start()
    try:
        again.check(Feedback("kitchen", "wake", new.session_id))  # known after a restart
        assert again.summary().false_wakes == 1
    finally:
        again.stop()


def test_missed_wake_reported_without_a_session_counts_in_the_rate(tmp_path: Path) -> None:
    metrics = Metrics()
    archive = Archive(ReviewSettings(), tmp_path / "review", metrics=metrics, keywords=["小云小云"])
    archive.start()
    try:
        ev = event()
        archive.put_wake(ev)
        archive.feedback("kitchen", json.dumps({"sessionId": ev.session_id, "verdict": "wake"}).encode())
        archive.feedback("kitchen", b'{"verdict": "missed"}')
    finally:
        archive.stop()
    assert sorted(e.kind for e in scan(tmp_path / "review")) == ["report", "wake"]
    review = metrics.summary()["review"]
    assert review["confirmed_wakes"] == {"kitchen": {"小云小云": 1}}
    assert review["missed_wakes"] == {"kitchen": {"小云小云": 1}}
    assert review["effective_wake_rate"] == {"kitchen": {"小云小云": 0.5}}  # 1 true wake of 2 requested


@pytest.mark.parametrize("payload, problem", [
    (b"\xff", "not JSON"),
    (b"[1]", "expected a JSON object"),
    (b'{"sessionId": "a"}', "'verdict' must be one of"),
    (b'{"sessionId": 5, "verdict": "wake"}', "'sessionId' must be a non-empty string"),
    (b'{"verdict": "false_wake"}', "'sessionId' is required"),
    (b'{"verdict": "missed", "wakewordId": 3}', "'wakewordId' must be a string"),
])
def test_feedback_payload_errors_name_the_field(payload: bytes, problem: str) -> None:
    with pytest.raises(MessageError, match=problem):
        Feedback.from_payload(payload, "kitchen")


def test_feedback_round_trip_and_topic() -> None:
    fb = Feedback("kitchen", "false_wake", "abc")
    assert Feedback.from_payload(fb.to_payload(), "kitchen") == fb
    assert Feedback.topic("kwsd", "kitchen") == "kwsd/kitchen/feedback"
    assert Feedback.site_from_topic("home/kwsd", "home/kwsd/kitchen/feedback") == "kitchen"
    assert Feedback.site_from_topic("kwsd", "kwsd/a/b/feedback") is None


def test_a_wake_cannot_be_missed(tmp_path: Path) -> None:
    archive = Archive(ReviewSettings(), tmp_path / "review")
    archive.start()
    try:
        ev = event()
        archive.put_wake(ev)
        with pytest.raises(MessageError, match="cannot be missed"):
            archive.feedback("kitchen", json.dumps({"sessionId": ev.session_id, "verdict": "missed"}).encode())
    finally:
        archive.stop()


@pytest.mark.parametrize("block", [160, 1000, 7919])
def test_tap_cuts_keyword_plus_margins_whatever_the_blocks(block: int, tmp_path: Path, audio_dir: Path) -> None:
    audio = read_wav(audio_dir / POSITIVE).astype(np.int16)
    archive = Archive(ReviewSettings(), tmp_path / "review")
    archive.start()
    tap = ReviewTap(archive, margin=2.0, segments=False)
    ev = event()
    archive.put_wake(ev)
    start, end = 5 * 16000, 6 * 16000  # the keyword span as the detector reports it
    first = 1_000_000  # absolute capture index of the file's first sample
    for i in range(0, len(audio), block):
        tap.feed("kitchen", audio[i:i + block], first + i)
        if i <= end < i + block:  # the wake is reported in the block that completes the keyword
            tap.wake(ev, first + start, first + end)
    archive.stop()
    [entry] = scan(tmp_path / "review")
    assert entry.data["audioStart"] == pytest.approx((first + start - 32000) / 16000)
    clip = read_wav(entry.audio) if entry.audio else None
    assert clip is not None
    np.testing.assert_array_equal(clip.astype(np.int16), audio[start - 32000:end + 32000])


def test_near_misses_from_the_real_model(model_path: Path, audio_dir: Path, negatives: list[Path]) -> None:
    session = ModelSession(model_path, ("CPUExecutionProvider",))
    audio = np.concatenate([read_wav(audio_dir / POSITIVE), np.zeros(16000, dtype=np.float32)])
    det = Detector(session, DetectorSettings(), near_miss_ratio=0.7)
    hits = detect_samples(det, "a", audio, block=1600)
    assert len(hits) == 1 and det.near_misses() == []  # the rising edge of a wake is not a near miss
    best = hits[0]
    # The same words on a site whose threshold they cannot reach: one near miss, nothing fired.
    strict = Detector(session, DetectorSettings(site_thresholds={"porch": 0.999}), near_miss_ratio=0.3)
    assert detect_samples(strict, "porch", audio, block=1600) == []
    [miss] = strict.near_misses()
    assert miss.near_miss and miss.threshold == 0.999 and 0.3 * 0.999 <= miss.score < 0.999
    assert abs(miss.start_sample - best.start_sample) <= 480 and abs(miss.end_sample - best.end_sample) <= 3 * 480
    # Other sites keep the keyword's own threshold.
    assert [h.stream for h in detect_samples(strict, "kitchen", audio, block=1600)] == ["kitchen"]
    # Off by default: no near misses kept.
    plain = Detector(session, DetectorSettings(site_thresholds={"porch": 0.999}))
    detect_samples(plain, "porch", audio, block=1600)
    assert plain.near_misses() == []


def test_review_cli_errors_name_the_problem(tmp_path: Path) -> None:
    def review(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kwsd", "review", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=60)

    missing = review("list", "--dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "no review archive at" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "review" / "wakes").mkdir(parents=True)
    unknown = review("mark", "--dir", str(tmp_path / "review"), "deadbeef", "false_wake")
    assert unknown.returncode == 1 and "session deadbeef: not in the review archive" in unknown.stderr
    bad = review("mark", "--dir", str(tmp_path / "review"), "deadbeef", "maybe")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    ev = event()
    path = tmp_path / "review" / "wakes" / f"{file_stem(ev.timestamp, ev.site_id, ev.session_id)}.json"
    Entry(path, {**ev.to_dict(), "kind": "wake", "verdict": None}).save()
    marked = review("mark", "--dir", str(tmp_path / "review"), ev.session_id, "wake")
    assert marked.returncode == 0 and json.loads(path.read_text())["verdict"] == "wake"
    assert path.stat().st_mode & 0o777 == 0o600
    wrong = review("mark", "--dir", str(tmp_path / "review"), ev.session_id, "missed")
    assert wrong.returncode == 1 and "cannot be missed" in wrong.stderr


@pytest.mark.parametrize("text, key", [
    ("review: {near_miss_ratio: 1.5}", "review.near_miss_ratio"),
    ("review: {max_bytes: 10}", "review.max_bytes"),
    ("review: {max_days: 0}", "review.max_days"),
    ("review: {max_days: .inf}", "review.max_days"),
    ("review: {margin: 120}", "review.margin"),
    ("review: {window_days: -1}", "review.window_days"),
    ("review: {enable: true}", "review.enable"),
    ("detector: {site_thresholds: {porch: 0}}", "detector.site_thresholds.porch"),
    ("detector: {site_thresholds: {porch: high}}", "detector.site_thresholds.porch"),
])
def test_review_settings_errors_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(text)
    assert info.value.key == key


def test_config_yaml_documents_the_review_defaults() -> None:
    s = loads((REPO / "config.yaml").read_text(), base_dir=REPO)
    assert s.review == ReviewSettings() and s.detector.site_thresholds == {}


def test_a_verdict_marked_with_the_cli_reaches_the_running_archive(tmp_path: Path) -> None:
    metrics = Metrics()
    archive = Archive(ReviewSettings(), tmp_path / "review", metrics=metrics, maintenance=0.2)
    archive.start()
    try:
        ev = event()
        archive.put_wake(ev)
        deadline = time.monotonic() + 10
        while not scan(tmp_path / "review") and time.monotonic() < deadline:
            time.sleep(0.05)
        done = subprocess.run([sys.executable, "-m", "kwsd", "review", "mark", "--dir", str(tmp_path / "review"),
                               ev.session_id, "false_wake"], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert done.returncode == 0, done.stderr
        while archive.summary().false_wakes != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert archive.summary().false_wakes == 1
        assert metrics.summary()["review"]["false_wakes"] == {"kitchen": {"小云小云": 1}}
    finally:
        archive.stop()


def test_fuzzed_feedback_is_a_message_error_or_a_verdict_never_a_crash(tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    archive = Archive(ReviewSettings(), tmp_path / "review")
    archive.start()
    ev = event()
    archive.put_wake(ev)
    pieces = [b'{"sessionId": ', json.dumps(ev.session_id).encode(), b'"verdict"', b': ', b'"false_wake"', b'"missed"',
              b'null', b'[', b']', b'{', b'}', b',', b'"', b'\\u0000', "小云".encode(), b'\xff', b'1e999', b'true']
    accepted = rejected = 0
    try:
        for _ in range(2000):
            payload = b"".join(pieces[i] for i in rng.integers(0, len(pieces), rng.integers(0, 12)))
            try:
                archive.feedback("kitchen", payload)
                accepted += 1
            except MessageError:
                rejected += 1
        for verdict in ("false_wake", "wake"):  # well-formed ones still work afterwards
            archive.feedback("kitchen", json.dumps({"sessionId": ev.session_id, "verdict": verdict}).encode())
    finally:
        archive.stop()
    assert rejected > 1900 and accepted + rejected == 2000
    assert scan(tmp_path / "review")[0].verdict == "wake"


def test_near_misses_are_fused_across_the_lfr_phases(model_path: Path, audio_dir: Path) -> None:
    """A phase's near miss counts only if no phase fired; then it is reported once, with the best phase's score,
    wherever the audio started."""
    session = ModelSession(model_path, ("CPUExecutionProvider",))
    clip = "positive/20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_23.wav"  # 0.35 / 0.61 / 0.39 by framing
    audio = np.concatenate([read_wav(audio_dir / clip), np.zeros(16000, dtype=np.float32)])
    # What each framing alone scores (one phase, the audio shifted by 0, 10 and 20 ms).
    per_phase = []
    for shift in (0, 160, 320):
        one = Detector(session, DetectorSettings(site_thresholds={"x": 0.999}), phases=1, near_miss_ratio=0.3)
        detect_samples(one, "x", audio[shift:], block=1600)
        [m] = one.near_misses()
        per_phase.append(m.score)
    assert max(per_phase) - min(per_phase) > 0.1, per_phase  # the framings do disagree on this clip
    # Out of every phase's reach: one near miss per utterance at every offset, scored like the best framing.
    for shift in (0, 160, 320):
        det = Detector(session, DetectorSettings(site_thresholds={"x": 0.999}), near_miss_ratio=0.3)
        assert detect_samples(det, "x", audio[shift:], block=1600) == []
        [miss] = det.near_misses()
        assert miss.score == pytest.approx(max(per_phase), abs=1e-3)
    # Between the framings' scores: one framing fires, so the others' near misses of it are not kept.
    between = (max(per_phase) + min(per_phase)) / 2
    det = Detector(session, DetectorSettings(site_thresholds={"x": between}), near_miss_ratio=0.3)
    [hit] = detect_samples(det, "x", audio, block=1600)
    assert hit.score == pytest.approx(max(per_phase), abs=1e-3)
    assert det.near_misses() == []


def test_phased_near_miss_fusion_rules() -> None:
    from kwsd.kws.decoder import Hit, Keyword, KeywordDecoder
    from kwsd.kws.detector import PhasedDecoder

    kw = Keyword("小云小云", "小云小云", (1462, 976, 1462, 976), 0.4, 5, 60)
    decoders = [KeywordDecoder([kw], refractory_frames=34, near_miss_ratio=0.7) for _ in range(3)]
    fused = PhasedDecoder(decoders, 3)

    def near(score: float, end: int) -> Hit:
        return Hit(keyword=kw, score=score, start_frame=end - 20, end_frame=end, decided_frame=end)

    # Two phases come close to one utterance: nothing until every phase has settled, then the best one.
    assert fused.fuse_near([(0, near(0.30, 100)), (2, near(0.35, 101))], 110) == []
    [out] = fused.fuse_near([], 130)
    assert out.phase == 2 and out.hit.score == 0.35
    # Its late copy from the third phase is the same candidate.
    assert fused.fuse_near([(1, near(0.33, 101))], 140) == []
    # A phase fired on the utterance: another phase's near miss of it is not kept.
    [wake] = fused.fuse([(1, Hit(kw, 0.5, 180, 200, 200))], 202)
    assert wake.phase == 1
    assert fused.fuse_near([(0, near(0.32, 199))], 230) == []
    # A separate utterance later is a near miss again; the end of the stream releases it at once.
    [late] = fused.fuse_near([(0, near(0.31, 300))], None)
    assert late.hit.end_frame == 300


class _HangingArchive(Archive):
    """The real archive on a disk that stops answering: writing a wake blocks until ``release`` is set."""

    release = threading.Event()

    def _handle(self, item: object) -> None:
        if isinstance(item, WakeEvent):
            self.release.wait(30)
        super()._handle(item)


def test_a_stuck_archive_writer_stops_the_watchdog(model_path: Path, audio_dir: Path, tmp_path: Path,
                                                   notify_socket: NotifySocket) -> None:
    """The archive's writer beats into the daemon's liveness: stuck on a disk for longer than it promised, the
    watchdog stops pinging and STATUS names it; detection goes on meanwhile, and pings resume once the disk
    answers."""
    notify_socket.collect()
    audio = np.concatenate([read_wav(audio_dir / POSITIVE), np.zeros(3 * 16000, dtype=np.float32)])
    wav = tmp_path / "kitchen.wav"
    write_wav(wav, audio.astype(np.int16), 16000)
    settings = loads(yaml.safe_dump({
        "model": {"path": str(model_path), "providers": ["CPUExecutionProvider"]},
        "inputs": [{"device": str(wav), "kind": "file", "realtime": False, "sites": {0: "kitchen"}}],
        "mqtt": {"enabled": False},
        "service": {"state_dir": str(tmp_path / "state"), "status_interval": 0.5},
    }))
    _HangingArchive.release.clear()
    daemon = Daemon(None, settings, Notifier(notify_socket.env(WATCHDOG_USEC="1000000")),
                    Factories(archive=_HangingArchive))
    serving = threading.Thread(target=daemon.serve, kwargs={"handle_signals": False}, daemon=True)
    serving.start()
    try:
        deadline = time.monotonic() + 60
        while daemon.pipeline is None or daemon.pipeline.detections == 0:
            assert time.monotonic() < deadline, "no wake"
            time.sleep(0.05)
        deadline = time.monotonic() + 15
        while "review" not in daemon.liveness.overdue():
            assert time.monotonic() < deadline, daemon.liveness.parts()
            time.sleep(0.1)
        stuck = time.monotonic()
        time.sleep(2.0)
        assert not [t for t, m in list(notify_socket.messages) if t > stuck + 0.5 and m.get("WATCHDOG") == "1"]
        assert any("review not responding" in line for line in notify_socket.lines("STATUS=", stuck - 1.0))
        assert daemon.pipeline.detections == 1  # detection was not held up
        _HangingArchive.release.set()
        resumed = time.monotonic()
        deadline = resumed + 10
        while not [t for t, m in list(notify_socket.messages) if t > resumed and m.get("WATCHDOG") == "1"]:
            assert time.monotonic() < deadline, "the pings did not resume"
            time.sleep(0.1)
        assert daemon.liveness.overdue() == ()
    finally:
        _HangingArchive.release.set()
        daemon.stop_event.set()
        serving.join(20)
    assert [e.kind for e in scan(tmp_path / "state" / "review")] == ["wake"]
