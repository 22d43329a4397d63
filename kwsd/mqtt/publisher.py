"""The publisher: wakes and segments to native, Hermes and Home Assistant topics; inbound Hermes/HA to callbacks.

Callers (the pipeline) hand wakes and segments over with ``put_wake`` / ``put_segment``: a bounded in-memory
queue and a wake-up of the connection thread, nothing else. Encoding (WAV), topic checks and the outbox's
SQLite writes happen on the connection thread (``kwsd.mqtt.connection``), so the disk and the network never
hold up audio. Inbound messages go through one table, topic filter -> handler, which also gives the
subscriptions. Toggle state and satellite audio belong to the caller: the publisher only reports them through
``on_toggle(site, enabled, reason)`` and ``satellite_audio(site, samples, rate)``.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as mqtt

from kwsd import __version__
from kwsd.lifecycle import Backoff, ErrorOnce, Liveness, describe
from kwsd.mqtt.connection import Connection, Session
from kwsd.mqtt.messages import (
    AudioFrame,
    HaEventDiscovery,
    HotwordDetected,
    HotwordError,
    HotwordToggle,
    MessageError,
    SegmentAnnouncement,
    WakeEvent,
    check_publish_topic,
    check_site_id,
    check_topic_part,
    ha_event_payload,
)
from kwsd.mqtt.outbox import Kind, Outbox
from kwsd.settings import MqttSettings

if TYPE_CHECKING:
    from kwsd.segments import Segment

log = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
HANDOFF_ITEMS = 1024
"""Wakes and segments waiting for the connection thread; beyond this the oldest segment (else the new item) goes."""
HANDOFF_BYTES = 64 * 1024 * 1024
"""Audio bytes of the segments waiting for the connection thread."""
MAX_REASON = 256
"""Longest Hermes toggle reason accepted, characters."""
ERROR_ANSWERS_PER_SECOND = 10.0
"""Rate of ``hermes/error/hotword`` answers to bad inbound messages (a burst of twice this is allowed)."""

HA_REANNOUNCE_INTERVAL = 1.0
"""Seconds within which further Home Assistant birth messages do not announce the discovery again."""

ToggleCallback = Callable[[str, bool, str], None]
"""``on_toggle(site, enabled, reason)``: ``enabled`` is True for ``toggleOn``, False for ``toggleOff``."""
AudioCallback = Callable[[str, np.ndarray, int], None]
"""``satellite_audio(site, samples, rate)``: int16 mono samples at ``rate`` Hz from a remote satellite."""
Handler = Callable[[str, bytes], None]
FeedbackCallback = Callable[[str, bytes], None]
"""``on_feedback(site, payload)`` of ``<prefix>/<siteId>/feedback``; a MessageError it raises is answered on the
error topic."""
FEEDBACK = "feedback"
"""Last level of the inbound review verdict topic ``<prefix>/<siteId>/feedback``."""


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
    """Messages dropped: by the outbox or hand-over bound, or because their topic cannot be published."""
    outbox_depth: int
    outbox_bytes: int
    inbound_errors: int
    """Inbound messages rejected as malformed."""
    dead_lettered: int = 0
    """Messages the broker refused, set aside so that the rest is delivered."""
    outbox_errors: int = 0
    """Outbox disk operations that failed (survived: messages kept in memory meanwhile)."""
    pending: int = 0
    """Wakes and segments handed over and not yet in the outbox."""


@dataclass(frozen=True)
class _Item:
    kind: str
    """``wake``, ``segment`` or ``error``."""
    value: Any
    size: int


class Publisher:
    """Publishes wakes and segments to the broker and turns inbound Hermes/HA messages into callbacks.

    ``on_toggle`` and ``satellite_audio`` run on the connection thread; keep them short (copy the audio into
    a ring and return). Exceptions they raise are logged once, never propagated. Pass the daemon's ``outbox``
    to keep one outbox across publishers (a reload); without one the publisher opens its own in
    ``outbox_dir`` and closes it at ``stop()``.
    """

    def __init__(
        self,
        settings: MqttSettings,
        outbox_dir: Path | None = None,
        sites: Sequence[str] = (),
        stop: threading.Event | None = None,
        *,
        outbox: Outbox | None = None,
        liveness: Liveness | None = None,
        on_toggle: ToggleCallback | None = None,
        satellite_audio: AudioCallback | None = None,
        on_feedback: FeedbackCallback | None = None,
        name: str = "mqtt",
        restart_backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        if outbox is None:
            if outbox_dir is None:
                raise ValueError("Publisher needs an outbox or an outbox_dir")
            outbox = Outbox(outbox_dir, settings.outbox.max_bytes)
            self._owns_outbox = True
        else:
            self._owns_outbox = False
        self.outbox = outbox
        self.on_toggle: ToggleCallback | None = on_toggle
        self.satellite_audio: AudioCallback | None = satellite_audio
        self._on_feedback_cb: FeedbackCallback | None = on_feedback
        self.liveness = liveness if liveness is not None else Liveness()
        self.client_id = settings.client_id or f"kwsd-{socket.gethostname()}"
        self._lock = threading.Lock()
        self._sites: tuple[str, ...] = tuple(check_topic_part(s, "site") for s in sites)
        self._announced: tuple[str, ...] = ()
        self._unavailable: set[str] = set()
        self._announce_pending = False
        self._summary: bytes | None = None
        self._summary_pending = False
        self._handoff: collections.deque[_Item] = collections.deque()
        self._handoff_bytes = 0
        self._handoff_dropped = 0
        self._handoff_full = ErrorOnce(log, "MQTT hand-over queue")
        self._rejected = 0
        self._reject_errors = ErrorOnce(log, "MQTT not publishing")
        self._callback_errors = ErrorOnce(log, "MQTT callback")
        self._inbound_errors = 0
        self._last_warning = 0.0
        self._error_tokens = 2 * ERROR_ANSWERS_PER_SECOND
        self._error_time = time.monotonic()
        self._ha_online_at = -HA_REANNOUNCE_INTERVAL
        self._routes, self._wild_routes = self._make_routes()
        self.connection = Connection(
            settings,
            outbox,
            self,
            client_id=self.client_id,
            will=(self.status_topic, OFFLINE),
            liveness=self.liveness,
            name=name,
            stop=stop,
            restart_backoff=restart_backoff,
        )

    @property
    def on_feedback(self) -> FeedbackCallback | None:
        """Receiver of ``<prefix>/<siteId>/feedback`` verdicts; the topic is subscribed only while there is one
        (set it before ``start``)."""
        return self._on_feedback_cb

    @on_feedback.setter
    def on_feedback(self, callback: FeedbackCallback | None) -> None:
        self._on_feedback_cb = callback
        self._routes, self._wild_routes = self._make_routes()

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self.connection.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Deliver what can be delivered within ``timeout`` seconds, publish ``offline``, disconnect.

        What is still queued stays in the outbox for the next start.
        """
        self.connection.stop(timeout)
        self.on_wake(None)  # the connection never ran or died: still keep what was handed over
        if self._owns_outbox:
            self.outbox.close()

    @property
    def alive(self) -> bool:
        """The connection thread runs."""
        return self.connection.alive

    @property
    def connected(self) -> bool:
        return self.connection.connected

    @property
    def state(self) -> str:
        return self.connection.state

    @property
    def counters(self) -> PublisherCounters:
        ob = self.outbox
        return PublisherCounters(
            connected=self.connected,
            state=self.state,
            reconnects=self.connection.reconnects,
            published=self.connection.published,
            dropped=ob.dropped + self._handoff_dropped + self._rejected,
            outbox_depth=ob.depth,
            outbox_bytes=ob.size_bytes,
            inbound_errors=self._inbound_errors,
            dead_lettered=ob.dead_letters,
            outbox_errors=ob.errors,
            pending=len(self._handoff),
        )

    # ---- outbound API (any thread; non-blocking, never raises) -------------------------------------------

    def put_wake(self, event: WakeEvent) -> None:
        """Hand the wake over for the native topic, Hermes ``hotword/<id>/detected`` and the HA event entity."""
        self._hand_over(_Item("wake", event, 0))

    def put_segment(self, segment: Segment) -> None:
        """Hand the segment over: its WAV on ``<prefix>/<siteId>/segment/<sessionId>``, then the announcement."""
        try:
            size = int(segment.samples.nbytes)
        except Exception:
            size = 0
        self._hand_over(_Item("segment", segment, size))

    publish_wake = put_wake
    publish_segment = put_segment

    def publish_error(self, error: str, context: str | None = None, site: str = "default") -> None:
        """Report a problem on ``hermes/error/hotword`` (QoS 0, only while connected)."""
        if self.settings.hermes:
            self._hand_over(_Item("error", HotwordError(error=error, context=context, site_id=site), 0))

    def _hand_over(self, item: _Item) -> None:
        try:
            with self._lock:
                while self._handoff and (
                    len(self._handoff) >= HANDOFF_ITEMS or self._handoff_bytes + item.size > HANDOFF_BYTES
                ):
                    victim = next((i for i in self._handoff if i.kind == "segment"), None)
                    if victim is None:
                        break
                    self._handoff.remove(victim)
                    self._handoff_bytes -= victim.size
                    self._handoff_dropped += 1
                    self._handoff_full.error(f"full ({HANDOFF_ITEMS} items): dropped the oldest segment")
                if len(self._handoff) >= HANDOFF_ITEMS or self._handoff_bytes + item.size > HANDOFF_BYTES:
                    self._handoff_dropped += 1
                    self._handoff_full.error(f"full ({HANDOFF_ITEMS} items): dropped a new {item.kind}")
                    return
                self._handoff.append(item)
                self._handoff_bytes += item.size
            self.connection.wake()
        except Exception as exc:  # the caller is the audio path: nothing may reach it
            self._handoff_full.error(describe(exc), exc)

    def update_sites(self, sites: Sequence[str]) -> None:
        """Change the announced sites; discovery and availability are re-announced (removed sites withdrawn).

        Only sites named here get a Home Assistant entity (a satellite once the daemon accepted it).
        """
        good = []
        for site in sites:
            try:
                good.append(check_topic_part(site, "site"))
            except MessageError as exc:
                log.error("MQTT not announcing %s", exc)
        with self._lock:
            self._sites = tuple(good)
            self._announce_pending = True
        self.connection.wake()

    def set_site_available(self, site: str, available: bool) -> None:
        """Mark a site's retained ``<prefix>/<siteId>/status`` (e.g. its microphone was unplugged)."""
        with self._lock:
            if available:
                self._unavailable.discard(site)
            else:
                self._unavailable.add(site)
            self._announce_pending = True
        self.connection.wake()

    def set_summary(self, summary: Mapping[str, Any]) -> None:
        """The daemon's figures as retained JSON on ``<prefix>/summary``; sent when they change. Any thread."""
        payload = json.dumps(summary, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8")
        with self._lock:
            if payload == self._summary:
                return
            self._summary = payload
            self._summary_pending = True
        self.connection.wake()

    # ---- topics -------------------------------------------------------------------------------------------

    @property
    def status_topic(self) -> str:
        return f"{self.settings.prefix}/status"

    @property
    def summary_topic(self) -> str:
        return f"{self.settings.prefix}/summary"

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

    # ---- the connection's owner (connection thread) --------------------------------------------------------

    def subscriptions(self) -> list[str]:
        return [*self._routes, *(f for f, _ in self._wild_routes)]

    def on_connected(self, session: Session) -> None:
        session.send(self.status_topic, ONLINE, qos=1, retain=True)
        self._announce(session)
        with self._lock:
            summary, self._summary_pending = self._summary, False
        if summary is not None:
            session.send(self.summary_topic, summary, qos=0, retain=True)

    def on_closing(self, session: Session) -> list[mqtt.MQTTMessageInfo]:
        infos = [session.send(self.site_status_topic(site), OFFLINE, qos=1, retain=True) for site in self._announced]
        infos.append(session.send(self.status_topic, OFFLINE, qos=1, retain=True))
        return [i for i in infos if i is not None]

    def on_wake(self, session: Session | None) -> None:
        """Move what was handed over into the outbox (encoding it), send error answers, re-announce."""
        with self._lock:
            items = list(self._handoff)
            self._handoff.clear()
            self._handoff_bytes = 0
            announce = self._announce_pending and session is not None
            if announce:
                self._announce_pending = False
            summary = self._summary if self._summary_pending and session is not None else None
            if summary is not None:
                self._summary_pending = False
        for item in items:
            try:
                if item.kind == "wake":
                    self._store_wake(item.value)
                elif item.kind == "segment":
                    self._store_segment(item.value)
                elif session is not None:
                    session.send(HotwordError.TOPIC, item.value.to_payload(), qos=0)
            except Exception as exc:  # a bad event must not take the connection down
                self._rejected += 1
                self._reject_errors.error(f"a {item.kind}: {describe(exc)}", exc)
        if announce and session is not None:
            self._announce(session)
        if summary is not None and session is not None:
            session.send(self.summary_topic, summary, qos=0, retain=True)

    def _put(self, topic: str, payload: bytes, qos: int, kind: Kind = "event") -> None:
        try:
            check_publish_topic(topic)
        except MessageError as exc:
            self._rejected += 1
            self._reject_errors.error(str(exc), context=" (message dropped; check the siteId and wake word id)")
            return
        self.outbox.put(topic, payload, qos, kind=kind)

    def _store_wake(self, event: WakeEvent) -> None:
        s = self.settings
        self._put(WakeEvent.topic(s.prefix, event.site_id), event.to_payload(), s.qos)
        if s.hermes:
            detected = HotwordDetected(
                model_id=event.wakeword_id,
                site_id=event.site_id,
                model_version=__version__,
                model_type="universal",
                current_sensitivity=round(1.0 - event.threshold, 6),
                session_id=event.session_id,
            )
            self._put(HotwordDetected.topic(event.wakeword_id), detected.to_payload(), s.qos)
        if s.home_assistant.enabled:
            self._put(self._ha_state_topic(event.site_id), ha_event_payload(event), s.qos)

    def _store_segment(self, segment: Segment) -> None:
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
        self._put(wav_topic, wav, s.qos, kind="segment")
        self._put(SegmentAnnouncement.topic_for(s.prefix, segment.site), announcement.to_payload(), s.qos)

    def _announce(self, session: Session) -> None:
        """Retained per-site availability and HA discovery; withdraw sites that are gone."""
        with self._lock:
            sites, unavailable = self._sites, set(self._unavailable)
        ha = self.settings.home_assistant.enabled
        for site in self._announced:
            if site not in sites:
                session.send(self.site_status_topic(site), OFFLINE, qos=1, retain=True)
                if ha:
                    session.send(self.discovery(site).topic(), b"", qos=1, retain=True)
        for site in sites:
            if ha:
                d = self.discovery(site)
                session.send(d.topic(), d.to_payload(), qos=1, retain=True)
            status = OFFLINE if site in unavailable else ONLINE
            session.send(self.site_status_topic(site), status, qos=1, retain=True)
        self._announced = sites

    # ---- inbound (connection thread) -----------------------------------------------------------------------

    def _make_routes(self) -> tuple[dict[str, Handler], list[tuple[str, Handler]]]:
        """Topic filter -> handler: the subscriptions and the dispatch in one table."""
        s = self.settings
        routes: dict[str, Handler] = {}
        if s.hermes:
            routes[HotwordToggle.TOPIC_ON] = partial(self._on_toggle_message, True)
            routes[HotwordToggle.TOPIC_OFF] = partial(self._on_toggle_message, False)
        if s.home_assistant.enabled:
            routes[f"{s.home_assistant.discovery_prefix}/status"] = self._on_ha_status
        wild: list[tuple[str, Handler]] = []
        if self.on_feedback is not None:
            wild.append((f"{s.prefix}/+/{FEEDBACK}", self._on_feedback))
        if s.satellites.enabled:
            if s.satellites.sites:
                for site in s.satellites.sites:
                    routes[AudioFrame.topic(site)] = self._on_audio_frame
            else:
                wild.append((AudioFrame.topic("+"), self._on_audio_frame))
        return routes, wild

    def on_message(self, topic: str, payload: bytes) -> None:
        handler = self._routes.get(topic)
        if handler is None:
            handler = next((h for f, h in self._wild_routes if mqtt.topic_matches_sub(f, topic)), None)
        if handler is None:
            log.debug("MQTT ignoring message on %r", topic[:200])
            return
        try:
            handler(topic, payload)
        except MessageError as exc:
            self._inbound_error(topic, str(exc))
        except Exception as exc:  # a bug in a handler must not end the connection
            self._callback_errors.error(f"handling a message failed: {describe(exc)}", exc, f" (on {topic[:200]!r})")
            self._inbound_error(topic, f"internal error: {describe(exc)}")

    def _call(self, what: str, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception as exc:  # the receiver's problem: log it once, keep the connection
            self._callback_errors.error(f"{what} failed: {describe(exc)}", exc)

    def _on_toggle_message(self, enabled: bool, topic: str, payload: bytes) -> None:
        toggle = HotwordToggle.from_payload(payload, enabled=enabled)
        what = "hermes hotword " + ("toggleOn" if enabled else "toggleOff")
        check_site_id(toggle.site_id, f"{what}: siteId")
        if len(toggle.reason) > MAX_REASON or not toggle.reason.isprintable():
            raise MessageError(f"{what}: reason must be at most {MAX_REASON} printable characters")
        log.debug("%s for site %s (reason %r)", what, toggle.site_id, toggle.reason)
        if self.on_toggle is not None:
            self._call("on_toggle", self.on_toggle, toggle.site_id, enabled, toggle.reason)

    def _on_ha_status(self, topic: str, payload: bytes) -> None:
        if payload.strip() != ONLINE:
            return
        now = time.monotonic()
        if now - self._ha_online_at < HA_REANNOUNCE_INTERVAL:
            return  # the discovery is retained: a burst of birth messages needs one announcement
        self._ha_online_at = now
        log.info("Home Assistant is online: re-announcing discovery")
        with self._lock:
            self._announce_pending = True

    def _on_audio_frame(self, topic: str, payload: bytes) -> None:
        s = self.settings.satellites
        site = check_site_id(AudioFrame.site_from_topic(topic), "hermes audioFrame: siteId")
        if s.sites and site not in s.sites:
            return
        samples, rate = AudioFrame.from_payload(payload, site_id=site, max_bytes=s.max_frame_bytes).mono()
        if self.satellite_audio is not None and len(samples):
            self._call("satellite_audio", self.satellite_audio, site, samples, rate)

    def _feedback_site(self, topic: str) -> str:
        return topic[len(self.settings.prefix) + 1 : -len(FEEDBACK) - 1]

    def _on_feedback(self, topic: str, payload: bytes) -> None:
        site = check_site_id(self._feedback_site(topic), "feedback: siteId")
        if self.on_feedback is not None:
            self.on_feedback(site, payload)  # MessageError: answered on the error topic

    def _inbound_error(self, topic: str, problem: str) -> None:
        self._inbound_errors += 1
        now = time.monotonic()
        level = logging.WARNING if now - self._last_warning > 5.0 else logging.DEBUG
        if level == logging.WARNING:
            self._last_warning = now
        log.log(
            level,
            "MQTT rejected message on %r: %s (%d rejected so far)",
            topic[:200],
            problem,
            self._inbound_errors,
        )
        self._error_tokens = min(
            2 * ERROR_ANSWERS_PER_SECOND, self._error_tokens + (now - self._error_time) * ERROR_ANSWERS_PER_SECOND
        )
        self._error_time = now
        if self._error_tokens < 1.0:
            return  # a flood of bad messages gets answers at a bounded rate
        self._error_tokens -= 1.0
        site = "default"
        parts = topic.split("/")
        if len(parts) == 4 and parts[:2] == ["hermes", "audioServer"]:
            try:
                site = check_site_id(parts[2])
            except MessageError:
                pass
        elif parts[-1] == FEEDBACK and topic.startswith(f"{self.settings.prefix}/"):
            try:
                site = check_site_id(self._feedback_site(topic))
            except MessageError:
                pass
        self.publish_error(problem[:500], context=topic[:200], site=site)
