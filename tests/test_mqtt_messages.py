"""Wire messages: round trips, strict validation of inbound payloads, audio frame conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kwsd.mqtt.messages import (
    AudioFrame,
    HaEventDiscovery,
    HotwordDetected,
    HotwordError,
    HotwordToggle,
    MessageError,
    SegmentAnnouncement,
    WakeEvent,
    ha_event_payload,
    to_wav,
)

WAKE = WakeEvent(
    site_id="kitchen",
    wakeword_id="小云小云",
    keyword="小云小云",
    score=0.71,
    threshold=0.2,
    start=12.34,
    end=13.1,
    session_id="s-1",
    device="USB Mic",
    energy=-23.5,
    latency=260.0,
)


def test_wake_event_round_trip_and_keys() -> None:
    payload = WAKE.to_payload()
    assert WakeEvent.from_payload(payload) == WAKE
    data = json.loads(payload)
    assert set(data) == {
        "siteId",
        "wakewordId",
        "keyword",
        "score",
        "threshold",
        "start",
        "end",
        "timestamp",
        "sessionId",
        "device",
        "energy",
        "latency",
    }
    assert data["timestamp"].endswith("Z") and data["keyword"] == "小云小云"
    assert WakeEvent.topic("kwsd", "kitchen") == "kwsd/kitchen/wake"


@pytest.mark.parametrize(
    "payload, problem",
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"siteId": 3}', "'siteId' must be a string"),
        (b'{"siteId": "a", "wakewordId": "w", "keyword": "k", "score": "high"}', "'score' must be a number"),
        (b'{"siteId": "a", "wakewordId": "w", "keyword": "k", "score": true}', "'score' must be a number"),
        (b'{"siteId": "a"}', "'wakewordId' is missing"),
    ],
)
def test_wake_event_rejects_malformed(payload: bytes, problem: str) -> None:
    with pytest.raises(MessageError, match=problem):
        WakeEvent.from_payload(payload)


def test_hermes_messages_round_trip() -> None:
    detected = HotwordDetected(
        model_id="xiaoyun", site_id="kitchen", session_id="s-1", current_sensitivity=0.8
    )
    assert HotwordDetected.from_payload(detected.to_payload()) == detected
    assert set(json.loads(detected.to_payload())) == {
        "modelId",
        "modelVersion",
        "modelType",
        "currentSensitivity",
        "siteId",
        "sessionId",
        "sendAudioCaptured",
        "lang",
        "customEntities",
    }
    assert HotwordDetected.topic("xiaoyun") == "hermes/hotword/xiaoyun/detected"
    off = HotwordToggle(enabled=False, site_id="kitchen", reason="ttsSay")
    assert off.topic() == "hermes/hotword/toggleOff"
    assert HotwordToggle.from_payload(off.to_payload(), enabled=False) == off
    assert HotwordToggle.from_payload(b"{}", enabled=True) == HotwordToggle(enabled=True)
    with pytest.raises(MessageError, match="'reason' must be a string"):
        HotwordToggle.from_payload(b'{"siteId": "a", "reason": 5}', enabled=True)
    err = HotwordError(error="bad", context="hermes/hotword/toggleOn", site_id="a")
    assert HotwordError.from_payload(err.to_payload()) == err


def test_segment_announcement_round_trip() -> None:
    ann = SegmentAnnouncement(
        site_id="a",
        session_id="s",
        topic="kwsd/a/segment/s",
        start=1.0,
        duration=2.5,
        pre_roll=0.3,
        reason="silence",
        size=80044,
    )
    assert SegmentAnnouncement.from_payload(ann.to_payload()) == ann
    with pytest.raises(MessageError, match="unknown value"):
        SegmentAnnouncement.from_payload(ann.to_payload().replace(b"silence", b"bored"))


def test_home_assistant_discovery_and_event() -> None:
    d = HaEventDiscovery(
        "homeassistant",
        "kwsd",
        "living room",
        "kwsd/living room/event",
        ("kwsd/status", "kwsd/living room/status"),
        "0.1.0",
    )
    assert d.topic() == "homeassistant/event/kwsd/wake_living_room/config"
    cfg = json.loads(d.to_payload())
    assert cfg["event_types"] == ["detected"]
    assert cfg["state_topic"] == "kwsd/living room/event"
    assert [a["topic"] for a in cfg["availability"]] == ["kwsd/status", "kwsd/living room/status"]
    assert cfg["device"]["identifiers"] == ["kwsd"] and cfg["unique_id"] == "kwsd_wake_living_room"
    event = json.loads(ha_event_payload(WAKE))
    assert event["event_type"] == "detected" and event["sessionId"] == "s-1"


def _tone(rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    return np.repeat(mono[:, None], channels, axis=1).reshape(-1)


@pytest.mark.parametrize("rate, channels", [(16000, 1), (48000, 2), (44100, 1), (8000, 2), (22050, 6)])
def test_audio_frame_any_rate_to_16k_mono(rate: int, channels: int) -> None:
    frame = AudioFrame.from_payload(to_wav(_tone(rate, 0.5, channels), rate, channels), site_id="sat")
    samples = frame.samples()
    assert samples.dtype == np.int16
    assert abs(len(samples) - 8000) <= 1
    spectrum = np.abs(np.fft.rfft(samples[1000:7000].astype(float)))
    peak_hz = np.argmax(spectrum) * 16000 / 6000
    assert abs(peak_hz - 440) < 5
    assert 7000 < np.abs(samples[1000:7000]).max() < 8500


def test_audio_frame_validation() -> None:
    with pytest.raises(MessageError, match="not a RIFF/WAVE"):
        AudioFrame.from_payload(b"\x00" * 100)
    with pytest.raises(MessageError, match="not a RIFF/WAVE"):
        AudioFrame.from_payload(b"RIFF")
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(1)
        wf.setframerate(16000)
        wf.writeframes(b"\x80" * 320)
    with pytest.raises(MessageError, match="sample width 8 bits"):
        AudioFrame.from_payload(buf.getvalue())
    big = to_wav(np.zeros(200000, dtype=np.int16))
    with pytest.raises(MessageError, match="exceeds the limit"):
        AudioFrame.from_payload(big, max_bytes=262144)
    truncated = to_wav(np.zeros(1000, dtype=np.int16))[:60]
    with pytest.raises(MessageError, match="header claims 1000 frames"):
        AudioFrame.from_payload(truncated)
    with pytest.raises(MessageError):
        AudioFrame.from_payload(b"RIFF\x00\x00\x00\x00WAVEfmt " + b"\x00" * 40)
