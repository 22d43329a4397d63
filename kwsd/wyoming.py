"""Wyoming wake-word service: Home Assistant Assist and wyoming-satellite stream audio to kwsd's detector.

Built on the ``wyoming`` library (the one Home Assistant and the satellites use) for framing, events and the TCP
server. An asyncio loop runs on its own thread; each connection is a handler that answers ``describe`` with the
configured keywords, and turns ``audio-start`` .. ``audio-chunk`` .. ``audio-stop`` into one stream of the daemon's
own pipeline (a remote site, like an MQTT satellite): the same batched detector step, thresholds, refractory period
and metrics as the microphones, not a model per client. Detections come back from the pipeline thread through
``put_wake`` and are written to the client as ``detection`` events with the keyword's end in ms of audio since
``audio-start``; ``audio-stop`` flushes the detector's look-ahead and answers ``not-detected`` if nothing fired.

A connection is bounded: ``max_clients`` connections at once, ``max_event_bytes`` per data block and payload,
64 KiB per header line (the stream reader's limit). A malformed or oversized event closes that connection with one
log line; a client that goes away mid-stream leaves no stream, buffer or task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_read_event
from wyoming.info import Attribution, Describe, Info, WakeModel, WakeProgram
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler, AsyncTcpServer
from wyoming.wake import Detect, Detection, NotDetected

from kwsd import __version__
from kwsd.audio.hub import REMOTE_RATES, RemoteInput, RemoteRefused
from kwsd.audio.resample import StreamResampler
from kwsd.lifecycle import Liveness, Part, describe, supervise
from kwsd.mqtt.messages import WakeEvent
from kwsd.settings import DetectorSettings, WyomingSettings

if TYPE_CHECKING:
    from kwsd.segments import Segment
    from kwsd.supervisor import Daemon

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MODEL_NAME = "ModelScope iic/speech_charctc_kws_phone-xiaoyun (Apache-2.0)"
MODEL_URL = "https://modelscope.cn/models/iic/speech_charctc_kws_phone-xiaoyun"
ORIGIN = "wyoming"
"""The hub's origin of Wyoming clients' remote sites (their device reads ``wyoming:<siteId>``)."""
STOP_WAIT = 5.0
"""Seconds ``audio-stop`` waits for the pipeline to decide the stream's last audio before answering."""
WRITE_WAIT = 5.0
"""Seconds a block of audio waits for room in the hub before it is written anyway (the ring's overrun counts it)."""
_RATES = (1000, 384000)
_WIDTHS = (1, 2, 3, 4)
_MAX_CHANNELS = 32


