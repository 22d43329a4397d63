"""10,000 generated inbound messages through a real mosquitto into a running publisher.

A seeded generator (bounded count, paced in batches) mixes every subscribed topic with malformed JSON,
hostile siteIds and reasons, broken and oversized WAVs, and interleaves good audio frames and toggles that
must all arrive, in order. Checked: no traceback and a bounded number of log lines, bounded memory, error
answers at a bounded rate, no Home Assistant entity the daemon did not ask for, the connection never lost,
and a wake still delivered at the end.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from kwsd.mqtt.messages import AudioFrame, MessageError, WakeEvent, check_site_id, to_wav
from kwsd.mqtt.publisher import ERROR_ANSWERS_PER_SECOND, MAX_REASON, Publisher
from kwsd.settings import MqttSettings, SatelliteSettings
from tests.fixtures_broker import Broker, Subscriber, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

COUNT = 10_000
BATCH = 250
SEED = 20261201


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Fuzz:
    """The generator: each call gives one (topic, payload) a real client could send."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def text(self) -> str:
        r = self.rng
        kind = r.randrange(9)
        if kind == 0:
            return ""
        if kind == 1:
            return "x" * r.choice([64, 65, 200, 1000, 5000])
        if kind == 2:
            return "".join(chr(r.randrange(0, 0x20)) for _ in range(r.randrange(1, 8)))
        if kind == 3:
            return r.choice(["卧室", "küche", "🎤mic", "a b", " lead", "trail ", "$SYS", "a\u200bb", "x/y"])
        if kind == 4:
            return "".join(chr(r.randrange(0x20, 0x3000)) for _ in range(r.randrange(1, 80)))
        return f"sat{r.randrange(2000)}"

    def topic_site(self) -> str:
        """A siteId that mosquitto accepts in a topic (it disconnects the sender on anything else)."""
        r = self.rng
        kind = r.randrange(6)
        if kind == 0:
            return "s" * r.choice([65, 300, 4000])
        if kind == 1:
            return r.choice(["卧室", "küche", "🎤mic", "a b", " lead", "$x", "a\u200bb", "a\u2028b", "%00"])
        if kind == 2:
            return "".join(chr(r.randrange(0xA0, 0xD7FF)) for _ in range(r.randrange(1, 70)))
        return f"sat{r.randrange(2000)}"

    def json_value(self, depth: int = 0) -> object:
        r = self.rng
        kind = r.randrange(8 if depth < 3 else 5)
        if kind == 0:
            return None
        if kind == 1:
            return r.choice([True, False, 0, -1, 1e308, 2**70, 3.5])
        if kind == 2:
            return self.text()
        if kind == 3:
            return []
        if kind == 4:
            return {}
        if kind == 5:
            return [self.json_value(depth + 1) for _ in range(r.randrange(3))]
        return {self.text(): self.json_value(depth + 1) for _ in range(r.randrange(3))}

    def toggle(self) -> bytes:
        r = self.rng
        kind = r.randrange(6)
        if kind == 0:
            return r.randbytes(r.randrange(0, 300))
        if kind == 1:
            return json.dumps(self.json_value()).encode()
        if kind == 2:
            return b'{"siteId": "a", "reason": ' + r.randbytes(20) + b"}"
        body: dict[str, object] = {"siteId": self.text(), "reason": self.text()}
        if r.random() < 0.3:
            body["reason"] = "r" * r.choice([10, MAX_REASON, MAX_REASON + 1, 10_000])
        if r.random() < 0.3:
            body[self.text()] = self.json_value()
        return json.dumps(body, ensure_ascii=r.random() < 0.5).encode("utf-8", "surrogatepass")

    def wav(self) -> bytes:
        r = self.rng
        kind = r.randrange(10)
        rate = r.choice([8000, 16000, 22050, 44100, 48000, 4000, 500_000])
        channels = r.choice([1, 1, 2, 3])
        n = r.randrange(0, 2000)
        good = to_wav(np.zeros(n * channels, np.int16) + r.randrange(-100, 100), max(1, rate), channels)
        if kind == 0:
            return r.randbytes(r.randrange(0, 3000))
        if kind == 1:
            return b"RIFF" + r.randbytes(4) + b"WAVE" + r.randbytes(r.randrange(0, 300))
        if kind == 2:  # a few flipped header bytes
            data = bytearray(good)
            for _ in range(r.randrange(1, 4)):
                data[r.randrange(min(44, len(data)))] = r.randrange(256)
            return bytes(data)
        if kind == 3:  # truncated
            return good[: r.randrange(len(good) + 1)]
        if kind == 4:  # the header claims far more frames than there are
            data = bytearray(good)
            data[40:44] = (2**31 - 1).to_bytes(4, "little")
            return bytes(data)
        if kind == 5:  # 8-bit or 24-bit samples
            data = bytearray(good)
            data[34:36] = r.choice([8, 24, 0, 65535]).to_bytes(2, "little")
            return bytes(data)
        if kind == 6:
            return r.randbytes(r.choice([70_000, 300_000]))  # beyond max_frame_bytes
        return good

    def message(self) -> tuple[str, bytes]:
        r = self.rng
        kind = r.randrange(10)
        if kind < 3:
            return r.choice(["hermes/hotword/toggleOn", "hermes/hotword/toggleOff"]), self.toggle()
        if kind == 3:
            return "homeassistant/status", r.choice([b"online", b"offline", b" online\n", r.randbytes(20), b""])
        return AudioFrame.topic(self.topic_site()), self.wav()


