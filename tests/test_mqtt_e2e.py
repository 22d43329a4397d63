"""MQTT end to end through the real daemon: ``python -m kwsd run`` with file inputs and a real mosquitto.

Wake, Hermes, Home Assistant and segment messages from a replayed recording; TLS with a password; Hermes
toggleOff/toggleOn; wakes detected while the broker is down surviving a daemon restart in the outbox; and remote
satellites streaming Hermes audioFrames.
"""

from __future__ import annotations

import json
import threading
import time
import wave
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from scipy.signal import resample_poly

from kwsd.audio.wavfile import read_wav
from kwsd.mqtt.messages import AudioFrame, to_wav
from tests.fixtures_broker import Broker, Subscriber, TlsFiles, wait_until
from tests.fixtures_daemon import Kwsd

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parent.parent
RATE = 16000
# The keyword in this recording is at about 5.9-6.7 s.
POSITIVE = "positive/20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_15.wav"


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples).astype("<i2").tobytes())
    return path


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.float32)


def config(model_path: Path, state: Path, inputs: list[dict], **mqtt_settings: object) -> dict:
    return {
        "model": {"path": str(model_path), "providers": ["CPUExecutionProvider"]},
        "inputs": inputs,
        "mqtt": {"host": "127.0.0.1", "reconnect_min": 0.2, "reconnect_max": 1.0, **mqtt_settings},
        "segments": {"silence_timeout": 0.7, "max_length": 8.0},
        "service": {"state_dir": str(state), "status_interval": 1.0},
    }


def file_input(path: Path, site: str, realtime: bool = False) -> dict:
    return {"device": str(path), "kind": "file", "realtime": realtime, "sites": {0: site}}


def payloads(sub: Subscriber, topic: str) -> list[dict]:
    return [json.loads(m.payload) for m in list(sub.messages) if m.topic == topic]


# ---------------------------------------------------------------------------------------------------------------


def test_wake_segment_hermes_and_discovery_from_a_replayed_recording(
        broker: Broker, model_path: Path, audio_dir: Path, negatives: list[Path], tmp_path: Path) -> None:
    pos = write_wav(tmp_path / "pos.wav", np.concatenate([read_wav(audio_dir / POSITIVE), silence(3.0)]))
    neg = write_wav(tmp_path / "neg.wav", np.concatenate([read_wav(negatives[0]), silence(3.0)]))
    sub = Subscriber(broker, "kwsd/#", "hermes/#", "homeassistant/#")
    cfg = config(model_path, tmp_path / "state", [file_input(pos, "kitchen"), file_input(neg, "hall")],
                 port=broker.port)
    daemon = Kwsd(cfg, tmp_path)
    try:
        daemon.wait_for(lambda: payloads(sub, "kwsd/kitchen/segment"), 30, "the kitchen segment")
        [wake] = payloads(sub, "kwsd/kitchen/wake")
        assert wake["siteId"] == "kitchen" and wake["keyword"] == "小云小云" and wake["score"] >= wake["threshold"]
        assert 5.0 < wake["start"] < wake["end"] < 7.5, wake

        # The segment: pre-roll before the keyword's start, ends after its end, the WAV matches the announcement.
        [ann] = payloads(sub, "kwsd/kitchen/segment")
        assert ann["sessionId"] == wake["sessionId"] and ann["topic"] == f"kwsd/kitchen/segment/{wake['sessionId']}"
        assert ann["start"] < wake["start"] and ann["start"] + ann["duration"] > wake["end"], (ann, wake)
        assert ann["preRoll"] == pytest.approx(wake["start"] - ann["start"], abs=0.02)
        [wav] = [m.payload for m in sub.messages if m.topic == ann["topic"]]
        assert wav[:4] == b"RIFF" and len(wav) == ann["size"]
        assert (len(wav) - 44) / 2 / RATE == pytest.approx(ann["duration"], abs=0.02)

        # Hermes: every documented field.
        [hermes] = [json.loads(m.payload) for m in sub.messages if m.topic.startswith("hermes/hotword/")]
        assert [m.topic for m in sub.messages if m.topic.startswith("hermes/hotword/")] == [
            f"hermes/hotword/{wake['wakewordId']}/detected"]
        assert set(hermes) == {"modelId", "modelVersion", "modelType", "currentSensitivity", "siteId", "sessionId",
                               "sendAudioCaptured", "lang", "customEntities"}
        assert (hermes["modelId"], hermes["siteId"], hermes["sessionId"]) == (
            wake["wakewordId"], "kitchen", wake["sessionId"])
        assert hermes["currentSensitivity"] == pytest.approx(1 - wake["threshold"])

        # Home Assistant: one event entity per site, with device info and availability.
        wait_until(lambda: len(payloads(sub, "homeassistant/event/kwsd/wake_hall/config")) >= 1, 5, "discovery")
        disc = payloads(sub, "homeassistant/event/kwsd/wake_kitchen/config")[-1]
        assert disc["event_types"] == ["detected"] and disc["state_topic"] == "kwsd/kitchen/event"
        assert disc["device"]["identifiers"] == ["kwsd"] and disc["device"]["name"]
        assert {a["topic"] for a in disc["availability"]} == {"kwsd/status", "kwsd/kitchen/status"}
        assert payloads(sub, "kwsd/kitchen/event")[0]["event_type"] == "detected"

        # The negative on the other site: the daemon read it all and heard nothing there.
        daemon.wait_log("input " + str(neg) + ": finished")
        time.sleep(0.5)
        assert not payloads(sub, "kwsd/hall/wake")
        assert daemon.text().count("wake:") == 1
        assert daemon.terminate() == 0
        wait_until(lambda: any(m.topic == "kwsd/status" and m.payload == b"offline" for m in sub.messages), 5)
    finally:
        daemon.kill()
        sub.close()


