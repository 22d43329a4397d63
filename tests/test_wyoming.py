"""The Wyoming wake-word service inside the daemon, driven with the ``wyoming`` library's own AsyncTcpClient.

The daemon is the real one (``Daemon.serve``, what ``kwsd run`` calls) with the real model, on a loopback port;
the expected keyword ends come from ``kwsd detect`` on the same recordings. Streams run at real-time pace, many at
once, so the whole module takes about as long as its longest recording twice over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.signal import resample_poly
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.ping import Ping
from wyoming.wake import Detect, Detection, NotDetected

import kwsd
from kwsd import settings as settings_mod
from kwsd.audio.wavfile import read_wav
from kwsd.settings import ConfigError, WyomingSettings
from kwsd.supervisor import Daemon
from tests.fixtures_broker import Broker, Subscriber

REPO = Path(__file__).resolve().parent.parent
KEYWORD = "小云小云"
TOLERANCE_MS = 100
MAX_CLIENTS = 20
SHORT = "kws_xiaoyunxiaoyun.wav"  # 4.5 s, the keyword ends at 2.4 s


# -- the daemon -----------------------------------------------------------------------------------------------


@dataclass
class Running:
    daemon: Daemon
    thread: threading.Thread

    @property
    def port(self) -> int:
        assert self.daemon.wyoming is not None and self.daemon.wyoming.address is not None
        return self.daemon.wyoming.address[1]


def _settings(model_path: Path, state: Path, **wyoming: object) -> settings_mod.Settings:
    cfg = {
        "model": {"path": str(model_path), "providers": ["CPUExecutionProvider"]},
        "mqtt": {"enabled": False},
        "wyoming": {"enabled": True, "port": 0, "max_clients": MAX_CLIENTS, **wyoming},
        "service": {"state_dir": str(state)},
    }
    return settings_mod.loads(yaml.safe_dump(cfg, allow_unicode=True))


@pytest.fixture(scope="module")
def running(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    daemon = Daemon(None, _settings(model_path, tmp_path_factory.mktemp("state")))
    thread = threading.Thread(target=daemon.serve, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while daemon.wyoming is None or daemon.wyoming.address is None:
        assert thread.is_alive(), "the daemon exited during start-up"
        assert time.monotonic() < deadline, "the Wyoming server did not start listening"
        time.sleep(0.05)
    yield Running(daemon, thread)
    daemon.stop_event.set()
    thread.join(15)
    assert not thread.is_alive()


def leftovers(r: Running) -> dict[str, object]:
    """What the daemon still holds for Wyoming clients: hub inputs, pipeline sites, detector streams, tasks."""
    d = r.daemon
    assert d.pipeline is not None and d.hub is not None and d.wyoming is not None and d.wyoming._loop is not None
    p = d.pipeline

    async def tasks() -> list[str]:
        return sorted(t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task())

    return {
        "pipeline sites": sorted(p.sites),
        "hub remote inputs": d.hub.remote_sites(),
        "detector streams": p.detector.streams,
        "server streams": d.wyoming.streams,
        "connections": d.wyoming.clients,
        "loop tasks": len(asyncio.run_coroutine_threadsafe(tasks(), d.wyoming._loop).result(5)),
    }


CLEAN = {"pipeline sites": [], "hub remote inputs": [], "detector streams": [], "server streams": [],
         "connections": 0, "loop tasks": 1}  # the one task left is the server's own


def wait_clean(r: Running, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := leftovers(r)) != CLEAN:
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind after the clients went: {left}")
        time.sleep(0.05)


# -- audio and clients ----------------------------------------------------------------------------------------


@dataclass
class Audio:
    """Interleaved PCM in a given format."""

    data: bytes
    rate: int
    width: int
    channels: int

    @property
    def frame_bytes(self) -> int:
        return self.width * self.channels

    @property
    def seconds(self) -> float:
        return len(self.data) / self.frame_bytes / self.rate


def pcm16(samples: np.ndarray) -> Audio:
    return Audio(np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes(), 16000, 2, 1)


def pcm48_stereo(samples: np.ndarray) -> Audio:
    x = resample_poly(samples.astype(np.float64), 3, 1)
    stereo = np.stack([x, 0.8 * x], axis=1)
    return Audio(np.clip(np.rint(stereo), -32768, 32767).astype("<i2").tobytes(), 48000, 2, 2)


def pcm44_32bit(samples: np.ndarray) -> Audio:
    x = resample_poly(samples.astype(np.float64), 441, 160) * 65536.0
    return Audio(np.clip(np.rint(x), -(2**31), 2**31 - 1).astype("<i4").tobytes(), 44100, 4, 1)


@dataclass
class Result:
    detections: list[Detection] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    """Seconds after the first chunk was sent."""
    not_detected: bool = False
    errors: list[Error] = field(default_factory=list)


async def stream(port: int, audio: Audio, *, names: list[str] | None = None, chunk_ms: int = 20,
                 realtime: bool = True, stop: bool = True,
                 on_detection: Callable[[Detection], None] | None = None) -> Result:
    """Stream ``audio`` in ``chunk_ms`` chunks (at live pace: chunk k leaves when its last sample was 'heard');
    after ``audio-stop`` a ping marks the point where the server has answered everything."""
    result = Result()
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Detect(names=names).event())
        await client.write_event(AudioStart(rate=audio.rate, width=audio.width, channels=audio.channels).event())
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def read() -> None:
            while (event := await client.read_event()) is not None:
                if Detection.is_type(event.type):
                    result.detections.append(Detection.from_event(event))
                    result.arrivals.append(loop.time() - t0)
                    if on_detection is not None:
                        on_detection(result.detections[-1])
                elif NotDetected.is_type(event.type):
                    result.not_detected = True
                elif Error.is_type(event.type):
                    result.errors.append(Error.from_event(event))
                elif event.type == "pong":
                    return

        reader = asyncio.create_task(read())
        step = audio.rate * chunk_ms // 1000 * audio.frame_bytes
        for k, i in enumerate(range(0, len(audio.data), step)):
            if realtime:
                await asyncio.sleep(max(0.0, t0 + (k + 1) * chunk_ms / 1000 - loop.time()))
            chunk = AudioChunk(rate=audio.rate, width=audio.width, channels=audio.channels,
                               audio=audio.data[i : i + step], timestamp=k * chunk_ms)
            await client.write_event(chunk.event())
        if stop:
            await client.write_event(AudioStop().event())
        await client.write_event(Ping().event())
        await asyncio.wait_for(reader, 30)
    return result


@pytest.fixture(scope="module")
def keyword_ends(positives: list[Path], model_path: Path) -> dict[str, list[int]]:
    """Keyword end (ms) per positive, from ``kwsd detect`` on the same file."""
    out = subprocess.run(
        [sys.executable, "-m", "kwsd", "detect", "--model", str(model_path), "--provider", "CPUExecutionProvider",
         *map(str, positives)],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=True,
    ).stdout
    ends: dict[str, list[int]] = {}
    for line in out.splitlines():
        hit = json.loads(line)
        ends.setdefault(Path(hit["file"]).name, []).append(round(hit["end"] * 1000))
    return ends


def _by_name(files: list[Path], name: str) -> Path:
    return next(f for f in files if f.name == name)


def test_the_reference_keyword_end_is_where_the_speech_ends(positives: list[Path],
                                                            keyword_ends: dict[str, list[int]]) -> None:
    """The timestamps below are checked against ``kwsd detect``'s keyword end (the peak of the last syllable, the
    ``end`` of every wake event); on the clean example it lies just before the speech's last loud 10 ms frame
    (within 10 dB of the loudest), so 'within 100 ms of it' means within 100 ms of the keyword in the audio."""
    x = read_wav(_by_name(positives, SHORT)).astype(np.float64)
    frames = x[: x.size // 160 * 160].reshape(-1, 160)
    level = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-9)
    speech_end = (int(np.nonzero(level > level.max() - 10)[0][-1]) + 1) * 10
    assert len(keyword_ends[SHORT]) == 1 and 0 <= speech_end - keyword_ends[SHORT][0] <= TOLERANCE_MS, (
        speech_end, keyword_ends[SHORT])


# -- tests ----------------------------------------------------------------------------------------------------


def test_describe_lists_each_keyword_as_a_model(running: Running) -> None:
    async def ask() -> Info:
        async with AsyncTcpClient("127.0.0.1", running.port) as client:
            await client.write_event(Describe().event())
            event = await asyncio.wait_for(client.read_event(), 10)
            assert event is not None and Info.is_type(event.type), event
            return Info.from_event(event)

    info = asyncio.run(ask())
    assert len(info.wake) == 1 and not info.asr and not info.tts
    program = info.wake[0]
    assert program.name == "kwsd" and program.installed and program.version == kwsd.__version__
    assert [m.name for m in program.models] == [KEYWORD]
    model = program.models[0]
    assert model.phrase == KEYWORD and model.languages == ["zh"] and model.version == kwsd.__version__
    assert "iic/speech_charctc_kws_phone-xiaoyun" in model.attribution.name
    assert "Apache-2.0" in model.attribution.name
    assert model.attribution.url.endswith("/iic/speech_charctc_kws_phone-xiaoyun")
    wait_clean(running)


def test_twenty_concurrent_clients_each_get_their_own_result(
        running: Running, positives: list[Path], negatives: list[Path], keyword_ends: dict[str, list[int]]) -> None:
    """20 clients at once at real-time pace, one batched detector: 16 kHz mono, 48 kHz stereo and 44.1 kHz 32-bit
    positives, negatives, a client that asks for another wake word, and one that streams on through two keywords."""
    long_positives = [p for p in positives if p.name != SHORT]
    short = _by_name(positives, SHORT)
    short_audio = read_wav(short)
    cases: list[tuple[str, Audio, list[str] | None, list[int]]] = []
    for p in long_positives[:7]:
        cases.append((f"16k mono {p.name}", pcm16(read_wav(p)), None, keyword_ends[p.name]))
    for p in long_positives[7:11]:
        cases.append((f"48k stereo {p.name}", pcm48_stereo(read_wav(p)), None, keyword_ends[p.name]))
    p = long_positives[11]
    cases.append((f"44.1k 32-bit {p.name}", pcm44_32bit(read_wav(p)), None, keyword_ends[p.name]))
    for n in negatives[-6:]:  # the longest ones
        cases.append((f"negative {n.name}", pcm16(read_wav(n)), None, []))
    p = long_positives[12]
    cases.append((f"names=[其他] {p.name}", pcm16(read_wav(p)), ["其他"], []))
    twice = np.concatenate([short_audio, short_audio])
    length_ms = round(short_audio.size / 16)
    cases.append(("streaming on", pcm16(twice), [KEYWORD], [e + k * length_ms for k in (0, 1)
                                                             for e in keyword_ends[SHORT]]))
    assert len(cases) == MAX_CLIENTS

    async def all_at_once() -> list[Result]:
        return await asyncio.gather(*(stream(running.port, audio, names=names) for _, audio, names, _ in cases))

    results = asyncio.run(all_at_once())
    problems = []
    for (what, _, _, expected), res in zip(cases, results, strict=True):
        got = [d.timestamp for d in res.detections]
        if res.errors:
            problems.append(f"{what}: errors {res.errors}")
        elif expected:
            if [d.name for d in res.detections] != [KEYWORD] * len(expected) or res.not_detected:
                problems.append(f"{what}: expected {len(expected)} detections of {KEYWORD}, got {res}")
            elif any(t is None or abs(t - e) > TOLERANCE_MS for t, e in zip(got, expected, strict=True)):
                problems.append(f"{what}: timestamps {got} ms, keyword ends at {expected} ms")
        elif res.detections or not res.not_detected:
            problems.append(f"{what}: expected not-detected, got {res}")
    assert not problems, "\n".join(problems)
    wait_clean(running)


def test_disconnect_mid_stream_leaves_nothing_behind(running: Running, positives: list[Path]) -> None:
    audio = pcm16(read_wav(_by_name(positives, SHORT)))

    async def go_away(mid_payload: bool) -> None:
        async with AsyncTcpClient("127.0.0.1", running.port) as client:
            await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            for i in range(0, 16000 * 2, 640):  # a second of audio, then gone without audio-stop
                await client.write_event(AudioChunk(16000, 2, 1, audio.data[i : i + 640]).event())
            await asyncio.sleep(0.3)
            if mid_payload:  # a header announcing 640 bytes, and only 100 of them
                assert client._writer is not None
                client._writer.write(b'{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, '
                                     b'"channels": 1}, "payload_length": 640}\n' + audio.data[:100])
                await client._writer.drain()

    for mid_payload in (False, True):
        asyncio.run(go_away(mid_payload))
        wait_clean(running)
    assert running.thread.is_alive()


BAD_EVENTS = {
    "not JSON": b"this is not json\n",
    "no type": b'{"data": {}}\n',
    "a JSON list": b"[1, 2, 3]\n",
    "a data_length that is no number": b'{"type": "detect", "data_length": "x"}\n',
    "an oversized payload": b'{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}, '
                            b'"payload_length": 104857600}\n',
    "an oversized header line": b'{"type": "describe", "data": {"x": "' + b"a" * 200_000 + b'"}}\n',
    "an impossible sample width": b'{"type": "audio-start", "data": {"rate": 16000, "width": 5, "channels": 1}}\n',
    "a chunk without a rate": b'{"type": "audio-chunk", "data": {"width": 2, "channels": 1}, "payload_length": 4}\n'
                              b"\0\0\0\0",
    "a chunk of half frames": b'{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 2}, '
                              b'"payload_length": 6}\n\0\0\0\0\0\0',
    "names that are no list": b'{"type": "detect", "data": {"names": 7}}\n',
    "data that is no mapping": b'{"type": "ping", "data": 5}\n',
}


def test_malformed_events_close_only_that_connection(running: Running, positives: list[Path],
                                                     keyword_ends: dict[str, list[int]],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    audio = pcm16(read_wav(_by_name(positives, SHORT)))

    async def bad(payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        try:
            writer.write(payload)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 10)  # returns when the server closes the connection
        except ConnectionError:  # closed while the rest of a long header was still being sent
            return b""
        finally:
            writer.close()

    async def both() -> tuple[Result, list[bytes]]:
        good = asyncio.create_task(stream(running.port, audio))
        await asyncio.sleep(0.5)
        answers = await asyncio.gather(*(bad(p) for p in BAD_EVENTS.values()))
        return await good, answers

    with caplog.at_level(logging.WARNING, logger="kwsd.wyoming"):
        good, answers = asyncio.run(both())
    assert [d.name for d in good.detections] == [KEYWORD] and not good.not_detected
    assert abs((good.detections[0].timestamp or 0) - keyword_ends[SHORT][0]) <= TOLERANCE_MS
    assert answers == [b""] * len(BAD_EVENTS), "the server answered a malformed event instead of closing"
    closed = [r.getMessage() for r in caplog.records if "closing the connection" in r.getMessage()]
    assert len(closed) == len(BAD_EVENTS), closed
    for line in closed:
        assert re.match(r"wyoming: client 127\.0\.0\.1:\d+ sent .+; closing the connection$", line), line
    assert any("over 64 KiB" in line for line in closed)
    assert any("104857600 bytes" in line and "wyoming.max_event_bytes" in line for line in closed)
    assert any("width 5" in line for line in closed)
    wait_clean(running)


def test_max_clients_refuses_one_more(running: Running) -> None:
    wait_clean(running)

    async def scenario() -> None:
        clients = [AsyncTcpClient("127.0.0.1", running.port) for _ in range(MAX_CLIENTS)]
        for c in clients:
            await c.connect()
            await c.write_event(Describe().event())
            event = await asyncio.wait_for(c.read_event(), 10)
            assert event is not None and Info.is_type(event.type)
        async with AsyncTcpClient("127.0.0.1", running.port) as extra:
            event = await asyncio.wait_for(extra.read_event(), 10)
            assert event is not None and Error.is_type(event.type), event
            error = Error.from_event(event)
            assert error.code == "too-many-clients" and "wyoming.max_clients" in error.text
            assert await asyncio.wait_for(extra.read_event(), 10) is None  # and closed
        await clients[0].disconnect()
        deadline = time.monotonic() + 10
        while running.daemon.wyoming is not None and running.daemon.wyoming.clients >= MAX_CLIENTS:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        async with AsyncTcpClient("127.0.0.1", running.port) as again:
            await again.write_event(Describe().event())
            event = await asyncio.wait_for(again.read_event(), 10)
            assert event is not None and Info.is_type(event.type)
        for c in clients[1:]:
            await c.disconnect()

    asyncio.run(scenario())
    wait_clean(running)


def test_audio_stop_without_audio_and_more_streams_on_one_connection(
        running: Running, positives: list[Path], keyword_ends: dict[str, list[int]],
        caplog: pytest.LogCaptureFixture) -> None:
    """audio-stop with nothing streamed answers not-detected; each new audio-start (with or without an audio-stop
    before it) restarts the timestamps and keeps the client's site name."""
    audio = pcm16(read_wav(_by_name(positives, SHORT)))

    async def scenario() -> list[Event]:
        events: list[Event] = []
        async with AsyncTcpClient("127.0.0.1", running.port) as client:
            await client.write_event(AudioStop().event())
            for stop in (True, False, True):
                await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
                for i in range(0, len(audio.data), 3200):
                    await client.write_event(AudioChunk(16000, 2, 1, audio.data[i : i + 3200]).event())
                if stop:
                    await client.write_event(AudioStop().event())
            await client.write_event(Ping().event())
            while (event := await asyncio.wait_for(client.read_event(), 20)) is not None and event.type != "pong":
                events.append(event)
        return events

    with caplog.at_level(logging.INFO, logger="kwsd.wyoming"):
        events = asyncio.run(scenario())
    assert [e.type for e in events] == ["not-detected", "detection", "detection", "detection"]
    for e in events[1:]:
        assert abs(Detection.from_event(e).timestamp - keyword_ends[SHORT][0]) <= TOLERANCE_MS  # type: ignore
    sites = re.findall(r"as site (\S+)$", "\n".join(r.getMessage() for r in caplog.records), re.M)
    assert sites == ["wyoming-127.0.0.1"] * 3, sites
    wait_clean(running)