def test_ten_thousand_generated_inbound_messages(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = MqttSettings(
        host="127.0.0.1",
        port=broker.port,
        client_id="kwsd-fuzz",
        satellites=SatelliteSettings(enabled=True, max_frame_bytes=65536),
    )
    lock = threading.Lock()
    good_frames: list[int] = []
    good_toggles: list[str] = []
    sat_sites: set[str] = set()
    bad_callbacks: list[str] = []

    def satellite_audio(site: str, samples: np.ndarray, rate: int) -> None:
        if samples.dtype != np.int16 or samples.ndim != 1 or not 8000 <= rate <= 192000:
            bad_callbacks.append(f"audio {site!r} {samples.dtype} {samples.shape} {rate}")
        with lock:
            sat_sites.add(site)
            if site == "good":
                good_frames.append(int(samples[0]))

    def on_toggle(site: str, enabled: bool, reason: str) -> None:
        try:
            check_site_id(site)
        except MessageError:
            bad_callbacks.append(f"toggle site {site!r}")
        if len(reason) > MAX_REASON:
            bad_callbacks.append(f"toggle reason of {len(reason)}")
        if site == "good" and not enabled:
            with lock:
                good_toggles.append(reason)

    entities = Subscriber(broker, "homeassistant/#", "hermes/error/hotword", "kwsd/a/wake")
    fuzzer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzzer")
    fuzzer.max_inflight_messages_set(100)
    fuzzer.connect(broker.host, broker.port)
    fuzzer.loop_start()
    gen = Fuzz(SEED)
    with caplog.at_level(logging.INFO, logger="kwsd"):
        pub = Publisher(s, tmp_path / "outbox", ["a"], on_toggle=on_toggle, satellite_audio=satellite_audio)
        pub.start()
        wait_until(lambda: pub.connected, 10, "publisher connected")
        rss_start = 0
        started = time.monotonic()
        sent_good = 0
        try:
            for i in range(COUNT):
                if i % 50 == 49:  # a good frame, numbered in its first sample
                    topic, payload = AudioFrame.topic("good"), to_wav(np.full(160, sent_good, np.int16), 16000)
                    sent_good += 1
                elif i % 100 == 0:
                    topic, payload = "hermes/hotword/toggleOff", json.dumps({"siteId": "good", "reason": f"r{i}"})
                else:
                    topic, payload = gen.message()  # type: ignore[assignment]
                fuzzer.publish(topic, payload, qos=1)
                if i % BATCH == BATCH - 1:  # pace: the batch's last good frame must have arrived
                    wait_until(
                        lambda want=sent_good: len(good_frames) >= want,
                        30,
                        f"good frame {sent_good} of batch {i // BATCH}",
                    )
                if i == 999:
                    rss_start = rss_bytes()  # after warm-up (numpy, paho buffers, log records)
            elapsed = time.monotonic() - started
            rss_growth = rss_bytes() - rss_start
            wait_until(lambda: len(good_toggles) == COUNT // 100, 10, "the good toggles")
            pub.put_wake(WakeEvent("a", "xiaoyun", "小云小云", 0.9, 0.2, 1.0, 1.8, "after-fuzz"))
            [after] = entities.wait_for(1, "kwsd/a/wake")
            assert WakeEvent.from_payload(after.payload).session_id == "after-fuzz"
            c = pub.counters
        finally:
            pub.stop()
            fuzzer.disconnect()
            fuzzer.loop_stop()
            entities.close()

    assert good_frames == list(range(sent_good)), "good frames lost or reordered"
    assert good_toggles == [f"r{i}" for i in range(0, COUNT, 100)]
    assert not bad_callbacks, bad_callbacks[:10]
    assert c.reconnects == 0 and c.connected, c
    assert c.inbound_errors > 3000, c  # the generator's malformed share
    for site in sat_sites:
        check_site_id(site)
    # entities: only what update_sites announced; error answers: at a bounded rate
    discovery = {m.topic for m in entities.messages if m.topic.startswith("homeassistant/event/")}
    assert discovery == {"homeassistant/event/kwsd/wake_a/config"}, sorted(discovery)[:5]
    answers = [m for m in entities.messages if m.topic == "hermes/error/hotword"]
    assert len(answers) <= ERROR_ANSWERS_PER_SECOND * (elapsed + 5) + 2 * ERROR_ANSWERS_PER_SECOND
    assert rss_growth < 48 * 1024 * 1024, f"RSS grew {rss_growth / 2**20:.1f} MiB"
    shown = caplog.records
    assert not [r for r in shown if r.exc_info], [r.getMessage() for r in shown if r.exc_info][:3]
    assert "Traceback" not in caplog.text
    assert len(shown) < 100, f"{len(shown)} log lines for {COUNT} messages"
    print(
        f"\nfuzz: {COUNT} messages in {elapsed:.1f} s, {c.inbound_errors} rejected, {len(answers)} error answers, "
        f"{len(sat_sites)} satellite sites, {len(shown)} log lines, RSS +{rss_growth / 2**20:.1f} MiB"
    )