def test_wake_over_tls_with_a_password(tls_broker: Broker, tls_files: TlsFiles, model_path: Path, audio_dir: Path,
                                       tmp_path: Path) -> None:
    pos = write_wav(tmp_path / "pos.wav", np.concatenate([read_wav(audio_dir / POSITIVE), silence(2.0)]))
    (tmp_path / "pw").write_text("s3cret\n")
    sub = Subscriber(tls_broker, "kwsd/#", username="kwsd", password="s3cret", ca=str(tls_files.ca))
    cfg = config(model_path, tmp_path / "state", [file_input(pos, "study")], port=tls_broker.port,
                 username="kwsd", password_file=str(tmp_path / "pw"), tls={"ca_file": str(tls_files.ca)})
    daemon = Kwsd(cfg, tmp_path)
    try:
        daemon.wait_for(lambda: payloads(sub, "kwsd/study/wake"), 30, "the wake over TLS")
        daemon.wait_log("input " + str(pos) + ": finished")
        time.sleep(0.3)
        [wake] = payloads(sub, "kwsd/study/wake")
        assert wake["siteId"] == "study" and 5.0 < wake["start"] < 7.5
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
        sub.close()


def test_toggle_off_stops_detection_until_toggle_on(broker: Broker, model_path: Path, audio_dir: Path,
                                                    tmp_path: Path) -> None:
    # Real-time replay: 3 s silence, the keyword (~4.4 s), 3 s silence, the keyword again (~10.9 s), 1.5 s.
    clip = read_wav(audio_dir / POSITIVE)[int(4.5 * RATE):int(8.0 * RATE)]
    audio = np.concatenate([silence(3.0), clip, silence(3.0), clip, silence(1.5)])
    path = write_wav(tmp_path / "twice.wav", audio)
    sub = Subscriber(broker, "kwsd/#", "hermes/hotword/#")
    daemon = Kwsd(config(model_path, tmp_path / "state", [file_input(path, "den", realtime=True)],
                         port=broker.port), tmp_path)
    try:
        daemon.wait_for(lambda: any(m.topic == "kwsd/den/status" and m.payload == b"online" for m in sub.messages),
                        20, "den online")
        sub.publish("hermes/hotword/toggleOff", json.dumps({"siteId": "den", "reason": "test"}))
        daemon.wait_log("site den: detection off")
        assert "input " + str(path) + ": finished" not in daemon.text()
        daemon.wait_log("ignored: detection toggled off", timeout=10)
        assert not payloads(sub, "kwsd/den/wake")
        sub.publish("hermes/hotword/toggleOn", json.dumps({"siteId": "den", "reason": "test"}))
        daemon.wait_log("site den: detection on")
        daemon.wait_for(lambda: payloads(sub, "kwsd/den/wake"), 15, "the second keyword's wake")
        [wake] = payloads(sub, "kwsd/den/wake")
        assert wake["start"] > 9.0, wake  # the second keyword, not the first
        assert len([m for m in sub.messages if m.topic.startswith("hermes/hotword/")
                    and m.topic.endswith("/detected")]) == 1
    finally:
        daemon.kill()
        sub.close()


class PersistentBroker(Broker):
    """mosquitto that keeps sessions (and their queued QoS 1 messages) across its own restarts."""

    def config(self) -> Path:
        conf = super().config()
        text = conf.read_text().replace("persistence false",
                                        f"persistence true\npersistence_location {self.folder}/")
        conf.write_text(text)
        return conf


