"""The review loop through the real daemon: ``python -m kwsd run`` replaying real recordings, a real mosquitto, the
Prometheus endpoint and a NOTIFY_SOCKET; then ``kwsd review`` and ``kwsd detect``/``kwsd eval`` on what it kept.

A full disk and a read-only archive folder are real tmpfs mounts (the test runs as root, as CI does).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kwsd.audio.wavfile import read_wav
from tests.fixtures_broker import Broker, Subscriber, free_port, wait_until
from tests.fixtures_daemon import Kwsd
from tests.fixtures_systemd import NotifySocket

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parent.parent
RATE = 16000
POSITIVE = "positive/20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_15.wav"  # keyword at about 5.9-6.7 s


def write_wav(path: Path, samples: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(np.asarray(samples).astype("<i2").tobytes())
    return path


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.float32)


def kwsd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kwsd", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


class Running(Kwsd):
    """``python -m kwsd run --config FILE`` with a NOTIFY_SOCKET; its log in a file."""

    def __init__(self, config: dict, folder: Path, notify: NotifySocket) -> None:
        super().__init__(config, folder, env=notify.env())


@pytest.fixture
def notify(notify_socket: NotifySocket) -> NotifySocket:
    notify_socket.collect()
    return notify_socket


def make_config(model_path: Path, state: Path, broker: Broker, inputs: list[dict], metrics_port: int,
                **sections: dict) -> dict:
    cfg: dict = {
        "model": {"path": str(model_path), "providers": ["CPUExecutionProvider"]},
        "inputs": inputs,
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "reconnect_min": 0.2, "reconnect_max": 1.0},
        "segments": {"silence_timeout": 0.7, "max_length": 8.0},
        "service": {"state_dir": str(state), "status_interval": 1.0,
                    "metrics": {"enabled": True, "port": metrics_port}},
    }
    for name, section in sections.items():
        cfg.setdefault(name, {}).update(section)
    return cfg


def file_input(path: Path, site: str) -> dict:
    return {"device": str(path), "kind": "file", "realtime": False, "sites": {0: site}}


def payloads(sub: Subscriber, topic: str) -> list[dict]:
    return [json.loads(m.payload) for m in list(sub.messages) if m.topic == topic]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sidecars(review: Path, folder: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((review / folder).glob("*.json"))]


def detect(path: Path, model_path: Path) -> list[dict]:
    out = kwsd("detect", str(path), "--model", str(model_path), "--provider", "CPUExecutionProvider")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------------------------------------------------------


def test_review_loop_through_the_daemon(broker: Broker, notify: NotifySocket, model_path: Path, audio_dir: Path,
                                        negatives: list[Path], tmp_path: Path) -> None:
    pos = np.concatenate([read_wav(audio_dir / POSITIVE), silence(3.0)])
    kitchen = write_wav(tmp_path / "kitchen.wav", pos)
    porch = write_wav(tmp_path / "porch.wav", pos)  # the same words, but the porch's threshold is out of reach
    hall = write_wav(tmp_path / "hall.wav", np.concatenate([read_wav(negatives[0]), silence(3.0)]))
    state, port = tmp_path / "state", free_port()
    review = state / "review"
    sub = Subscriber(broker, "kwsd/#", "hermes/#")
    cfg = make_config(model_path, state, broker,
                      [file_input(kitchen, "kitchen"), file_input(hall, "hall"), file_input(porch, "porch")], port,
                      detector={"site_thresholds": {"porch": 0.999}}, review={"near_miss_ratio": 0.3})
    daemon = Running(cfg, tmp_path, notify)
    try:
        daemon.wait_for(lambda: payloads(sub, "kwsd/kitchen/segment"), 60, "the kitchen segment")
        [wake] = payloads(sub, "kwsd/kitchen/wake")
        [ann] = payloads(sub, "kwsd/kitchen/segment")
        daemon.wait_for(lambda: any(s.get("audio") for s in sidecars(review, "wakes")), 10, "the wake's audio")
        daemon.wait_for(lambda: sidecars(review, "near_misses"), 15, "the porch near miss")

        # The wake: its sidecar holds the published figures; its WAV is the published segment, byte for byte.
        [side] = sidecars(review, "wakes")
        for key in ("sessionId", "siteId", "wakewordId", "keyword", "score", "threshold", "start", "end", "energy",
                    "device", "timestamp", "latency"):
            assert side[key] == wake[key], key
        assert side["kind"] == "wake" and side["verdict"] is None
        assert side["kwsdVersion"] and side["modelVersion"].startswith("iic/speech_charctc_kws_phone-xiaoyun@")
        assert side["audioStart"] == pytest.approx(ann["start"], abs=0.001)
        wav_path = review / "wakes" / side["audio"]
        [segment_wav] = [m.payload for m in sub.messages if m.topic == ann["topic"]]
        assert wav_path.read_bytes() == segment_wav
        assert side["duration"] == pytest.approx(ann["duration"], abs=0.001)
        # Private: files 0600, folders 0700.
        assert {p.stat().st_mode & 0o777 for p in (review / "wakes").iterdir()} == {0o600}
        assert {p.stat().st_mode & 0o777 for p in [review, *review.iterdir()]} == {0o700}
        # The archived audio holds the keyword: detecting again on the file finds it.
        [again] = detect(wav_path, model_path)
        assert again["keyword"] == "小云小云"

        # The porch: the same words below its own threshold, kept as a near miss with keyword +- 2 s.
        [near] = sidecars(review, "near_misses")
        assert near["kind"] == "near_miss" and near["siteId"] == "porch" and near["threshold"] == 0.999
        assert 0.3 * 0.999 <= near["score"] < 0.999
        assert near["audioStart"] == pytest.approx(near["start"] - 2.0, abs=0.01)
        assert near["duration"] == pytest.approx(near["end"] - near["start"] + 4.0, abs=0.05)
        assert not payloads(sub, "kwsd/porch/wake")
        assert detect(review / "near_misses" / near["audio"], model_path)
        # The negative: nothing woke and nothing was kept for the hall.
        assert not payloads(sub, "kwsd/hall/wake")
        assert all(s["siteId"] != "hall" for s in sidecars(review, "wakes") + sidecars(review, "near_misses"))

        # Feedback over MQTT: the kitchen wake was false, the porch near miss was the keyword.
        sub.publish("kwsd/kitchen/feedback", json.dumps({"sessionId": wake["sessionId"], "verdict": "false_wake"}))
        sub.publish("kwsd/porch/feedback", json.dumps({"sessionId": near["sessionId"], "verdict": "missed"}))
        daemon.wait_for(lambda: sidecars(review, "wakes")[0]["verdict"] == "false_wake", 10, "the verdict")
        daemon.wait_for(lambda: sidecars(review, "near_misses")[0]["verdict"] == "missed", 10, "the near miss verdict")
        assert sidecars(review, "wakes")[0]["verdictSource"] == "mqtt"
        # Unknown sessions and malformed payloads are answered on the error topic; the daemon goes on.
        sub.publish("kwsd/kitchen/feedback", json.dumps({"sessionId": "nope", "verdict": "false_wake"}))
        sub.publish("kwsd/kitchen/feedback", b"{not json")
        sub.publish("kwsd/kitchen/feedback", json.dumps({"sessionId": wake["sessionId"], "verdict": "maybe"}))
        sub.publish("kwsd/hall/feedback", json.dumps({"sessionId": wake["sessionId"], "verdict": "wake"}))
        wait_until(lambda: len(payloads(sub, "hermes/error/hotword")) >= 4, 10, "four error answers")
        errors = [e["error"] for e in payloads(sub, "hermes/error/hotword")]
        assert "unknown sessionId 'nope'" in errors[0]
        assert "not JSON" in errors[1] and "'verdict' must be one of" in errors[2]
        assert "heard on site 'kitchen', not 'hall'" in errors[3]
        assert {e["siteId"] for e in payloads(sub, "hermes/error/hotword")} == {"kitchen", "hall"}

        # The metrics: verdict counters, the effective wake rate per site and keyword, in STATUS= as well.
        def figures() -> dict:
            m = scrape(port)
            return {name: m.get((f"kwsd_{name}", labels))
                    for name, labels in (("false_wakes_total", (("keyword", "小云小云"), ("site", "kitchen"))),
                                         ("missed_wakes_total", (("keyword", "小云小云"), ("site", "porch"))),
                                         ("effective_wake_rate", (("keyword", "小云小云"), ("site", "porch"))),
                                         ("near_misses_total", (("keyword", "小云小云"), ("site", "porch"))))}
        wait_until(lambda: figures()["effective_wake_rate"] is not None, 10, "the effective wake rate gauge")
        assert figures() == {"false_wakes_total": 1.0, "missed_wakes_total": 1.0, "effective_wake_rate": 0.0,
                             "near_misses_total": 1.0}
        daemon.wait_for(lambda: any("1 false wakes, effective 0%" in line for line in notify.lines("STATUS=")),
                        10, "the review figures in STATUS=")

        # ... and in the retained summary message, which a late subscriber gets at once.
        def retained_summary() -> dict | None:
            late = Subscriber(broker, "kwsd/summary")
            try:
                [msg] = late.wait_for(1, "kwsd/summary", timeout=5)
            finally:
                late.close()
            assert msg.retain
            summary = json.loads(msg.payload)
            review = summary["review"]
            ok = review["false_wakes"].get("kitchen", {}).get("小云小云") == 1 and \
                review["effective_wake_rate"].get("porch", {}).get("小云小云") == 0.0
            return summary if ok else None

        wait_until(lambda: retained_summary() is not None, 15, "the review figures in the retained summary")
        summary = retained_summary()
        assert summary is not None and "1 false wakes, effective 0%" in summary["status"]
        assert summary["detections"]["kitchen"]["小云小云"] == 1
        assert daemon.proc.poll() is None
    finally:
        rc = daemon.terminate() if daemon.proc.poll() is None else daemon.proc.returncode
        sub.close()
    assert rc == 0, daemon.text()[-3000:]
    assert "Traceback" not in daemon.text()

    # The CLI reads the same archive: list, stats, export, then kwsd eval on the export.
    listed = kwsd("review", "list", "--dir", str(review))
    assert listed.returncode == 0, listed.stderr
    print(listed.stdout)
    assert wake["sessionId"] in listed.stdout and "false_wake" in listed.stdout and "near_miss" in listed.stdout
    only = kwsd("review", "list", "--dir", str(review), "--site", "porch", "--min-score", "0.3", "--json")
    assert [e["sessionId"] for e in json.loads(only.stdout)] == [near["sessionId"]]
    assert json.loads(kwsd("review", "list", "--dir", str(review), "--verdict", "none", "--json").stdout) == []
    stats = kwsd("review", "stats", "--dir", str(review))
    print(stats.stdout)
    as_json = json.loads(kwsd("review", "stats", "--dir", str(review), "--json").stdout)
    window = {r["site"]: r for r in as_json["window"]}
    assert window["kitchen"]["wakes"] == 1 and window["kitchen"]["false_wakes"] == 1
    assert window["porch"]["missed_wakes"] == 1 and window["porch"]["effective_wake_rate"] == 0.0
    out = tmp_path / "exported"
    exported = kwsd("review", "export", "--dir", str(review), str(out))
    assert exported.returncode == 0, exported.stderr
    assert [p.name for p in (out / "negative").iterdir()] == [side["audio"]]
    assert [p.name for p in (out / "positive").iterdir()] == [near["audio"]]
    ev = kwsd("eval", "--positive", str(out / "positive"), "--negative", str(out / "negative"),
              "--model", str(model_path), "--provider", "CPUExecutionProvider", "--json")
    assert ev.returncode == 0, ev.stderr
    [report] = json.loads(ev.stdout)["keywords"]
    at = {r["threshold"]: r for r in report["rows"]}[report["threshold"]]  # the configured threshold
    assert at["positives"] == 1 and at["detected"] == 1  # the near miss marked missed: heard at every offset
    # The wake marked false_wake was the keyword said (this test's verdict is a lie): eval counts it against us.
    assert at["false_alarms"] >= 1


@pytest.fixture
def tiny_mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    mounted: list[Path] = []

    def mount(path: Path, *options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=10)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=10)


@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
def test_archive_that_cannot_write_is_logged_counted_and_detection_goes_on(
        fault: str, broker: Broker, notify: NotifySocket, model_path: Path, audio_dir: Path,
        tiny_mount: Callable[..., Path], tmp_path: Path) -> None:
    keyword = read_wav(audio_dir / POSITIVE)
    twice = write_wav(tmp_path / "twice.wav", np.concatenate([keyword, silence(2.0), keyword, silence(3.0)]))
    state, port = tmp_path / "state", free_port()
    review = state / "review"
    if fault == "disk_full":
        tiny_mount(review, "size=64k", "mode=0700")  # the sidecars fit, the first 4-second WAV does not
    else:
        tiny_mount(review, "ro", "mode=0700")
    sub = Subscriber(broker, "kwsd/#")
    daemon = Running(make_config(model_path, state, broker, [file_input(twice, "kitchen")], port), tmp_path, notify)
    try:
        daemon.wait_for(lambda: len(payloads(sub, "kwsd/kitchen/segment")) >= 2, 60, "both wakes and segments")
        wait_until(lambda: scrape(port).get(("kwsd_review_errors_total", (("reason", "write"),)), 0) >= 2, 10,
                   "the write errors counted")
        log = daemon.text()
        errors = [line for line in log.splitlines() if "ERROR" in line and "review archive" in line]
        expected = "No space left on device" if fault == "disk_full" else "Read-only file system"
        assert errors and expected in errors[0], log[-3000:]
        assert len(errors) <= 2, errors  # each distinct problem once, not per wake
        assert len(payloads(sub, "kwsd/kitchen/wake")) == 2
        daemon.wait_for(lambda: any("not archived" in line for line in notify.lines("STATUS=")), 10,
                        "the loss in STATUS=")
        assert not list(review.rglob("*.wav")) and not list(review.rglob(".*.tmp"))
    finally:
        rc = daemon.terminate() if daemon.proc.poll() is None else daemon.proc.returncode
        sub.close()
    assert rc == 0 and "Traceback" not in daemon.text()


def test_with_segments_off_the_archive_keeps_the_keyword_and_two_seconds_around_it(
        broker: Broker, notify: NotifySocket, model_path: Path, audio_dir: Path, tmp_path: Path) -> None:
    pos = write_wav(tmp_path / "pos.wav", np.concatenate([read_wav(audio_dir / POSITIVE), silence(3.0)]))
    state, port = tmp_path / "state", free_port()
    sub = Subscriber(broker, "kwsd/#")
    daemon = Running(make_config(model_path, state, broker, [file_input(pos, "kitchen")], port,
                                 segments={"enabled": False}), tmp_path, notify)
    try:
        daemon.wait_for(lambda: payloads(sub, "kwsd/kitchen/wake"), 60, "the wake")
        daemon.wait_for(lambda: any(s.get("audio") for s in sidecars(state / "review", "wakes")), 20, "its clip")
        [wake] = payloads(sub, "kwsd/kitchen/wake")
        [side] = sidecars(state / "review", "wakes")
        assert side["sessionId"] == wake["sessionId"] and "segmentReason" not in side
        assert side["audioStart"] == pytest.approx(wake["start"] - 2.0, abs=0.001)
        assert side["duration"] == pytest.approx(wake["end"] - wake["start"] + 4.0, abs=0.05)
        assert not payloads(sub, "kwsd/kitchen/segment")
        [again] = detect(state / "review" / "wakes" / side["audio"], model_path)
        # The keyword sits 2 s into the clip, where the daemon heard it.
        assert again["start"] == pytest.approx(2.0, abs=0.1)
    finally:
        rc = daemon.terminate() if daemon.proc.poll() is None else daemon.proc.returncode
        sub.close()
    assert rc == 0


def test_reload_turns_the_archive_off_and_feedback_is_answered(
        broker: Broker, notify: NotifySocket, model_path: Path, audio_dir: Path, tmp_path: Path) -> None:
    pos = write_wav(tmp_path / "pos.wav", np.concatenate([read_wav(audio_dir / POSITIVE), silence(3.0)]))
    state, port = tmp_path / "state", free_port()
    sub = Subscriber(broker, "kwsd/#", "hermes/error/#")
    cfg = make_config(model_path, state, broker, [file_input(pos, "kitchen")], port)
    daemon = Running(cfg, tmp_path, notify)
    try:
        daemon.wait_for(lambda: any(s.get("audio") for s in sidecars(state / "review", "wakes")), 60, "the clip")
        [wake] = payloads(sub, "kwsd/kitchen/wake")
        cfg["review"] = {"enabled": False}
        (tmp_path / "kwsd.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(lambda: "configuration reloaded" in daemon.text(), 20, "the reload")
        sub.publish("kwsd/kitchen/feedback", json.dumps({"sessionId": wake["sessionId"], "verdict": "false_wake"}))
        wait_until(lambda: payloads(sub, "hermes/error/hotword"), 10, "the answer")
        assert "review archive is off" in payloads(sub, "hermes/error/hotword")[0]["error"]
        assert sidecars(state / "review", "wakes")[0]["verdict"] is None  # kept as it was, not deleted
    finally:
        rc = daemon.terminate() if daemon.proc.poll() is None else daemon.proc.returncode
        sub.close()
    assert rc == 0 and "Traceback" not in daemon.text()


def test_the_daemon_keeps_the_archive_in_its_bound_oldest_out_first(
        broker: Broker, notify: NotifySocket, model_path: Path, audio_dir: Path, tmp_path: Path) -> None:
    keyword = read_wav(audio_dir / POSITIVE)
    twice = write_wav(tmp_path / "twice.wav", np.concatenate([keyword, silence(2.0), keyword, silence(3.0)]))
    state, port = tmp_path / "state", free_port()
    review = state / "review"
    sub = Subscriber(broker, "kwsd/#", "hermes/error/#")
    # One wake's clip (about 4.6 s, 150 kB) fits in 200 kB, two do not.
    daemon = Running(make_config(model_path, state, broker, [file_input(twice, "kitchen")], port,
                                 review={"max_bytes": 200_000}), tmp_path, notify)
    try:
        daemon.wait_for(lambda: len(payloads(sub, "kwsd/kitchen/segment")) >= 2, 60, "both segments")
        first, second = (w["sessionId"] for w in payloads(sub, "kwsd/kitchen/wake"))
        daemon.wait_for(lambda: [s["sessionId"] for s in sidecars(review, "wakes")] == [second], 10,
                        "the first wake evicted")
        assert len(list((review / "wakes").glob("*.wav"))) == 1
        wait_until(lambda: scrape(port).get(("kwsd_review_bytes", (("kind", "wake"),)), 0) > 0, 10, "the gauge")
        assert scrape(port)[("kwsd_review_bytes", (("kind", "wake"),))] <= 200_000
        sub.publish("kwsd/kitchen/feedback", json.dumps({"sessionId": first, "verdict": "false_wake"}))
        wait_until(lambda: payloads(sub, "hermes/error/hotword"), 10, "the answer")
        assert "unknown sessionId" in payloads(sub, "hermes/error/hotword")[0]["error"]
    finally:
        rc = daemon.terminate() if daemon.proc.poll() is None else daemon.proc.returncode
        sub.close()
    assert rc == 0


def test_reload_of_the_review_settings_mid_segment_keeps_the_wake_whole(
        broker: Broker, notify: NotifySocket, model_path: Path, audio_dir: Path, tmp_path: Path) -> None:
    """SIGHUP with new review settings while a wake's segment is still being recorded: the segment so far (ended
    as ``stopped``) is kept with the wake, and the new archive, which read the folder when it started, takes
    verdicts on that wake."""
    pos = write_wav(tmp_path / "pos.wav", np.concatenate([read_wav(audio_dir / POSITIVE), silence(3.0)]))
    state, port = tmp_path / "state", free_port()
    review = state / "review"
    sub = Subscriber(broker, "kwsd/#", "hermes/error/#")
    cfg = make_config(model_path, state, broker, [dict(file_input(pos, "kitchen"), realtime=True)], port,
                      segments={"silence_timeout": 2.5, "max_length": 8.0})
    daemon = Running(cfg, tmp_path, notify)
    try:
        daemon.wait_for(lambda: payloads(sub, "kwsd/kitchen/wake"), 60, "the wake")
        assert not payloads(sub, "kwsd/kitchen/segment")  # still recording
        cfg["review"] = {"max_days": 10.0}
        (tmp_path / "kwsd.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(lambda: "configuration reloaded" in daemon.text(), 20, "the reload")
        [wake] = payloads(sub, "kwsd/kitchen/wake")
        daemon.wait_for(lambda: any(s.get("audio") for s in sidecars(review, "wakes")), 10, "the wake's audio")
        [side] = sidecars(review, "wakes")
        assert side["sessionId"] == wake["sessionId"] and side["segmentReason"] == "stopped"
        # The archive and the MQTT side are separate sinks: the segment message may reach the subscriber a moment
        # after the archive wrote the clip.
        daemon.wait_for(lambda: payloads(sub, "kwsd/kitchen/segment"), 10, "the segment message")
        assert [a["reason"] for a in payloads(sub, "kwsd/kitchen/segment")] == ["stopped"]
        sub.publish("kwsd/kitchen/feedback", json.dumps({"sessionId": wake["sessionId"], "verdict": "wake"}))
        daemon.wait_for(lambda: sidecars(review, "wakes")[0]["verdict"] == "wake", 10, "the verdict after reload")
        assert not payloads(sub, "hermes/error/hotword")
        assert daemon.text().count("near misses kept") == 2  # the first archive and the one the reload built
    finally:
        rc = daemon.terminate() if daemon.proc.poll() is None else daemon.proc.returncode
        sub.close()
    assert rc == 0 and "Traceback" not in daemon.text()
