"""The publisher against a real mosquitto: topics, toggles, outages and the outbox, TLS, fuzz, satellites."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kwsd.mqtt.messages import AudioFrame, HotwordError, SegmentAnnouncement, WakeEvent, to_wav
from kwsd.mqtt.publisher import Publisher
from kwsd.segments import Segment
from kwsd.settings import (
    ConfigError,
    MqttSettings,
    MqttTlsSettings,
    OutboxSettings,
    SatelliteSettings,
    from_dict,
)
from kwsd.toggles import ToggleState
from tests.fixtures_broker import Broker, Subscriber, TlsFiles, wait_until

pytestmark = pytest.mark.broker


def settings(broker: Broker, **kw: object) -> MqttSettings:
    base = dict(
        host="127.0.0.1", port=broker.port, client_id="kwsd-test", reconnect_min=0.1, reconnect_max=0.5
    )
    base.update(kw)
    return MqttSettings(**base)  # type: ignore[arg-type]


def wake(site: str, n: int) -> WakeEvent:
    return WakeEvent(
        site_id=site,
        wakeword_id="xiaoyun",
        keyword="小云小云",
        score=0.5 + n / 1000,
        threshold=0.2,
        start=float(n),
        end=n + 0.8,
        session_id=f"{site}-{n}",
        energy=-20.0,
        latency=250.0,
    )


def running(pub: Publisher) -> Publisher:
    pub.start()
    wait_until(lambda: pub.connected, 10, "publisher connected")
    return pub


def test_wake_reaches_native_hermes_and_home_assistant_topics(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker, "kwsd/#", "hermes/#", "homeassistant/#")
    pub = running(Publisher(settings(broker), tmp_path / "outbox", ["kitchen", "hall"]))
    try:
        event = wake("kitchen", 1)
        pub.publish_wake(event)
        [native] = sub.wait_for(1, "kwsd/kitchen/wake")
        assert WakeEvent.from_payload(native.payload) == event
        assert native.qos == 1 and not native.retain
        [hermes] = sub.wait_for(1, "hermes/hotword/xiaoyun/detected")
        h = json.loads(hermes.payload)
        assert (h["modelId"], h["siteId"], h["sessionId"]) == ("xiaoyun", "kitchen", "kitchen-1")
        assert h["currentSensitivity"] == pytest.approx(0.8)
        [ha] = sub.wait_for(1, "kwsd/kitchen/event")
        assert json.loads(ha.payload)["event_type"] == "detected"
        configs = sub.wait_for(2, "homeassistant/event/kwsd/")
        cfg = {m.topic: json.loads(m.payload) for m in configs}
        kitchen = cfg["homeassistant/event/kwsd/wake_kitchen/config"]
        assert kitchen["state_topic"] == "kwsd/kitchen/event" and kitchen["event_types"] == ["detected"]
        assert [m.payload for m in sub.wait_for(1, "kwsd/status")][-1] == b"online"
        wait_until(lambda: pub.outbox.depth == 0, 5, "outbox drained")
        assert pub.counters.published >= 3
        # Home Assistant restarts: discovery is announced again
        n_before = len(sub.wait_for(2, "homeassistant/event/kwsd/"))
        sub.publish("homeassistant/status", "online")
        sub.wait_for(n_before + 2, "homeassistant/event/kwsd/")
        # a site goes away: its discovery is withdrawn (empty retained payload) and its status goes offline
        pub.update_sites(["kitchen"])
        wait_until(
            lambda: any(m.topic.endswith("wake_hall/config") and m.payload == b"" for m in sub.messages),
            5,
            "hall discovery withdrawn",
        )
        wait_until(
            lambda: any(m.topic == "kwsd/hall/status" and m.payload == b"offline" for m in sub.messages)
        )
    finally:
        pub.stop()
        sub.close()
    assert [m.payload for m in sub.messages if m.topic == "kwsd/status"][-1:] in ([b"offline"], [b"online"])


def test_summary_is_retained_and_sent_only_when_it_changes(broker: Broker, tmp_path: Path) -> None:
    pub = running(Publisher(settings(broker), tmp_path / "outbox", ["kitchen"]))
    sub = Subscriber(broker, "kwsd/summary")
    try:
        pub.set_summary({"status": "CPU; 1 sites; 0 detections", "detections": {}})
        [first] = sub.wait_for(1, "kwsd/summary")
        assert json.loads(first.payload)["status"] == "CPU; 1 sites; 0 detections"
        pub.set_summary({"detections": {}, "status": "CPU; 1 sites; 0 detections"})  # the same figures
        pub.set_summary({"status": "CPU; 1 sites; 1 detections", "detections": {"kitchen": {"小云小云": 1}}})
        second = sub.wait_for(2, "kwsd/summary")[1]
        assert json.loads(second.payload)["detections"] == {"kitchen": {"小云小云": 1}}
        time.sleep(0.3)
        assert len(sub.wait_for(2, "kwsd/summary")) == 2
        late = Subscriber(broker, "kwsd/summary")  # a hub that connects later gets the last figures at once
        try:
            [kept] = late.wait_for(1, "kwsd/summary")
            assert kept.retain and kept.payload == second.payload
        finally:
            late.close()
    finally:
        pub.stop()
        sub.close()


def test_clean_stop_leaves_offline_retained(broker: Broker, tmp_path: Path) -> None:
    pub = running(Publisher(settings(broker), tmp_path / "outbox", ["a"]))
    pub.stop()
    late = Subscriber(broker, "kwsd/status", "kwsd/a/status")  # retained values
    wait_until(
        lambda: (
            {m.topic: m.payload for m in late.messages}
            == {"kwsd/status": b"offline", "kwsd/a/status": b"offline"}
        ),
        5,
    )
    late.close()


def test_toggle_off_needs_every_reason_back_on(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker, "hermes/error/#")
    toggles = ToggleState()
    seen: list[tuple[str, bool, str]] = []

    def on_toggle(site: str, enabled: bool, reason: str) -> None:
        seen.append((site, toggles.apply(site, enabled, reason), reason))

    pub = running(Publisher(settings(broker), tmp_path / "outbox", ["kitchen"], on_toggle=on_toggle))
    try:
        sub.publish("hermes/hotword/toggleOff", json.dumps({"siteId": "kitchen", "reason": "ttsSay"}))
        sub.publish(
            "hermes/hotword/toggleOff", json.dumps({"siteId": "kitchen", "reason": "dialogueSession"})
        )
        wait_until(lambda: len(seen) == 2, 5)
        assert not toggles.enabled("kitchen") and toggles.enabled("hall")
        sub.publish("hermes/hotword/toggleOn", json.dumps({"siteId": "kitchen", "reason": "ttsSay"}))
        wait_until(lambda: len(seen) == 3, 5)
        assert not toggles.enabled("kitchen")
        sub.publish("hermes/hotword/toggleOn", json.dumps({"siteId": "kitchen", "reason": "dialogueSession"}))
        wait_until(lambda: len(seen) == 4, 5)
        assert toggles.enabled("kitchen")
        assert seen == [
            ("kitchen", False, "ttsSay"),
            ("kitchen", False, "dialogueSession"),
            ("kitchen", False, "ttsSay"),
            ("kitchen", True, "dialogueSession"),
        ]
        sub.publish("hermes/hotword/toggleOff", b'{"siteId": 42}')
        [err] = sub.wait_for(1, "hermes/error/hotword")
        e = HotwordError.from_payload(err.payload)
        assert "siteId" in e.error and e.context == "hermes/hotword/toggleOff"
        assert toggles.enabled("kitchen") and len(seen) == 4
    finally:
        pub.stop()
        sub.close()


def _segment(site: str, n: int, seconds: float = 1.0) -> Segment:
    samples = (np.random.default_rng(n).standard_normal(int(16000 * seconds)) * 1000).astype(np.int16)
    return Segment(
        site=site,
        session_id=f"{site}-{n}",
        samples=samples,
        start_sample=16000 * n,
        keyword_start_sample=16000 * n + 4800,
        keyword_end_sample=16000 * n + 12000,
        reason="silence",
    )


def test_broker_outage_and_daemon_restart_deliver_in_order(broker: Broker, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    pub = running(Publisher(settings(broker), outbox, ["a"]))
    broker.stop()
    wait_until(lambda: not pub.connected, 10, "publisher noticed the outage")
    for n in range(5):
        pub.publish_wake(wake("a", n))
    pub.publish_segment(_segment("a", 5))
    wait_until(lambda: pub.outbox.depth == 5 * 3 + 2, 5, "the hand-over reached the outbox")
    pub.stop(timeout=0.5)  # daemon stops while the broker is down: the outbox stays on disk
    pub2 = Publisher(settings(broker), outbox, ["a"])
    assert pub2.outbox.depth == 17
    broker.start()
    sub = Subscriber(broker, "kwsd/a/#")
    running(pub2)
    for n in range(5, 8):
        pub2.publish_wake(wake("a", n))
    try:
        wakes = sub.wait_for(8, "kwsd/a/wake")
        assert [WakeEvent.from_payload(m.payload).session_id for m in wakes] == [f"a-{n}" for n in range(8)]
        [wav] = sub.wait_for(1, "kwsd/a/segment/a-5")
        assert wav.payload == _segment("a", 5).to_wav()
        [ann] = [m for m in sub.wait_for(1, "kwsd/a/segment") if m.topic == "kwsd/a/segment"]
        a = SegmentAnnouncement.from_payload(ann.payload)
        assert (a.topic, a.size, a.duration, a.pre_roll) == ("kwsd/a/segment/a-5", len(wav.payload), 1.0, 0.3)
        wait_until(lambda: pub2.outbox.depth == 0, 5, "outbox drained")
        # broker restart while connected: the publisher reconnects by itself
        broker.restart()
        wait_until(lambda: pub2.counters.reconnects >= 1 and pub2.connected, 15, "reconnected")
        pub2.publish_wake(wake("a", 99))
        assert WakeEvent.from_payload(bytes(sub.wait_for(1, "kwsd/a/wake", 1)[-1].payload)).session_id in {
            "a-7",
            "a-99",
        }
        sub.close()
        sub = Subscriber(broker, "kwsd/a/wake")
        pub2.publish_wake(wake("a", 100))
        sub.wait_for(1, "kwsd/a/wake")
    finally:
        pub2.stop()
        sub.close()


def test_outbox_bound_drops_segments_before_events(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker.stop()
    s = settings(broker, hermes=False, outbox=OutboxSettings(max_bytes=150_000))
    s = dataclasses.replace(s, home_assistant=dataclasses.replace(s.home_assistant, enabled=False))
    pub = Publisher(s, tmp_path / "outbox", ["a"])
    pub.start()
    with caplog.at_level(logging.WARNING, logger="kwsd.mqtt.outbox"):
        pub.publish_segment(_segment("a", 1, 2.0))  # 64 kB WAV
        pub.publish_wake(wake("a", 1))
        pub.publish_segment(_segment("a", 2, 2.0))
        pub.publish_wake(wake("a", 2))
        pub.publish_segment(_segment("a", 3, 2.0))  # no room: the oldest segment goes
        pub.publish_wake(wake("a", 3))
        wait_until(lambda: pub.counters.pending == 0, 5, "the hand-over reached the outbox")
    assert pub.counters.dropped == 1
    assert "dropped oldest segment on kwsd/a/segment/a-1" in caplog.text
    broker.start()
    sub = Subscriber(broker, "kwsd/a/#")
    wait_until(lambda: pub.connected, 10)
    try:
        sub.wait_for(3, "kwsd/a/wake")
        topics = [m.topic for m in sub.wait_for(9, "kwsd/a/")]
        assert "kwsd/a/segment/a-1" not in topics
        assert "kwsd/a/segment/a-2" in topics and "kwsd/a/segment/a-3" in topics
    finally:
        pub.stop()
        sub.close()


def test_tls_with_password(tls_broker: Broker, tls_files: TlsFiles, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    s = settings(tls_broker, username="kwsd", password_file=pw, tls=MqttTlsSettings(ca_file=tls_files.ca))
    sub = Subscriber(tls_broker, "kwsd/#", username="kwsd", password="s3cret", ca=str(tls_files.ca))
    pub = running(Publisher(s, tmp_path / "outbox", ["a"]))
    try:
        pub.publish_wake(wake("a", 1))
        assert WakeEvent.from_payload(sub.wait_for(1, "kwsd/a/wake")[0].payload).session_id == "a-1"
    finally:
        pub.stop()
        sub.close()


def test_refused_credentials_and_bad_ca_are_reported_and_retried(
    tls_broker: Broker,
    tls_files: TlsFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tls = MqttTlsSettings(ca_file=tls_files.ca)
    with caplog.at_level(logging.ERROR, logger="kwsd.mqtt.connection"):
        pub = Publisher(
            settings(tls_broker, username="kwsd", password="wrong", tls=tls), tmp_path / "o1", ["a"]
        )
        pub.start()
        wait_until(lambda: "refused" in pub.state, 10, "credentials refused")
        assert "mqtt.username='kwsd'" in pub.state and "mqtt.password" in pub.state
        time.sleep(0.5)
        assert pub.counters.reconnects == 0 and pub.alive
        pub.publish_wake(wake("a", 1))  # kept for later
        pub.stop(timeout=0.2)
        assert caplog.text.count("refused") == 1  # the same error is not logged on every retry

        wrong_ca = MqttTlsSettings(ca_file=tls_files.client_cert)  # not the CA that signed the broker
        pub = Publisher(
            settings(tls_broker, username="kwsd", password="s3cret", tls=wrong_ca), tmp_path / "o2", ["a"]
        )
        pub.start()
        wait_until(lambda: "TLS verification" in pub.state, 10)
        assert "mqtt.tls.ca_file" in pub.state
        pub.stop(timeout=0.2)

        garbage = tmp_path / "garbage.pem"
        garbage.write_text("not a certificate")
        pub = Publisher(settings(tls_broker, tls=MqttTlsSettings(ca_file=garbage)), tmp_path / "o3", ["a"])
        pub.start()
        wait_until(lambda: "mqtt.tls.ca_file" in pub.state, 10)
        pub.stop(timeout=0.2)
    with pytest.raises(ConfigError, match=r"^mqtt\.tls\.ca_file: file not found"):
        from_dict(MqttSettings, {"tls": {"ca_file": str(tmp_path / "missing.pem")}}, "mqtt")
    with pytest.raises(ConfigError, match=r"^mqtt\.tls\.key_file: required"):
        from_dict(MqttSettings, {"tls": {"cert_file": str(tls_files.client_cert)}}, "mqtt")


def test_satellite_audio_from_two_sites_at_different_rates(broker: Broker, tmp_path: Path) -> None:
    s = settings(broker, satellites=SatelliteSettings(enabled=True, sites=("sat1", "sat2")))
    got: dict[str, list[np.ndarray]] = {"sat1": [], "sat2": []}
    rates: dict[str, set[int]] = {"sat1": set(), "sat2": set()}

    def audio(site: str, samples: np.ndarray, rate: int) -> None:
        got[site].append(samples)
        rates[site].add(rate)

    pub = running(Publisher(s, tmp_path / "outbox", [], satellite_audio=audio))
    sub = Subscriber(broker, "hermes/error/#")
    try:
        t48 = np.arange(48000 // 50) / 48000
        t22 = np.arange(22050 // 50) / 22050
        for i in range(25):  # 0.5 s each
            phase = i / 50
            left = (6000 * np.sin(2 * np.pi * 300 * (t48 + phase))).astype(np.int16)
            sub.publish(AudioFrame.topic("sat1"), to_wav(np.stack([left, left], 1).reshape(-1), 48000, 2))
            mono = (6000 * np.sin(2 * np.pi * 500 * (t22 + phase))).astype(np.int16)
            sub.publish(AudioFrame.topic("sat2"), to_wav(mono, 22050))
        sub.publish(AudioFrame.topic("sat3"), to_wav(np.zeros(320, np.int16)))  # not accepted: ignored
        wait_until(lambda: len(got["sat1"]) == 25 and len(got["sat2"]) == 25, 10, "all frames")
        assert rates == {"sat1": {48000}, "sat2": {22050}}  # resampling is the audio hub's job
        for site, hz, rate in (("sat1", 300, 48000), ("sat2", 500, 22050)):
            audio = np.concatenate(got[site])
            assert audio.dtype == np.int16 and audio.ndim == 1 and len(audio) == 25 * (rate // 50)
            spec = np.abs(np.fft.rfft(audio[: rate // 2].astype(float)))
            assert abs(np.argmax(spec) * 2 - hz) <= 2
        sub.publish(AudioFrame.topic("sat1"), b"not a wav at all")
        [err] = sub.wait_for(1, "hermes/error/hotword")
        assert json.loads(err.payload)["siteId"] == "sat1"
    finally:
        pub.stop()
        sub.close()


def test_random_payloads_on_every_subscribed_topic(broker: Broker, tmp_path: Path) -> None:
    s = settings(broker, satellites=SatelliteSettings(enabled=True, max_frame_bytes=100_000))
    audio: list[str] = []
    toggles: list[tuple[str, bool, str]] = []
    pub = Publisher(
        s,
        tmp_path / "outbox",
        ["a"],
        on_toggle=lambda site, enabled, reason: toggles.append((site, enabled, reason)),
        satellite_audio=lambda site, samples, rate: audio.append(site),
    )
    running(pub)
    fuzz = Subscriber(broker, "kwsd/a/wake")
    rng = random.Random(1234)
    topics = [
        "hermes/hotword/toggleOn",
        "hermes/hotword/toggleOff",
        "homeassistant/status",
        "hermes/audioServer/x/audioFrame",
        "hermes/audioServer/y/audioFrame",
    ]
    json_values: list[object] = [
        None,
        True,
        1,
        -1.5,
        "x",
        [],
        {},
        {"siteId": None},
        {"siteId": []},
        {"siteId": "a", "reason": {"x": 1}},
        [{"siteId": "a"}],
        "online",
        1e308,
    ]
    sent = 0
    try:
        for i in range(300):
            topic = rng.choice(topics)
            kind = i % 5
            if kind == 0:
                payload = rng.randbytes(rng.randrange(0, 2000))
            elif kind == 1:
                payload = json.dumps(rng.choice(json_values)).encode()
            elif kind == 2:
                payload = b"RIFF" + rng.randbytes(4) + b"WAVE" + rng.randbytes(rng.randrange(0, 200))
            elif kind == 3:
                wav = bytearray(
                    to_wav(np.zeros(rng.randrange(0, 400), np.int16), rng.choice([8000, 16000, 44100]))
                )
                for _ in range(3):
                    wav[rng.randrange(len(wav))] = rng.randrange(256)
                payload = bytes(wav)
            else:
                payload = rng.randbytes(rng.choice([10, 300_000, 2_000_000]))
            fuzz.client.publish(topic, payload, qos=rng.choice([0, 1]))
            sent += 1
        fuzz.publish("hermes/hotword/toggleOff", json.dumps({"siteId": "a", "reason": "z"}))
        wait_until(lambda: ("a", False, "z") in toggles, 20, "toggle after the fuzz")
        assert pub.alive and pub.connected
        assert pub.counters.inbound_errors > 100
        pub.publish_wake(wake("a", 7))
        assert WakeEvent.from_payload(bytes(fuzz.wait_for(1, "kwsd/a/wake")[0].payload)).session_id == "a-7"
    finally:
        pub.stop()
        fuzz.close()
    assert sent == 300


def test_publisher_threads_stop(broker: Broker, tmp_path: Path) -> None:
    stop = threading.Event()
    pub = running(Publisher(settings(broker), tmp_path / "outbox", ["a"], stop=stop))
    thread = pub.connection._thread
    assert thread is not None
    stop.set()  # the supervisor's stop event ends the loop too (seen within one idle tick)
    thread.join(pub.connection.tick + 3)
    assert not thread.is_alive()
    pub.stop()


def test_killed_daemon_goes_offline_through_the_last_will(broker: Broker, tmp_path: Path) -> None:
    code = f"""