class HubClient:
    """A subscriber with a persistent session: what is published while it is away waits for it."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.broker, self.topic = broker, topic
        self.messages: list[mqtt.MQTTMessage] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="e2e-hub", clean_session=False)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = lambda c, u, msg: self.messages.append(msg)

    def connect(self) -> None:
        self.subscribed.clear()
        self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(5), "hub client could not subscribe"

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_wakes_heard_while_the_broker_is_down_survive_a_daemon_restart(
        model_path: Path, audio_dir: Path, positives: list[Path], tmp_path: Path) -> None:
    broker = PersistentBroker(tmp_path / "broker")
    broker.start()
    hub = HubClient(broker, "kwsd/+/wake")
    hub.connect()
    hub.disconnect()
    broker.stop()  # the broker saves the hub's session on the way down
    parts = []
    for p in positives[:4]:
        parts += [read_wav(p), silence(2.0)]
    many = write_wav(tmp_path / "many.wav", np.concatenate(parts))
    state = tmp_path / "state"
    first = Kwsd(config(model_path, state, [file_input(many, "attic")], port=broker.port), tmp_path, "first")
    second: Kwsd | None = None
    try:
        first.wait_log("input " + str(many) + ": finished", timeout=30)
        first.wait_log("wake:", 4)
        time.sleep(0.5)
        assert first.text().count("wake:") == 4
        assert first.terminate() == 0
        assert any((state / "outbox").iterdir()), "nothing kept in the outbox"

        # A second daemon with the same state folder and no audio of its own; then the broker comes back.
        second = Kwsd(config(model_path, state, [], port=broker.port), tmp_path, "second")
        second.wait_log("ready")
        broker.start()
        second.wait_log("MQTT connected")
        hub.connect()
        wait_until(lambda: len(hub.messages) >= 4, 15, "the four wakes")
        time.sleep(0.5)
        events = [json.loads(m.payload) for m in hub.messages]
        assert len(events) == 4 and {e["siteId"] for e in events} == {"attic"}
        starts = [e["start"] for e in events]
        assert starts == sorted(starts) and len(set(starts)) == 4, starts
        assert second.terminate() == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()
        hub.disconnect()
        broker.stop()


def test_remote_satellites_stream_hermes_audio_frames(broker: Broker, model_path: Path, audio_dir: Path,
                                                      negatives: list[Path], tmp_path: Path) -> None:
    pos = np.concatenate([read_wav(audio_dir / POSITIVE), silence(2.0)]).astype(np.int16)
    neg16 = np.concatenate([read_wav(negatives[0]), silence(2.0)])
    neg48 = np.clip(resample_poly(neg16, 3, 1), -32768, 32767).astype(np.int16)
    sub = Subscriber(broker, "kwsd/#", "hermes/error/#")
    daemon = Kwsd(config(model_path, tmp_path / "state", [], port=broker.port, satellites={"enabled": True}),
                  tmp_path)
    try:
        daemon.wait_for(lambda: any(m.topic == "kwsd/status" and m.payload == b"online" for m in sub.messages),
                        20, "kwsd online")
        daemon.wait_log("ready")
        step_a, step_b = RATE // 10, 48000 // 10  # 100 ms frames
        n = max(len(pos) // step_a, len(neg48) // step_b) + 1
        t0 = time.monotonic()
        for i in range(n):  # at twice real-time pace
            a, b = pos[i * step_a:(i + 1) * step_a], neg48[i * step_b:(i + 1) * step_b]
            if a.size:
                sub.publish(AudioFrame.topic("sat-a"), to_wav(a, RATE))
            if b.size:
                sub.publish(AudioFrame.topic("sat-b"), to_wav(b, 48000))
            time.sleep(max(0.0, t0 + (i + 1) * 0.05 - time.monotonic()))
        daemon.wait_for(lambda: payloads(sub, "kwsd/sat-a/wake"), 10, "the satellite's wake")
        time.sleep(1.0)
        [wake] = payloads(sub, "kwsd/sat-a/wake")
        assert 5.0 < wake["start"] < wake["end"] < 7.5, wake  # stream time counts from the satellite's first frame
        assert wake["device"] == "satellite:sat-a"
        assert not payloads(sub, "kwsd/sat-b/wake")
        assert not [m for m in sub.messages if m.topic.startswith("hermes/error")]
        assert "site sat-a: remote satellite joined" in daemon.text()
        assert "site sat-b: remote satellite joined" in daemon.text()
        wait_until(lambda: payloads(sub, "kwsd/sat-a/segment"), 10, "the satellite's segment")
    finally:
        daemon.kill()
        sub.close()