def _is_ipv4(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        return False


class WyomingError(RuntimeError):
    """The Wyoming service cannot start; the message names the setting."""


class ProtocolError(ValueError):
    """A client sent something this service refuses (malformed or oversized); its connection is closed."""


class StreamRefused(RuntimeError):
    """The audio hub cannot take another remote site now; the client is told and its connection closed."""


def wyoming_info(detector: DetectorSettings) -> Info:
    """The ``info`` answer: one wake program, one model per configured keyword (name = wakewordId)."""
    model_attribution = Attribution(name=MODEL_NAME, url=MODEL_URL)
    models = [
        WakeModel(
            name=kw.wakeword_id,
            attribution=model_attribution,
            installed=True,
            description=kw.phrase.replace(" ", ""),
            version=__version__,
            languages=["zh"],
            phrase=kw.phrase.replace(" ", ""),
        )
        for kw in detector.keywords
    ]
    program = WakeProgram(
        name="kwsd",
        attribution=Attribution(name=f"kwsd {__version__}, model {MODEL_NAME}", url=MODEL_URL),
        installed=True,
        description="kwsd: on-premise FSMN-CTC keyword spotting (小云小云)",
        version=__version__,
        models=models,
    )
    return Info(wake=[program])


class RemoteStream:
    """One Wyoming audio stream: a remote input of the daemon's audio hub (``hub.remote(site, "wyoming")``).

    Audio at any rate goes in with ``write`` (the hub resamples the rates it supports; others are resampled here
    first). A TCP client is slowed down rather than dropped: ``write`` waits while the input's ring is nearly
    full or the hub's flood limit holds the block back, which stops reading the connection, so TCP pushes back.
    ``close`` hands the end of the stream to the pipeline, which decides the last audio (the model's look-ahead
    included), hands on the last detections, drops the site and then calls ``done`` on its own thread.
    """

    def __init__(self, daemon: Daemon, site: str) -> None:
        self.daemon = daemon
        self.site = site
        self._base = 0  # 16 kHz samples of this stream held by inputs the hub has already dropped
        self._resampler: StreamResampler | None = None
        self._input = self._open()
        self.closed = False

    def _open(self) -> RemoteInput:
        hub = self.daemon.hub
        if hub is None:
            raise RemoteRefused("the daemon's audio hub is not running")
        return hub.remote(self.site, ORIGIN)

    @property
    def written(self) -> int:
        """16 kHz samples of this stream handed to the hub since ``audio-start``."""
        return self._base + self._input.ring.end

    async def write(self, samples: np.ndarray, rate: int) -> None:
        """Hand int16 mono ``samples`` at ``rate`` Hz to the hub, waiting while it cannot take them."""
        if self.closed or not samples.size:
            return
        if rate not in REMOTE_RATES:
            if self._resampler is None or self._resampler.rate_in != rate:
                self._resampler = StreamResampler(rate, SAMPLE_RATE)
            samples, rate = self._resampler.process(samples), SAMPLE_RATE
            if not samples.size:
                return
        piece = max(1, self._input.capacity // 4 * rate // SAMPLE_RATE)  # a big chunk goes in as several
        for i in range(0, samples.size, piece):
            await self._write(samples[i : i + piece], rate)

    async def _write(self, samples: np.ndarray, rate: int) -> None:
        seconds = samples.size / rate
        give_up = time.monotonic() + WRITE_WAIT
        while True:
            inp = self._input
            if inp.closed:
                # The hub dropped the site (no audio for mqtt.satellites.idle_timeout): the stream goes on in a
                # new input of the same site, its timestamps still counted from audio-start.
                log.info("wyoming: site %s: the hub dropped the idle stream; it starts again", self.site)
                self._base += inp.ring.end
                self._input = self._open()
                continue
            late = time.monotonic() > give_up  # the pipeline is stuck: write anyway, the hub counts the loss
            if not late and inp.backlog + seconds * SAMPLE_RATE > inp.capacity * 3 // 4:
                await asyncio.sleep(0.01)  # the pipeline has not read the ring yet
                continue
            if inp.write(samples, rate) or late or inp.closing:
                return
            await asyncio.sleep(seconds / 2)  # faster than the hub's flood limit (2x real time): slow down

    def stream_ms(self, event: WakeEvent) -> int:
        """Milliseconds of this stream's audio up to the end of the event's keyword."""
        return round(self._base * 1000 / SAMPLE_RATE + event.end * 1000)

    def close(self, done: Callable[[], None] | None = None) -> None:
        """End the stream; ``done`` runs once its last audio is decided and the site is gone (on the pipeline
        thread, or at once when the hub had already dropped it)."""
        if self.closed:
            return
        self.closed = True
        self._input.close(done)


class _LimitedReader:
    """The connection's reader as ``async_read_event`` sees it, refusing lines, blocks and payloads above
    ``limit`` bytes (the library itself would read a payload of any announced length)."""

    def __init__(self, reader: asyncio.StreamReader, limit: int) -> None:
        self._reader = reader
        self.limit = limit
        self.problem = ""
        self.last_line = b""

    async def readline(self) -> bytes:
        try:
            line = await self._reader.readline()
        except ValueError as exc:  # longer than the stream's buffer limit
            self.problem = "an event header line over 64 KiB"
            raise ProtocolError(self.problem) from exc
        self.last_line = line
        return line

    async def readexactly(self, n: int) -> bytes:
        if not isinstance(n, int) or n > self.limit:
            self.problem = f"event announces {n!r} bytes of data or payload (wyoming.max_event_bytes is {self.limit})"
            raise ProtocolError(self.problem)
        return await self._reader.readexactly(n)


def _audio_format(data: dict[str, Any], what: str) -> tuple[int, int, int]:
    """(rate, width, channels) of an audio event, checked."""
    try:
        rate, width, channels = data["rate"], data["width"], data["channels"]
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"{what} needs rate, width and channels") from exc
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (rate, width, channels)):
        raise ProtocolError(f"{what}: rate, width and channels must be integers, got {rate!r}, {width!r}, "
                            f"{channels!r}")
    if not _RATES[0] <= rate <= _RATES[1]:
        raise ProtocolError(f"{what}: rate {rate} Hz is outside {_RATES[0]}..{_RATES[1]}")
    if width not in _WIDTHS:
        raise ProtocolError(f"{what}: width {width} bytes is not 1, 2, 3 or 4")
    if not 1 <= channels <= _MAX_CHANNELS:
        raise ProtocolError(f"{what}: {channels} channels is outside 1..{_MAX_CHANNELS}")
    return rate, width, channels


