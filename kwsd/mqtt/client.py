"""The MQTT publisher: one connection loop with backoff, an on-disk outbox, Hermes and Home Assistant topics.

One thread owns the broker connection. Each attempt builds a fresh paho client (so nothing from a dead
session is replayed behind the outbox's back), connects, subscribes, announces retained state and then
drives paho's network loop itself while feeding the outbox into the connection. Callers (detector, segment
recorder) only append to the outbox: publishing never blocks audio and nothing queued is lost when the
broker or the daemon restarts.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as mqtt

from kwsd import __version__
from kwsd.audio.resample import StreamResampler
from kwsd.mqtt.messages import (
    SAMPLE_RATE,
    AudioFrame,
    HaEventDiscovery,
    HotwordDetected,
    HotwordError,
    HotwordToggle,
    MessageError,
    SegmentAnnouncement,
    WakeEvent,
    check_topic_part,
    ha_event_payload,
)
from kwsd.mqtt.outbox import Outbox
from kwsd.pipeline import ToggleState
from kwsd.settings import ConfigError, MqttSettings

if TYPE_CHECKING:
    from kwsd.segments import Segment

log = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
_LOOP_TIMEOUT = 0.02
"""Seconds paho's select waits per turn; bounds the delay between queuing a message and sending it."""
_MAX_SATELLITE_STREAMS = 256
"""Satellite sites whose resampler state is kept; the least recently heard one is forgotten beyond this."""


@dataclass(frozen=True)
class PublisherCounters:
    connected: bool
    state: str
    """``starting``, ``connecting``, ``connected``, ``stopped`` or ``error: <what is wrong>``."""
    reconnects: int
    """Successful connections after the first."""
    published: int
    """Messages the broker acknowledged (QoS 1) or that were written (QoS 0)."""
    dropped: int
    """Messages dropped by the outbox bound."""
    outbox_depth: int
    outbox_bytes: int
    inbound_errors: int
    """Inbound messages rejected as malformed."""


@dataclass
class _SatelliteStream:
    """One satellite site's audio format and the resampler carrying its filter state from frame to frame."""

    rate: int
    channels: int
    resampler: StreamResampler