def test_a_whole_recording_in_one_chunk(running: Running, positives: list[Path],
                                        keyword_ends: dict[str, list[int]]) -> None:
    """One 850 KB audio-chunk (4.5 s of 48 kHz stereo, twice the hub's ring for the site) is taken in pieces as
    the pipeline reads them, none lost: the keyword is detected at its place."""
    audio = pcm48_stereo(read_wav(_by_name(positives, SHORT)))
    assert len(audio.data) <= WyomingSettings().max_event_bytes and audio.seconds > 4
    result = asyncio.run(stream(running.port, audio, chunk_ms=round(audio.seconds * 1000) + 1000, realtime=False))
    assert [d.name for d in result.detections] == [KEYWORD] and not result.errors, result
    assert abs((result.detections[0].timestamp or 0) - keyword_ends[SHORT][0]) <= TOLERANCE_MS
    wait_clean(running)


def test_a_reload_that_rebuilds_the_detector_mid_stream_keeps_timestamps(
        model_path: Path, positives: list[Path], keyword_ends: dict[str, list[int]], tmp_path: Path) -> None:
    """SIGHUP-style reload with new detector settings while a client streams on: the stream continues on the new
    detector, the next keyword is still detected with its timestamp counted from the client's audio-start."""
    def config(refractory: float) -> str:
        return yaml.safe_dump({
            "model": {"path": str(model_path), "providers": ["CPUExecutionProvider"]},
            "detector": {"refractory": refractory},
            "mqtt": {"enabled": False},
            "wyoming": {"enabled": True, "port": 0},
            "service": {"state_dir": str(tmp_path / "state")},
        }, allow_unicode=True)

    path = tmp_path / "config.yaml"
    path.write_text(config(1.0), encoding="utf-8")
    daemon = Daemon(path, settings_mod.load(path))
    thread = threading.Thread(target=daemon.serve, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    r = Running(daemon, thread)
    try:
        deadline = time.monotonic() + 60
        while daemon.wyoming is None or daemon.wyoming.address is None:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        short = read_wav(_by_name(positives, SHORT))
        assert daemon.pipeline is not None
        first_detector = daemon.pipeline.detector

        def reload(_: Detection) -> None:
            if daemon.pipeline is not None and daemon.pipeline.detector is first_detector:
                path.write_text(config(1.2), encoding="utf-8")
                daemon.request_reload()

        result = asyncio.run(stream(r.port, pcm16(np.concatenate([short, short])), on_detection=reload))
        assert daemon.pipeline.detector is not first_detector, "the reload did not swap in a new detector"
        expected = [e + k * round(short.size / 16) for k in (0, 1) for e in keyword_ends[SHORT]]
        got = [d.timestamp or 0 for d in result.detections]
        assert len(got) == 2 and all(abs(t - e) <= TOLERANCE_MS for t, e in zip(got, expected, strict=True)), (
            got, expected)
        wait_clean(r)
    finally:
        daemon.stop_event.set()
        thread.join(15)


def test_zeroconf_announces_the_service_and_withdraws_it(model_path: Path, tmp_path: Path) -> None:
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    name = f"kwsd-test-{os.getpid()}"
    daemon = Daemon(None, _settings(model_path, tmp_path, host="0.0.0.0", zeroconf=True, zeroconf_name=name))
    thread = threading.Thread(target=daemon.serve, kwargs={"handle_signals": False}, daemon=True)
    thread.start()

    async def resolve(timeout_ms: int) -> AsyncServiceInfo | None:
        async with AsyncZeroconf() as zc:
            info = AsyncServiceInfo("_wyoming._tcp.local.", f"{name}._wyoming._tcp.local.")
            return info if await info.async_request(zc.zeroconf, timeout_ms) else None

    try:
        deadline = time.monotonic() + 60
        while daemon.wyoming is None or daemon.wyoming.address is None:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        port = daemon.wyoming.address[1]
        found = None
        while found is None and time.monotonic() < deadline:
            found = asyncio.run(resolve(1000))
        assert found is not None and found.port == port
        address = found.parsed_addresses()[0]

        async def describe_there() -> Info:  # the announced address really serves the protocol
            async with AsyncTcpClient(address, port) as client:
                await client.write_event(Describe().event())
                event = await asyncio.wait_for(client.read_event(), 10)
                assert event is not None
                return Info.from_event(event)

        assert [m.name for m in asyncio.run(describe_there()).wake[0].models] == [KEYWORD]
    finally:
        daemon.stop_event.set()
        thread.join(15)
    assert asyncio.run(resolve(1500)) is None, "the announcement outlived the daemon"


def test_the_watchdog_sees_a_stuck_server_loop(running: Running) -> None:
    """The server's thread beats into the daemon's liveness: a handler that blocks the event loop makes it late,
    so STATUS names it and the watchdog pings stop (the pings themselves are driven in test_service_systemd)."""
    wait_clean(running)
    d = running.daemon
    part = d.liveness.get("wyoming")
    assert part is not None and part.state == "running" and "wyoming" not in d.liveness.overdue()
    assert d.wyoming is not None and d.wyoming._loop is not None
    d.wyoming._loop.call_soon_threadsafe(time.sleep, 3.5)  # what a blocking call in a handler does
    deadline = time.monotonic() + 5
    while "wyoming" not in d.liveness.overdue():
        assert time.monotonic() < deadline, "a stuck event loop went unnoticed"
        time.sleep(0.05)
    assert "wyoming not responding" in d.status_line()
    while "wyoming" in d.liveness.overdue():
        assert time.monotonic() < deadline + 5, "the server did not beat again after the loop came back"
        time.sleep(0.05)
    wait_clean(running)


def test_a_stream_dropped_as_idle_goes_on_and_a_reload_turns_the_service_off(
        model_path: Path, positives: list[Path], keyword_ends: dict[str, list[int]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A client that pauses longer than mqtt.satellites.idle_timeout loses its hub input; its next chunk opens a
    new one of the same site and the timestamps still count the stream's audio since audio-start. A reload with
    wyoming.enabled false then stops the server: its part is stopped (not late) and the port closed."""
    def config(enabled: bool) -> str:
        return yaml.safe_dump({
            "model": {"path": str(model_path), "providers": ["CPUExecutionProvider"]},
            "mqtt": {"enabled": False, "satellites": {"idle_timeout": 1.0}},
            "wyoming": {"enabled": enabled, "port": 0},
            "service": {"state_dir": str(tmp_path / "state")},
        }, allow_unicode=True)

    path = tmp_path / "config.yaml"
    path.write_text(config(True), encoding="utf-8")
    daemon = Daemon(path, settings_mod.load(path))
    thread = threading.Thread(target=daemon.serve, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    audio = pcm16(read_wav(_by_name(positives, SHORT)))

    async def scenario(port: int) -> list[Event]:
        events: list[Event] = []
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            for half in (0, 1):
                for i in range(0, len(audio.data), 3200):
                    await client.write_event(AudioChunk(16000, 2, 1, audio.data[i : i + 3200]).event())
                if half == 0:  # the server takes the chunks (at its pace), then hears nothing for a while
                    deadline = time.monotonic() + 20
                    seen = False
                    while not seen or (daemon.hub is not None and daemon.hub.remote_sites()):
                        assert time.monotonic() < deadline, "the hub did not drop the idle stream"
                        seen = seen or bool(daemon.hub is not None and daemon.hub.remote_sites())
                        await asyncio.sleep(0.02)
            await client.write_event(AudioStop().event())
            await client.write_event(Ping().event())
            while (event := await asyncio.wait_for(client.read_event(), 20)) is not None and event.type != "pong":
                events.append(event)
        return events

    try:
        deadline = time.monotonic() + 60
        while daemon.wyoming is None or daemon.wyoming.address is None:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        port = daemon.wyoming.address[1]
        with caplog.at_level(logging.INFO):
            events = asyncio.run(scenario(port))
        assert [e.type for e in events] == ["detection", "detection"], events
        expected = [keyword_ends[SHORT][0] + k * round(audio.seconds * 1000) for k in (0, 1)]
        got = [Detection.from_event(e).timestamp or 0 for e in events]
        assert all(abs(t - e) <= TOLERANCE_MS for t, e in zip(got, expected, strict=True)), (got, expected)
        messages = [r.getMessage() for r in caplog.records]
        assert any("remote wyoming dropped (no audio for" in m for m in messages), messages
        assert any("the hub dropped the idle stream; it starts again" in m for m in messages), messages

        path.write_text(config(False), encoding="utf-8")
        assert daemon.reload()
        assert daemon.wyoming is None
        part = daemon.liveness.get("wyoming")
        assert part is not None and part.state == "stopped" and "wyoming" not in daemon.liveness.overdue()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        daemon.stop_event.set()
        thread.join(15)


# -- start-up, settings -----------------------------------------------------------------------------------------


def test_a_port_in_use_fails_the_start_naming_the_setting(model_path: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(None, _settings(model_path, tmp_path, port=port))
        with caplog.at_level(logging.ERROR):
            assert daemon.serve(handle_signals=False) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(m.startswith(f"wyoming.port: cannot listen on 127.0.0.1:{port}: ") for m in errors), errors
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize(("yaml_text", "key"), [
    ("wyoming: {port: 70000}", "wyoming.port"),
    ("wyoming: {max_clients: 0}", "wyoming.max_clients"),
    ("wyoming: {max_event_bytes: 10}", "wyoming.max_event_bytes"),
    ("wyoming: {host: ''}", "wyoming.host"),
    ("wyoming: {sites: {192.168.1.20: 'kitchen/left'}}", "wyoming.sites.192.168.1.20"),
    ("wyoming: {publish_mqtt: yes please}", "wyoming.publish_mqtt"),
    ("wyoming: {bogus: true}", "wyoming.bogus"),
    ("wyoming: {zeroconf: true}", "wyoming.zeroconf"),  # on 127.0.0.1 nobody else could connect
])
def test_bad_wyoming_settings_name_the_key(yaml_text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_mod.loads(yaml_text)
    assert err.value.key == key


def test_config_yaml_documents_the_wyoming_defaults() -> None:
    documented = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))["wyoming"]
    assert settings_mod.from_dict(WyomingSettings, documented, "wyoming") == WyomingSettings()
    assert set(documented) == set(WyomingSettings.__dataclass_fields__)


# -- the real command, MQTT mirror and reload ---------------------------------------------------------------------


def _listening(log: Path, after: int = 0) -> int | None:
    found = re.findall(r"wyoming: listening on tcp://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
    return int(found[after]) if len(found) > after else None


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"kwsd exited ({proc.returncode}) waiting for {what}:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.mark.broker
def test_kwsd_run_mirrors_wyoming_wakes_to_mqtt_after_a_reload(broker: Broker, model_path: Path,
                                                               positives: list[Path], tmp_path: Path) -> None:
    """``kwsd run``: with publish_mqtt off a Wyoming wake stays off MQTT; SIGHUP turns it on, and the next wake is
    published for the client's configured site."""
    def config(publish: bool) -> str:
        return yaml.safe_dump({
            "model": {"path": str(model_path), "providers": ["CPUExecutionProvider"]},
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "reconnect_min": 0.2, "reconnect_max": 1.0},
            "wyoming": {"enabled": True, "port": 0, "publish_mqtt": publish, "sites": {"127.0.0.1": "satroom"}},
            "service": {"state_dir": str(tmp_path / "state")},
        }, allow_unicode=True)

    path = tmp_path / "config.yaml"
    path.write_text(config(False), encoding="utf-8")
    log = tmp_path / "kwsd.log"
    sub = Subscriber(broker, "kwsd/#", "hermes/hotword/#", "homeassistant/#")
    audio = pcm16(read_wav(_by_name(positives, SHORT)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "kwsd", "run", "--config", str(path)], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        port = _wait(lambda: _listening(log), 60, "the Wyoming server", proc, log)
        first = asyncio.run(stream(port, audio, realtime=False))
        assert [d.name for d in first.detections] == [KEYWORD]
        time.sleep(1.0)
        assert not [m.topic for m in sub.messages if "satroom" in m.topic or b"satroom" in m.payload]

        path.write_text(config(True), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        port = _wait(lambda: _listening(log, after=1), 20, "the reloaded Wyoming server", proc, log)
        second = asyncio.run(stream(port, audio, realtime=False))
        assert [d.name for d in second.detections] == [KEYWORD]
        wake = json.loads(sub.wait_for(1, "kwsd/satroom/wake")[0].payload)
        assert wake["siteId"] == "satroom" and wake["wakewordId"] == KEYWORD and wake["device"] == "wyoming:satroom"
        hermes = json.loads(sub.wait_for(1, f"hermes/hotword/{KEYWORD}/detected")[0].payload)
        assert hermes["siteId"] == "satroom"
    finally:
        sub.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    assert proc.returncode == 0
    assert "Traceback" not in log.read_text(errors="replace")