import sys, time, threading
from pathlib import Path
from kwsd.mqtt.publisher import Publisher
from kwsd.settings import MqttSettings
pub = Publisher(MqttSettings(port={broker.port}, client_id="k9"), Path({str(tmp_path / "o")!r}), ["a"])
pub.start()
for _ in range(500):
    if pub.connected:
        break
    time.sleep(0.01)
print("connected" if pub.connected else "not connected", flush=True)
time.sleep(30)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"connected"
        sub = Subscriber(broker, "kwsd/status")
        wait_until(lambda: [m.payload for m in sub.messages] == [b"online"], 5, "retained online")
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        wait_until(lambda: [m.payload for m in sub.messages] == [b"online", b"offline"], 5, "Last Will")
        sub.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_satellite_site_ids_are_checked_and_get_no_entity_until_announced(broker: Broker, tmp_path: Path) -> None:
    s = settings(broker, satellites=SatelliteSettings(enabled=True))
    heard: list[tuple[str, int]] = []
    pub = running(
        Publisher(s, tmp_path / "outbox", ["a"], satellite_audio=lambda site, x, rate: heard.append((site, rate)))
    )
    sub = Subscriber(broker, "hermes/error/#", "homeassistant/#")
    frame = to_wav(np.zeros(320, np.int16), 16000)
    try:
        for site in ("s" * 65, "a b ", "zero\u200bwidth"):
            sub.publish(AudioFrame.topic(site), frame)
        sub.publish(AudioFrame.topic("卧室"), frame)
        wait_until(lambda: heard == [("卧室", 16000)], 5, "the good satellite's frame")
        errors = [HotwordError.from_payload(m.payload) for m in sub.wait_for(3, "hermes/error/hotword")]
        assert "longer than 64" in errors[0].error and errors[0].site_id == "default"
        assert all("siteId" in e.error for e in errors)
        # a satellite gets its Home Assistant entity only once the daemon names it
        assert not [m for m in sub.messages if "wake_" in m.topic and "wake_a" not in m.topic]
        pub.update_sites(["a", "卧室"])
        sub.wait_for(1, "homeassistant/event/kwsd/wake___/config")
    finally:
        pub.stop()
        sub.close()