class _Connection:
    """State of one broker connection (one paho client); lives on the publisher's thread."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.connack: bool = False
        self.refused: str = ""
        self.lost: bool = False
        self.sent_upto = 0
        self.inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self.early_acks: set[int] = set()


class Publisher:
    """Publishes wakes and segments to the broker and turns inbound Hermes/HA messages into callbacks.

    ``on_toggle(site, enabled, reason)`` and ``on_audio(site, samples)`` run on the publisher's thread; keep
    them short (copy the audio into a ring and return). Exceptions they raise are logged, never propagated.
    """

    def __init__(
        self,
        settings: MqttSettings,
        outbox_dir: Path,
        sites: Sequence[str],
        stop: threading.Event | None = None,
        outbox: Outbox | None = None,
        toggles: ToggleState | None = None,
    ) -> None:
        self.settings = settings
        # An outbox passed in belongs to the caller (the daemon keeps one across publishers) and stays open.
        self._own_outbox = outbox is None
        self.outbox = outbox if outbox is not None else Outbox(outbox_dir, settings.outbox.max_bytes)
        self.toggles = toggles if toggles is not None else ToggleState()
        self.on_toggle: Callable[[str, bool, str], None] | None = None
        self.on_audio: Callable[[str, np.ndarray], None] | None = None
        self._sites: tuple[str, ...] = tuple(check_topic_part(s, "site") for s in sites)
        self._announced: tuple[str, ...] = ()
        self._unavailable: set[str] = set()
        self._external_stop = stop if stop is not None else threading.Event()
        self._halt = threading.Event()
        self._flush_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        self._state = "starting"
        self._connections = 0
        self._published = 0
        self._inbound_errors = 0
        self._announce_pending = threading.Event()
        self._last_warning = 0.0
        self._last_error = ""
        self.client_id = settings.client_id or f"kwsd-{socket.gethostname()}"
        self._satellites: dict[str, _SatelliteStream] = {}  # publisher thread only; oldest first

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="kwsd-mqtt", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Deliver what can be delivered within ``timeout`` seconds, publish ``offline``, disconnect.

        What is still queued stays in the outbox for the next start.
        """
        self._flush_deadline = time.monotonic() + timeout
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout + self.settings.connect_timeout + 2.0)
            if self._thread.is_alive():
                log.warning("MQTT thread did not stop within %.1f s", timeout)
            self._thread = None
        self._state = "stopped"
        if self._own_outbox:
            self.outbox.close()

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and conn.connack and not conn.lost

    @property
    def state(self) -> str:
        return self._state

    @property
    def counters(self) -> PublisherCounters:
        return PublisherCounters(
            connected=self.connected,
            state=self._state,
            reconnects=max(0, self._connections - 1),
            published=self._published,
            dropped=self.outbox.dropped,
            outbox_depth=self.outbox.depth,
            outbox_bytes=self.outbox.size_bytes,
            inbound_errors=self._inbound_errors,
        )

    # ---- outbound API (any thread) ----------------------------------------------------------------------

    def publish_wake(self, event: WakeEvent) -> None:
        """Queue the wake on the native topic, Hermes ``hotword/<id>/detected`` and the HA event entity."""
        s = self.settings
        self.outbox.put(WakeEvent.topic(s.prefix, event.site_id), event.to_payload(), s.qos)
        if s.hermes:
            detected = HotwordDetected(
                model_id=event.wakeword_id,
                site_id=event.site_id,
                model_version=__version__,
                model_type="universal",
                current_sensitivity=round(1.0 - event.threshold, 6),
                session_id=event.session_id,
            )
            self.outbox.put(HotwordDetected.topic(event.wakeword_id), detected.to_payload(), s.qos)
        if s.home_assistant.enabled:
            self.outbox.put(self._ha_state_topic(event.site_id), ha_event_payload(event), s.qos)

    def publish_segment(self, segment: Segment) -> None:
        """Queue the WAV on ``<prefix>/<siteId>/segment/<sessionId>``, then its JSON announcement."""
        s = self.settings
        wav = segment.to_wav()
        wav_topic = SegmentAnnouncement.wav_topic(s.prefix, segment.site, segment.session_id)
        announcement = SegmentAnnouncement(
            site_id=segment.site,
            session_id=segment.session_id,
            topic=wav_topic,
            start=segment.start_sample / segment.sample_rate,
            duration=segment.duration,
            pre_roll=segment.pre_roll,
            reason=segment.reason,
            sample_rate=segment.sample_rate,
            size=len(wav),
        )
        self.outbox.put(wav_topic, wav, s.qos, kind="segment")
        self.outbox.put(
            SegmentAnnouncement.topic_for(s.prefix, segment.site), announcement.to_payload(), s.qos
        )

    def publish_error(self, error: str, context: str | None = None, site: str = "default") -> None:
        """Report a problem on ``hermes/error/hotword`` (QoS 0, only while connected)."""
        if not self.settings.hermes:
            return
        payload = HotwordError(error=error, context=context, site_id=site).to_payload()
        conn = self._conn
        if conn is not None and conn.connack:
            conn.client.publish(HotwordError.TOPIC, payload, qos=0)

    def update_sites(self, sites: Sequence[str]) -> None:
        """Change the local sites; discovery and availability are re-announced (removed sites withdrawn)."""
        with self._lock:
            self._sites = tuple(check_topic_part(s, "site") for s in sites)
        self._announce_pending.set()

    def set_site_available(self, site: str, available: bool) -> None:
        """Mark a site's retained ``<prefix>/<siteId>/status`` (e.g. its microphone was unplugged)."""
        with self._lock:
            if available:
                self._unavailable.discard(site)
            else:
                self._unavailable.add(site)
        self._announce_pending.set()

    # ---- topics -------------------------------------------------------------------------------------------

    @property
    def status_topic(self) -> str:
        return f"{self.settings.prefix}/status"

    def site_status_topic(self, site: str) -> str:
        return f"{self.settings.prefix}/{site}/status"

    def _ha_state_topic(self, site: str) -> str:
        return f"{self.settings.prefix}/{site}/event"

    def discovery(self, site: str) -> HaEventDiscovery:
        ha = self.settings.home_assistant
        return HaEventDiscovery(
            discovery_prefix=ha.discovery_prefix,
            node_id=ha.node_id,
            site_id=site,
            state_topic=self._ha_state_topic(site),
            availability_topics=(self.status_topic, self.site_status_topic(site)),
            sw_version=__version__,
        )

    def _subscriptions(self) -> list[str]:
        s = self.settings
        topics = []
        if s.hermes:
            topics += [HotwordToggle.TOPIC_ON, HotwordToggle.TOPIC_OFF]
        if s.home_assistant.enabled:
            topics.append(f"{s.home_assistant.discovery_prefix}/status")
        if s.satellites.enabled:
            if s.satellites.sites:
                topics += [AudioFrame.topic(site) for site in s.satellites.sites]
            else:
                topics.append(AudioFrame.topic("+"))
        return topics

    # ---- the connection loop (publisher thread) ------------------------------------------------------------

    def _stopping(self) -> bool:
        if self._external_stop.is_set() and not self._halt.is_set():
            self._flush_deadline = time.monotonic() + 3.0
            self._halt.set()
        return self._halt.is_set()

    def _wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping() and time.monotonic() < end:
            self._halt.wait(min(0.1, max(0.0, end - time.monotonic())))

    def _run(self) -> None:
        s = self.settings
        delay = s.reconnect_min
        while not self._stopping():
            self._state = "connecting"
            try:
                conn = self._connect()
            except ConfigError as exc:
                self._set_error(str(exc))
            except (OSError, ssl.SSLError) as exc:
                self._set_error(self._describe_connect_error(exc))
            else:
                established = self._serve(conn)
                if established:
                    delay = s.reconnect_min
                if self._halt.is_set():
                    break
            log.debug("MQTT reconnect in %.1f s", delay)
            self._wait(delay)
            delay = min(delay * 2, s.reconnect_max)
        self._state = "stopped"

    def _set_error(self, message: str) -> None:
        if message != self._last_error:  # a repeated failure is logged once, not on every retry
            log.error("MQTT %s (retrying with backoff)", message)
        self._last_error = message
        self._state = f"error: {message}"

    def _describe_connect_error(self, exc: BaseException) -> str:
        s = self.settings
        where = f"broker {s.host}:{s.effective_port}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (
                f"TLS verification of {where} failed: "
                f"{exc.verify_message} (check mqtt.tls.ca_file, mqtt.host)"
            )
        if isinstance(exc, ssl.SSLError):
            return f"TLS handshake with {where} failed: {exc} (check mqtt.tls, mqtt.port)"
        if isinstance(exc, ConnectionRefusedError):
            return f"{where} refused the connection (check mqtt.host, mqtt.port; is the broker running?)"
        if isinstance(exc, socket.timeout | TimeoutError):
            return f"{where} did not answer within mqtt.connect_timeout={s.connect_timeout} s"
        if isinstance(exc, socket.gaierror):
            return f"cannot resolve mqtt.host={s.host!r}: {exc}"
        return f"cannot connect to {where}: {exc}"

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        client.connect_timeout = s.connect_timeout
        client.max_inflight_messages_set(s.outbox.max_inflight)
        client.max_queued_messages_set(0)
        if s.username:
            client.username_pw_set(s.username, s.read_password("mqtt") or None)
        if s.tls.active:
            client.tls_set_context(self._tls_context())
            client.tls_insecure_set(s.tls.insecure)
        client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        return client

    def _tls_context(self) -> ssl.SSLContext:
        tls = self.settings.tls
        tls.check_files("mqtt.tls", relative_too=True)
        ctx = ssl.create_default_context()
        if tls.ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=str(tls.ca_file))
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    "mqtt.tls.ca_file", f"cannot load CA certificates from {tls.ca_file}: {exc}"
                ) from exc
        if tls.cert_file is not None and tls.key_file is not None:
            try:
                ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    "mqtt.tls.cert_file",
                    f"cannot load {tls.cert_file} with key mqtt.tls.key_file={tls.key_file}: {exc}",
                ) from exc
        return ctx

    def _connect(self) -> _Connection:
        s = self.settings
        client = self._make_client()
        conn = _Connection(client)
        client.on_connect = lambda c, u, flags, rc, props: self._on_connect(conn, rc)
        client.on_disconnect = lambda c, u, flags, rc, props: self._on_disconnect(conn, rc)
        client.on_publish = lambda c, u, mid, rc, props: self._on_publish(conn, mid)
        client.on_message = lambda c, u, msg: self._on_message(msg)
        client.connect(s.host, s.effective_port, keepalive=s.keepalive)
        return conn

    def _serve(self, conn: _Connection) -> bool:
        """Run one connection until it is lost or the publisher stops; True when the broker accepted it."""
        s = self.settings
        client = conn.client
        deadline = time.monotonic() + s.connect_timeout
        established = False
        try:
            while True:
                rc = client.loop(timeout=_LOOP_TIMEOUT)
                if conn.refused:
                    self._set_error(conn.refused)
                    return False
                if rc != mqtt.MQTT_ERR_SUCCESS or conn.lost:
                    if established:
                        log.warning(
                            "MQTT connection to %s:%d lost (%s)",
                            s.host,
                            s.effective_port,
                            mqtt.error_string(rc) if rc != mqtt.MQTT_ERR_SUCCESS else "disconnected",
                        )
                        self._state = "connecting"
                    else:
                        self._set_error(
                            f"broker {s.host}:{s.effective_port} closed the connection during CONNECT"
                        )
                    return established
                if not conn.connack:
                    if time.monotonic() > deadline:
                        self._set_error(
                            f"broker {s.host}:{s.effective_port} sent no CONNACK within "
                            f"mqtt.connect_timeout={s.connect_timeout} s"
                        )
                        return False
                    continue
                if not established:
                    established = True
                    self._established(conn)
                if self._announce_pending.is_set():
                    self._announce_pending.clear()
                    self._announce(conn)
                self._pump(conn)
                if self._stopping():
                    self._finish(conn)
                    return True
        finally:
            if self._conn is conn:
                self._conn = None
            if not conn.lost:
                conn.lost = True
                client.disconnect()  # refused or timed out: close the socket (no-op when already closed)

    def _established(self, conn: _Connection) -> None:
        s = self.settings
        self._connections += 1
        self._conn = conn
        self._last_error = ""
        self._state = "connected"
        if self._connections == 1:
            log.info("MQTT connected to %s:%d as %s", s.host, s.effective_port, self.client_id)
        else:
            log.info(
                "MQTT reconnected to %s:%d (outbox: %d queued)", s.host, s.effective_port, self.outbox.depth
            )
        for topic in self._subscriptions():
            conn.client.subscribe(topic, qos=1)
        conn.client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        self._announce(conn)

    def _announce(self, conn: _Connection) -> None:
        """Retained per-site availability and HA discovery; withdraw sites that are gone."""
        with self._lock:
            sites, unavailable = self._sites, set(self._unavailable)
        client = conn.client
        for site in self._announced:
            if site not in sites:
                client.publish(self.site_status_topic(site), OFFLINE, qos=1, retain=True)
                if self.settings.home_assistant.enabled:
                    client.publish(self.discovery(site).topic(), b"", qos=1, retain=True)
        for site in sites:
            if self.settings.home_assistant.enabled:
                d = self.discovery(site)
                client.publish(d.topic(), d.to_payload(), qos=1, retain=True)
            status = OFFLINE if site in unavailable else ONLINE
            client.publish(self.site_status_topic(site), status, qos=1, retain=True)
        self._announced = sites

    def _pump(self, conn: _Connection) -> None:
        if self.outbox.newest_id <= conn.sent_upto:
            return  # nothing queued since the last send: no database query on an idle connection
        room = self.settings.outbox.max_inflight - len(conn.inflight)
        if room <= 0:
            return
        for msg in self.outbox.peek(conn.sent_upto, room):
            info = conn.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                log.debug("MQTT publish on %s not sent: %s", msg.topic, mqtt.error_string(info.rc))
                return
            conn.sent_upto = msg.id
            with self._lock:
                if info.mid in conn.early_acks:
                    conn.early_acks.discard(info.mid)
                    self._acked(msg.id)
                else:
                    conn.inflight[info.mid] = msg.id

    def _acked(self, row_id: int) -> None:
        self.outbox.ack(row_id)
        self._published += 1

    def _finish(self, conn: _Connection) -> None:
        """Stopping: flush the outbox until the deadline, publish offline, disconnect cleanly."""
        client = conn.client
        while time.monotonic() < self._flush_deadline and (self.outbox.depth or conn.inflight):
            if client.loop(timeout=_LOOP_TIMEOUT) != mqtt.MQTT_ERR_SUCCESS or conn.lost:
                return
            self._pump(conn)
        if self.outbox.depth:
            log.info("MQTT stopping with %d message(s) kept in the outbox", self.outbox.depth)
        infos = [
            client.publish(self.site_status_topic(site), OFFLINE, qos=1, retain=True)
            for site in self._announced
        ]
        infos.append(client.publish(self.status_topic, OFFLINE, qos=1, retain=True))
        end = time.monotonic() + 1.0
        while time.monotonic() < end and not all(i.is_published() for i in infos):
            if client.loop(timeout=_LOOP_TIMEOUT) != mqtt.MQTT_ERR_SUCCESS:
                break
        client.disconnect()
        client.loop(timeout=0.1)

    # ---- paho callbacks (publisher thread, inside client.loop) ---------------------------------------------

    def _on_connect(self, conn: _Connection, rc: Any) -> None:
        if not rc.is_failure:
            conn.connack = True
            return
        s = self.settings
        name = str(rc)
        if rc.value in (4, 5, 134, 135):  # bad user name or password / not authorised
            who = (
                f"mqtt.username={s.username!r}" if s.username else "anonymous login (mqtt.username is empty)"
            )
            conn.refused = (
                f"broker {s.host}:{s.effective_port} refused {who}: {name} "
                "(check mqtt.password/password_file)"
            )
        elif rc.value in (2, 133):
            conn.refused = (
                f"broker {s.host}:{s.effective_port} rejected mqtt.client_id={self.client_id!r}: {name}"
            )
        else:
            conn.refused = f"broker {s.host}:{s.effective_port} refused the connection: {name}"

    def _on_disconnect(self, conn: _Connection, rc: Any) -> None:
        conn.lost = True

    def _on_publish(self, conn: _Connection, mid: int) -> None:
        with self._lock:
            row = conn.inflight.pop(mid, None)
            if row is None:
                conn.early_acks.add(
                    mid
                )  # acknowledged before publish() returned its mid; or a status message
                if len(conn.early_acks) > 10000:
                    conn.early_acks.clear()
                return
            self._acked(row)

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        topic = "?"
        try:
            topic = msg.topic
            payload = bytes(msg.payload)
            self._dispatch(topic, payload)
        except MessageError as exc:
            self._inbound_error(topic, str(exc))
        except Exception as exc:
            log.exception("MQTT handling a message on %r failed", topic)
            self._inbound_error(topic, f"internal error: {exc}")

    def _inbound_error(self, topic: str, problem: str) -> None:
        self._inbound_errors += 1
        now = time.monotonic()
        level = logging.WARNING if now - self._last_warning > 5.0 else logging.DEBUG
        if level == logging.WARNING:
            self._last_warning = now
        log.log(
            level,
            "MQTT rejected message on %r: %s (%d rejected so far)",
            topic,
            problem,
            self._inbound_errors,
        )
        site = "default"
        if topic.startswith("hermes/audioServer/"):
            parts = topic.split("/")
            site = parts[2] if len(parts) > 2 else site
        self.publish_error(problem, context=topic, site=site)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        s = self.settings
        if topic in (HotwordToggle.TOPIC_ON, HotwordToggle.TOPIC_OFF) and s.hermes:
            toggle = HotwordToggle.from_payload(payload, enabled=topic == HotwordToggle.TOPIC_ON)
            if toggle.enabled:
                enabled = self.toggles.on(toggle.site_id, toggle.reason)
            else:
                enabled = self.toggles.off(toggle.site_id, toggle.reason)
            log.info(
                "hotword %s for site %s (reason %r): detection %s",
                "toggleOn" if toggle.enabled else "toggleOff",
                toggle.site_id,
                toggle.reason,
                "enabled" if enabled else "disabled",
            )
            if self.on_toggle is not None:
                self.on_toggle(toggle.site_id, enabled, toggle.reason)
            return
        if s.home_assistant.enabled and topic == f"{s.home_assistant.discovery_prefix}/status":
            if payload.strip() == ONLINE:
                log.info("Home Assistant is online: re-announcing discovery")
                self._announce_pending.set()
            return
        if s.satellites.enabled and topic.startswith("hermes/audioServer/"):
            site = AudioFrame.site_from_topic(topic)
            if s.satellites.sites and site not in s.satellites.sites:
                return
            frame = AudioFrame.from_payload(payload, site_id=site, max_bytes=s.satellites.max_frame_bytes)
            samples = self._satellite_samples(site, frame)
            if self.on_audio is not None and len(samples):
                self.on_audio(site, samples)
            return
        log.debug("MQTT ignoring message on %s", topic)


    def _satellite_samples(self, site: str, frame: AudioFrame) -> np.ndarray:
        """A satellite frame as 16 kHz mono int16, resampled with the filter state of the site's earlier frames
        (frame boundaries are seamless). A change of rate or channel count starts a new stream for the site."""
        data, rate, channels = frame.pcm()
        stream = self._satellites.pop(site, None)
        tail = np.zeros(0)
        if stream is None or (stream.rate, stream.channels) != (rate, channels):
            if stream is not None:
                log.info("satellite %s now sends %d Hz, %d ch (was %d Hz, %d ch)",
                         site, rate, channels, stream.rate, stream.channels)
                tail = stream.resampler.flush()  # the old stream's last samples
            stream = _SatelliteStream(rate, channels, StreamResampler(rate, SAMPLE_RATE, 1))
        self._satellites[site] = stream  # most recently heard last
        if len(self._satellites) > _MAX_SATELLITE_STREAMS:
            del self._satellites[next(iter(self._satellites))]
        mono = data.reshape(-1, channels).astype(np.float64).mean(axis=1)
        out = stream.resampler.process(mono)
        if tail.size:
            out = np.concatenate((tail, out))
        return np.clip(np.rint(out), -32768, 32767).astype(np.int16)
