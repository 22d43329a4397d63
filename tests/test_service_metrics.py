"""Prometheus metrics scraped over real HTTP on loopback; the status-topic summary."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kwsd import __version__
from kwsd import settings as settings_mod
from kwsd.audio.hub import AudioHub, RemoteLimits
from kwsd.audio.wavfile import read_wav
from kwsd.kws.detector import Detector
from kwsd.kws.session import ModelSession
from kwsd.metrics import Metrics
from kwsd.pipeline import Parts, Pipeline
from kwsd.segments import SegmentRecorder
from kwsd.settings import MetricsSettings, Settings


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _record(m: Metrics) -> None:
    m.detection("kitchen", "小云小云")
    m.detection("kitchen", "小云小云")
    m.detection("hall", "小云小云")
    m.rejection("hall", "小云小云")
    m.overrun("usb-mic", 3)
    m.reopen("usb-mic")
    m.broker_reconnect()
    m.set_outbox_depth(7)
    for seconds in (0.0015, 0.004, 0.012, 0.18):
        m.observe_step(seconds)
    m.set_real_time_factor(0.031)
    m.set_streams(2)


def test_endpoint_over_loopback() -> None:
    m = Metrics()
    _record(m)
    address, port = m.serve("127.0.0.1", 0)
    try:
        assert address == "127.0.0.1" and port > 0
        got = _scrape(port)
        kw = "小云小云"
        assert got[("kwsd_detections_total", (("keyword", kw), ("site", "kitchen")))] == 2
        assert got[("kwsd_detections_total", (("keyword", kw), ("site", "hall")))] == 1
        assert got[("kwsd_rejected_candidates_total", (("keyword", kw), ("site", "hall")))] == 1
        assert got[("kwsd_audio_overruns_total", (("input", "usb-mic"),))] == 3
        assert got[("kwsd_device_reopens_total", (("input", "usb-mic"),))] == 1
        assert got[("kwsd_broker_reconnects_total", ())] == 1
        assert got[("kwsd_outbox_depth", ())] == 7
        assert got[("kwsd_real_time_factor", ())] == pytest.approx(0.031)
        assert got[("kwsd_streams", ())] == 2
        assert got[("kwsd_inference_step_seconds_count", ())] == 4
        assert got[("kwsd_inference_step_seconds_bucket", (("le", "0.002"),))] == 1
        assert got[("kwsd_inference_step_seconds_bucket", (("le", "0.015"),))] == 3
        assert got[("kwsd_inference_step_seconds_bucket", (("le", "0.2"),))] == 4
        # Values change between scrapes: the endpoint reads the live registry.
        m.detection("kitchen", kw)
        assert _scrape(port)[("kwsd_detections_total", (("keyword", kw), ("site", "kitchen")))] == 3
    finally:
        m.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    m.close()  # twice is fine


def test_instances_do_not_share_a_registry() -> None:
    """Tests and a reload create Metrics more than once; the global registry would refuse duplicates."""
    a, b = Metrics(), Metrics()
    a.detection("s", "k")
    assert a.summary()["detections"] == {"s": {"k": 1}}
    assert b.summary()["detections"] == {}


def test_summary_for_the_status_topic() -> None:
    m = Metrics()
    assert m.summary() == {
        "detections": {},
        "rejected": {},
        "overruns": {},
        "reopens": {},
        "broker_reconnects": 0,
        "outbox_depth": 0,
        "inference_step": {"count": 0, "mean_ms": None},
        "real_time_factor": 0.0,
        "streams": 0,
    }
    _record(m)
    assert m.summary() == {
        "detections": {"kitchen": {"小云小云": 2}, "hall": {"小云小云": 1}},
        "rejected": {"hall": {"小云小云": 1}},
        "overruns": {"usb-mic": 3},
        "reopens": {"usb-mic": 1},
        "broker_reconnects": 1,
        "outbox_depth": 7,
        "inference_step": {"count": 4, "mean_ms": 49.375},
        "real_time_factor": 0.031,
        "streams": 2,
    }


def test_port_in_use_names_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        m = Metrics()
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            m.serve("127.0.0.1", port)
        m.close()


def test_defaults_are_off_and_local() -> None:
    defaults = MetricsSettings()
    assert defaults.enabled is False
    assert defaults.address == "127.0.0.1"
    assert defaults.port == 9750


def test_pipeline_counts_rejections_under_their_wakeword_id(model_path: Path, positives: list[Path]) -> None:
    """The pipeline feeds ``rejected_candidates`` per keyword, labelled with the wake word id (not the phrase, not
    a catch-all), each rejection counted once however many passes it takes."""
    cfg = settings_mod.from_dict(Settings, {
        "model": {"path": str(model_path), "providers": ["CPUExecutionProvider"]},
        # Every 小云小云 in a recording is far shorter than 3 s: each candidate is rejected for its duration.
        "detector": {"keywords": [{"phrase": "小云小云", "id": "hey-xiaoyun", "min_duration": 3.0, "max_duration": 4.0},
                                  {"phrase": "你好", "id": "hello"}]},
        "mqtt": {"enabled": False},
    })
    session = ModelSession(cfg.model.path, cfg.model.providers, 1, cfg.model.max_batch)
    hub = AudioHub((), threading.Event(), remote_limits=RemoteLimits(buffer_seconds=30.0, max_speed=1000.0))
    metrics = Metrics()
    pipeline = Pipeline(hub, Parts(session, Detector(session, cfg.detector), SegmentRecorder(cfg.segments)),
                        metrics=metrics)
    hall = hub.remote("hall", "test")
    silence = np.zeros(16000, dtype=np.int16)
    for path in positives[:2]:  # a pass per recording: each adds only what is new since the last
        hall.write(np.concatenate([read_wav(path).astype(np.int16), silence]), 16000)
        pipeline.run_once()
    counts = pipeline.detector.rejected("hall")
    assert counts["hey-xiaoyun"] >= 2 and pipeline.detections == 0, counts
    assert metrics.summary()["rejected"] == {"hall": {k: n for k, n in counts.items() if n}}
    # The stream restarts (its device was reopened): its decoder counts from zero again, and the metric goes on
    # adding the new rejections instead of waiting until they pass the old total.
    before = counts["hey-xiaoyun"]
    pipeline.sites["hall"].reset(pipeline.detector, pipeline.sites["hall"].next_sample)
    hall.write(np.concatenate([read_wav(positives[0]).astype(np.int16), silence]), 16000)
    pipeline.run_once()
    again = pipeline.detector.rejected("hall")["hey-xiaoyun"]
    assert 0 < again < before + 1
    assert metrics.summary()["rejected"]["hall"]["hey-xiaoyun"] == before + again


def test_process_build_and_health_metrics_are_exposed() -> None:
    """What an operator needs to see what is down: process figures, the build, the broker and each input."""
    m = Metrics()
    connected = [False]
    m.read_broker_connected(lambda: connected[0])
    m.set_input_up("usb-mic", False)
    m.observe_wake_latency(0.31)
    m.add_published(5)
    m.add_dropped(1)
    _, port = m.serve("127.0.0.1", 0)
    try:
        got = _scrape(port)
        assert got[("kwsd_broker_connected", ())] == 0
        assert got[("kwsd_input_up", (("input", "usb-mic"),))] == 0
        assert got[("kwsd_wake_latency_seconds_bucket", (("le", "0.35"),))] == 1
        assert got[("kwsd_wake_latency_seconds_bucket", (("le", "0.3"),))] == 0
        assert got[("kwsd_published_messages_total", ())] == 5
        assert got[("kwsd_dropped_messages_total", ())] == 1
        assert got[("process_resident_memory_bytes", ())] > 10e6
        assert got[("process_cpu_seconds_total", ())] > 0
        assert [k for k in got if k[0] == "kwsd_build_info" and ("version", __version__) in k[1]]
        connected[0] = True
        m.set_input_up("usb-mic", True)
        got = _scrape(port)
        assert got[("kwsd_broker_connected", ())] == 1
        assert got[("kwsd_input_up", (("input", "usb-mic"),))] == 1
    finally:
        m.close()