class _Stream:
    """One ``audio-start`` .. ``audio-stop`` of a connection."""

    def __init__(self, remote: RemoteStream, rate: int, width: int, channels: int) -> None:
        self.remote = remote
        self.rate, self.width, self.channels = rate, width, channels
        self.converter = AudioChunkConverter(width=2)  # sample width only; channels and rate are done here
        self.detections = 0


class WyomingHandler(AsyncEventHandler):
    """One client connection."""

    def __init__(self, server: WyomingServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.server = server
        peer = writer.get_extra_info("peername")
        self.host = str(peer[0]) if isinstance(peer, tuple) and peer else "local"
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else self.host
        self._limited = _LimitedReader(reader, server.settings.max_event_bytes)
        self.names: set[str] | None = None
        self.stream: _Stream | None = None
        self._stopping: _Stream | None = None  # the stream an audio-stop is finishing
        self._writes: set[asyncio.Task[None]] = set()

    # -- connection --------------------------------------------------------------------------------------------

    async def run(self) -> None:
        if not self.server.admit(self):
            await self._refuse()
            return
        log.info("wyoming: client %s connected", self.peer)
        reason = "disconnected"
        try:
            while True:
                try:
                    event = await async_read_event(self._limited)  # type: ignore[arg-type]
                except (asyncio.IncompleteReadError, ConnectionError):
                    event = None
                except ProtocolError:
                    event = None
                except Exception as exc:  # a header that parses as JSON but is no event (no type, not a mapping)
                    self._limited.problem = f"not a Wyoming event ({describe(exc)})"
                    event = None
                if event is None:
                    if not self._limited.problem and self._limited.last_line.strip():
                        self._limited.problem = "not a Wyoming event (invalid JSON header)"
                    break
                try:
                    if not await self.handle_event(event):
                        break
                except ProtocolError as exc:
                    self._limited.problem = f"{event.type}: {exc}"
                    break
                except StreamRefused as exc:
                    reason = "refused"
                    log.warning("wyoming: client %s: stream refused: %s; closing the connection", self.peer, exc)
                    with contextlib.suppress(ConnectionError, OSError):
                        await self.write_event(Error(text=f"kwsd: {exc}", code="stream-refused").event())
                    break
                except (ConnectionError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # a field of the wrong type deep in an event: this connection only
                    log.debug("wyoming: client %s: %s event failed", self.peer, event.type, exc_info=exc)
                    self._limited.problem = f"an unusable {event.type} event ({describe(exc)})"
                    break
            if self._limited.problem:
                reason = "closed"
                log.warning("wyoming: client %s sent %s; closing the connection", self.peer, self._limited.problem)
        except ConnectionError:
            pass
        finally:
            await self.disconnect()
            self.writer.close()
            self.server.leave(self)
            log.info("wyoming: client %s %s", self.peer, reason)

    async def _refuse(self) -> None:
        text = f"kwsd: too many clients ({self.server.settings.max_clients}, wyoming.max_clients); try again later"
        with contextlib.suppress(ConnectionError, OSError):
            await self.write_event(Error(text=text, code="too-many-clients").event())
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def disconnect(self) -> None:
        """Connection gone (or being closed): end the stream without waiting for the pipeline."""
        if self.stream is not None:
            self._end_stream(self.stream)
            self.stream = None
        for task in list(self._writes):
            task.cancel()

    # -- events ------------------------------------------------------------------------------------------------

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(wyoming_info(self.server.detector_settings()).event())
        elif Detect.is_type(event.type):
            names = event.data.get("names") if isinstance(event.data, dict) else None
            if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
                raise ProtocolError(f"names must be a list of strings, got {names!r}")
            self.names = self.server.resolve_names(names, self.peer)
        elif AudioStart.is_type(event.type):
            rate, width, channels = _audio_format(event.data, "audio-start")
            if self.stream is not None:  # a new stream without audio-stop: the old one's name is reused
                stream, self.stream = self.stream, None
                await self._finish(stream)
            self.stream = self._start_stream(rate, width, channels)
        elif AudioChunk.is_type(event.type):
            await self._chunk(event)
        elif AudioStop.is_type(event.type):
            if self.stream is not None:
                stream, self.stream = self.stream, None
                await self._stop_stream(stream)
            else:
                await self.write_event(NotDetected().event())
        elif Ping.is_type(event.type):
            await self.write_event(Pong(text=Ping.from_event(event).text).event())
        else:
            log.debug("wyoming: client %s sent %s; ignored", self.peer, event.type)
        return True

    def _start_stream(self, rate: int, width: int, channels: int) -> _Stream:
        site = self.server.claim_site(self.host)
        try:
            remote = RemoteStream(self.server.daemon, site)
        except RemoteRefused as exc:
            self.server.release(site, None)
            raise StreamRefused(str(exc)) from exc
        log.info("wyoming: client %s streams %d Hz, %d-bit, %d ch as site %s", self.peer, rate, 8 * width,
                 channels, site)
        stream = _Stream(remote, rate, width, channels)
        self.server.register(site, self, stream)
        return stream

    async def _chunk(self, event: Event) -> None:
        rate, width, channels = _audio_format(event.data, "audio-chunk")
        audio = event.payload or b""
        if len(audio) % (width * channels):
            raise ProtocolError(f"audio-chunk of {len(audio)} bytes is not whole {width * channels}-byte frames")
        stream = self.stream
        if stream is None:  # audio without audio-start: start a stream at the chunk's format
            stream = self.stream = self._start_stream(rate, width, channels)
        chunk = AudioChunk(rate=rate, width=width, channels=channels, audio=audio)
        converted = stream.converter.convert(chunk)
        samples = np.frombuffer(converted.audio, dtype="<i2")
        if channels > 1:
            samples = np.rint(samples.reshape(-1, channels).mean(axis=1)).astype(np.int16)
        await stream.remote.write(samples, rate)

    def _end_stream(self, stream: _Stream, done: Callable[[], None] | None = None) -> None:
        site = stream.remote.site

        def closed() -> None:  # pipeline thread
            self.server.release(site, stream)
            if done is not None:
                done()

        stream.remote.close(closed)

    async def _stop_stream(self, stream: _Stream) -> None:
        """``audio-stop``: let the pipeline decide the last audio, then answer ``not-detected`` if nothing fired."""
        await self._finish(stream)
        if stream.detections == 0:
            await self.write_event(NotDetected().event())

    async def _finish(self, stream: _Stream) -> None:
        """End a stream and wait until the pipeline has decided its last audio and dropped it."""
        loop = asyncio.get_running_loop()
        decided = loop.create_future()

        def settle() -> None:
            if not decided.done():
                decided.set_result(None)

        def done() -> None:  # pipeline thread; runs after the stream's last detections were put
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(settle)

        self._stopping = stream
        self._end_stream(stream, done)
        try:
            await asyncio.wait_for(decided, STOP_WAIT)
        except TimeoutError:
            log.warning("wyoming: site %s: the pipeline did not finish the stream within %.0f s", stream.remote.site,
                        STOP_WAIT)
        finally:
            self._stopping = None

    def on_wake(self, stream: _Stream, event: WakeEvent) -> None:
        """Loop thread: a detection on one of this connection's streams."""
        if stream is not self.stream and stream is not self._stopping:
            return  # a stream the client has already ended (a new audio-start, or gone)
        if self.names is not None and event.wakeword_id not in self.names:
            log.info("wyoming: site %s heard %s, which this client did not ask for", stream.remote.site,
                     event.wakeword_id)
            return
        stream.detections += 1
        detection = Detection(name=event.wakeword_id, timestamp=stream.remote.stream_ms(event))
        task = asyncio.ensure_future(self._send(detection.event()))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _send(self, event: Event) -> None:
        try:
            await self.write_event(event)
        except (ConnectionError, OSError) as exc:
            log.info("wyoming: client %s: cannot send %s: %s", self.peer, event.type, describe(exc))


class WyomingServer:
    """The Wyoming TCP service on its own thread and event loop; a sink of the daemon's wake events."""

    def __init__(self, daemon: Daemon, settings: WyomingSettings, liveness: Liveness | None = None) -> None:
        self.daemon = daemon
        self.settings = settings
        self.liveness = liveness or Liveness()
        self.address: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._bind_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._handlers: set[WyomingHandler] = set()
        self._streams: dict[str, tuple[WyomingHandler, _Stream]] = {}
        self._sites_in_use: set[str] = set()  # claimed and not yet released by the pipeline
        self._refusals = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Listen on ``host:port``; a port that cannot be bound raises WyomingError naming the setting."""
        self._thread = supervise("wyoming", self._body, stop=self._stop, liveness=self.liveness, logger=log)
        if not self._bound.wait(timeout) or self._bind_error is not None:
            self.stop()
            err = self._bind_error
            why = describe(err) if err is not None else "timed out"
            raise WyomingError(f"wyoming.port: cannot listen on {self.settings.host}:{self.settings.port}: {why}")

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection (their streams end) and the listening socket, and join the thread."""
        self._stop.set()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: None)  # wake the loop
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _body(self, part: Part) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(part))
        finally:
            self._loop = None
            loop.close()

    async def _serve(self, part: Part) -> None:
        server = AsyncTcpServer(self.settings.host, self.settings.port)
        try:
            await server.start(lambda r, w: WyomingHandler(self, r, w))
        except OSError as exc:
            if not self._bound.is_set():  # at start-up: the caller reports it and stops
                self._bind_error = exc
                self._bound.set()
                self._stop.set()
                return
            raise
        sockets = getattr(server._server, "sockets", None) or ()
        if sockets:
            name = sockets[0].getsockname()
            self.address = (str(name[0]), int(name[1]))
        log.info("wyoming: listening on tcp://%s:%d (%d keywords)", *(self.address or ("?", 0)),
                 len(self.detector_settings().keywords))
        self._bound.set()
        announcement = await self._announce() if self.settings.zeroconf else None
        try:
            while not part.stopping:
                part.beat(2.0)
                await asyncio.sleep(0.2)
        finally:
            if announcement is not None:
                await self._withdraw(announcement)
            handlers = list(server._handlers)
            await server.stop()
            if handlers:
                await asyncio.wait(handlers, timeout=2.0)
            log.info("wyoming: stopped listening")

    async def _announce(self) -> Any:
        """Announce ``_wyoming._tcp`` over mDNS with the library's Home Assistant helper; a failure is logged and
        the service runs on without it (clients can still be pointed at host:port)."""
        from wyoming.zeroconf import HomeAssistantZeroconf  # imports the zeroconf package: only when wanted

        assert self.address is not None
        name = self.settings.zeroconf_name or f"kwsd-{socket.gethostname().split('.')[0]}"
        host = self.settings.host if _is_ipv4(self.settings.host) and self.settings.host != "0.0.0.0" else None
        try:
            announcement = HomeAssistantZeroconf(port=self.address[1], name=name, host=host)
            await announcement.register_server()
        except Exception as exc:  # no route for multicast, a name already taken, ...
            log.error("wyoming.zeroconf: cannot announce %s: %s", name, describe(exc))
            return None
        log.info("wyoming: announced as %s._wyoming._tcp.local. at %s:%d", name, announcement.host,
                 self.address[1])
        return announcement

    async def _withdraw(self, announcement: Any) -> None:
        """Say goodbye over mDNS, so Home Assistant forgets the service now rather than at the record's expiry."""
        aiozc = getattr(announcement, "_aiozc", None)  # the helper has no close of its own
        if aiozc is None:
            return
        try:
            await aiozc.async_unregister_all_services()
            await aiozc.async_close()
        except Exception as exc:
            log.info("wyoming.zeroconf: withdrawing the announcement failed: %s", describe(exc))

    # -- clients (loop thread) ---------------------------------------------------------------------------------

    def admit(self, handler: WyomingHandler) -> bool:
        if len(self._handlers) >= self.settings.max_clients:
            self._refusals += 1
            level = logging.WARNING if self._refusals == 1 or self._refusals % 100 == 0 else logging.DEBUG
            log.log(level, "wyoming: refusing client %s: %d clients connected (wyoming.max_clients); %d refused",
                    handler.peer, len(self._handlers), self._refusals)
            return False
        self._handlers.add(handler)
        return True

    def leave(self, handler: WyomingHandler) -> None:
        self._handlers.discard(handler)

    @property
    def clients(self) -> int:
        return len(self._handlers)

    def detector_settings(self) -> DetectorSettings:
        return self.daemon.settings.detector

    def resolve_names(self, names: list[str] | None, peer: str) -> set[str] | None:
        """Wake word ids a ``detect`` asks for (by id or phrase); None: every keyword."""
        if not names:
            return None
        keywords = self.detector_settings().keywords
        by_name = {kw.wakeword_id: kw.wakeword_id for kw in keywords}
        by_name.update({kw.phrase.replace(" ", ""): kw.wakeword_id for kw in keywords})
        wanted = {by_name[n.replace(" ", "")] for n in names if n.replace(" ", "") in by_name}
        unknown = [n for n in names if n.replace(" ", "") not in by_name]
        if unknown:
            log.warning("wyoming: client %s asked for unknown wake words %s (known: %s)", peer,
                        ", ".join(unknown), ", ".join(sorted(by_name)))
        return wanted

    def claim_site(self, host: str) -> str:
        """A siteId for a new stream from ``host``: its configured name, else ``wyoming-<host>``; ``-2``, ``-3``,
        ... while that is in use by another stream, a microphone or an MQTT satellite."""
        base = self.settings.sites.get(host) or f"wyoming-{host}"
        hub = self.daemon.hub
        others = set(hub.sites()) if hub is not None else set()
        with self._lock:
            name, n = base, 2
            while name in self._sites_in_use or name in others:
                name = f"{base}-{n}"
                n += 1
            self._sites_in_use.add(name)  # before the hub learns of it: mqtt_site must already know it is ours
        return name

    def register(self, site: str, handler: WyomingHandler, stream: _Stream) -> None:
        with self._lock:
            self._streams[site] = (handler, stream)

    def release(self, site: str, stream: _Stream | None) -> None:
        """The site's stream is gone (its last detections and segment handed on); its name can be reused."""
        with self._lock:
            if stream is not None and self._streams.get(site, (None, None))[1] is stream:
                del self._streams[site]
            self._sites_in_use.discard(site)

    @property
    def streams(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    # -- sink (pipeline thread) --------------------------------------------------------------------------------

    def put_wake(self, event: WakeEvent) -> None:
        """Hand a wake to the client whose stream heard it (non-blocking; other sites are ignored)."""
        with self._lock:
            entry = self._streams.get(event.site_id)
        loop = self._loop
        if entry is None or loop is None:
            return
        handler, stream = entry
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the client is gone
            loop.call_soon_threadsafe(handler.on_wake, stream, event)

    def put_segment(self, segment: Segment) -> None:
        """Segments are not part of the Wyoming wake protocol."""

    def mqtt_site(self, site: str) -> bool:
        """Whether a site's events go to MQTT: every site but this service's, unless ``publish_mqtt``. Any
        thread (a set lookup)."""
        return self.settings.publish_mqtt or site not in self._sites_in_use
