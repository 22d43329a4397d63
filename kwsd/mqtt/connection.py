"""The broker connection: one supervised thread, paho's external loop on the socket, the outbox pump.

One thread owns the broker connection. Each attempt builds a fresh paho client (so nothing from a dead
session is replayed behind the outbox's back), connects (TLS, credentials), subscribes, lets its owner
announce retained state, then waits in ``select()`` on the paho socket and a wake-up socket: it wakes when
the broker sends something, when the socket can take more bytes, when another thread hands over work
(``wake()``), or on a timer of at least a second (keepalive, liveness beat, outbox retry). Idle means no
other wake-ups. Lost connections are retried with ``lifecycle.Backoff``; the thread itself runs under
``lifecycle.supervise``, so an unexpected error restarts it and a dead thread shows in ``Liveness``.

Everything that touches paho or the outbox happens on this thread. Messages the broker refuses (it closes
the connection on them) are found by resending the suspects one at a time and are set aside as dead
letters, so one bad message cannot block the queue.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from kwsd.lifecycle import RUNNING, WAITING, Backoff, ErrorOnce, Liveness, Part, supervise
from kwsd.mqtt.messages import MessageError, check_publish_topic
from kwsd.mqtt.outbox import Outbox, OutboxMessage
from kwsd.settings import ConfigError, MqttSettings

log = logging.getLogger(__name__)

MAX_TICK = 5.0
"""Longest sleep of an idle connection, seconds (keepalive checks, liveness beats, a stop set elsewhere)."""
MIN_TICK = 1.0
PROBE_WINDOW = 2.0
"""A connection lost within this many seconds of sending a lone suspect counts against that message."""
STRIKES = 2
"""Times a message, sent alone, must be followed by the broker closing the connection to be set aside."""


class ConnectionOwner(Protocol):
    """What the connection asks of the part that owns it (the publisher); all run on the connection thread."""

    def subscriptions(self) -> Sequence[str]:
        """Topic filters to subscribe to on every (re)connect."""
        ...

    def on_connected(self, session: Session) -> None:
        """The broker accepted a session: announce retained state."""
        ...

    def on_message(self, topic: str, payload: bytes) -> None:
        """An inbound message on a subscribed topic. Must not raise."""
        ...

    def on_wake(self, session: Session | None) -> None:
        """Take over what other threads handed in (into the outbox); ``session`` is None while disconnected."""
        ...

    def on_closing(self, session: Session) -> list[mqtt.MQTTMessageInfo]:
        """Stopping: publish the final retained state; the connection waits briefly for these."""
        ...


@dataclass
class Session:
    """One paho client from CONNECT to its loss; lives on the connection thread."""

    client: mqtt.Client
    connack: bool = False
    established: bool = False
    refused: str = ""
    lost: bool = False
    sent_upto: int = 0
    generation: int = 0
    inflight: dict[int, OutboxMessage] = field(default_factory=dict)
    """paho mid -> the outbox message awaiting its PUBACK."""
    sent_at: dict[int, float] = field(default_factory=dict)

    def send(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> mqtt.MQTTMessageInfo | None:
        """Publish outside the outbox (status, discovery, errors); a topic the broker would refuse is not sent."""
        try:
            check_publish_topic(topic)
            return self.client.publish(topic, payload, qos=qos, retain=retain)
        except (MessageError, ValueError, UnicodeError) as exc:
            log.error("MQTT not publishing on %r: %s", topic[:200], exc)
            return None


class Connection:
    """The broker connection loop; ``start()`` runs it on a supervised thread, ``stop()`` flushes and ends it."""

    def __init__(
        self,
        settings: MqttSettings,
        outbox: Outbox,
        owner: ConnectionOwner,
        *,
        client_id: str,
        will: tuple[str, bytes],
        liveness: Liveness,
        name: str = "mqtt",
        stop: threading.Event | None = None,
        restart_backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self._restart_backoff = restart_backoff or Backoff(1.0, 30.0)
        self.owner = owner
        self.client_id = client_id
        self.will = will
        self.liveness = liveness
        self.name = name
        self.tick = max(MIN_TICK, min(MAX_TICK, settings.keepalive / 3))
        self._external_stop = stop
        self._halt = threading.Event()
        self._flush_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._session: Session | None = None
        self._state = "starting"
        self._errors = ErrorOnce(log, "MQTT")
        self._connections = 0
        self._suspects: set[int] = set()
        self._strikes: dict[int, int] = {}
        self.published = 0
        """Outbox messages the broker acknowledged (QoS 1) or that were written (QoS 0)."""

    # ---- any thread -----------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = supervise(
            self.name,
            self._body,
            stop=self._halt,
            liveness=self.liveness,
            backoff=self._restart_backoff,
            beat_within=self.settings.connect_timeout + 2 * self.tick + 5.0,
            logger=log,
        )

    def stop(self, timeout: float = 3.0) -> None:
        """Deliver what can be delivered within ``timeout`` seconds, then disconnect and end the thread."""
        self._flush_deadline = time.monotonic() + timeout
        self._halt.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout + self.settings.connect_timeout + 2.0)
            if self._thread.is_alive():
                log.warning("MQTT thread did not stop within %.1f s", timeout)
                return  # it still uses the wake-up socket; it ends at its next turn
            self._thread = None
        self._state = "stopped"
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def wake(self) -> None:
        """Make the connection thread look at its hand-over queue now. Never blocks."""
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is already pending) or closed (stopped)
            pass

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def connected(self) -> bool:
        s = self._session
        return s is not None and s.established and not s.lost

    @property
    def state(self) -> str:
        """``starting``, ``connecting``, ``connected``, ``stopped`` or ``error: <what is wrong>``."""
        return self._state

    @property
    def reconnects(self) -> int:
        return max(0, self._connections - 1)

    # ---- the loop (connection thread) ------------------------------------------------------------------------

    def _stopping(self) -> bool:
        if self._external_stop is not None and self._external_stop.is_set() and not self._halt.is_set():
            self._flush_deadline = time.monotonic() + 3.0
            self._halt.set()
        return self._halt.is_set()

    def _body(self, part: Part) -> None:
        s = self.settings
        backoff = Backoff(s.reconnect_min, s.reconnect_max)
        try:
            while not self._stopping():
                self._state = "connecting"
                part.beat(within=s.connect_timeout + 2 * self.tick + 5.0, state=WAITING, detail="connecting")
                error = ""
                try:
                    session = self._open()
                except ConfigError as exc:
                    error = str(exc)
                except (OSError, ssl.SSLError) as exc:
                    error = self._describe_connect_error(exc)
                else:
                    error = self._serve(session, part)
                    if session.established:
                        backoff.reset()
                if self._halt.is_set():
                    break
                delay = backoff.next()
                if error:
                    self._state = f"error: {error}"
                    self._errors.error(error, context=f" (retrying in {delay:.1f} s)")
                part.beat(within=delay + s.connect_timeout + 2 * self.tick + 5.0, state=WAITING, detail=self._state)
                self._idle(delay, part)
        finally:
            self.owner.on_wake(None)  # what was handed over reaches the outbox even on the way out
            self._state = "stopped" if self._halt.is_set() else "error: the connection loop failed (restarting)"

    def _idle(self, seconds: float, part: Part) -> None:
        """Wait ``seconds`` between connection attempts, still moving handed-over work into the outbox."""
        end = time.monotonic() + seconds
        while not self._stopping():
            now = time.monotonic()
            if now >= end:
                return
            timeout = min(end - now, self.tick)
            retry = self.outbox.retry_at
            if retry is not None:
                timeout = min(timeout, max(0.0, retry - now))
            readable, _, _ = select.select([self._wake_r], [], [], timeout)
            if readable:
                self._drain_wake()
            self.owner.on_wake(None)
            self._retry_outbox()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _retry_outbox(self) -> None:
        retry = self.outbox.retry_at
        if retry is not None and time.monotonic() >= retry:
            self.outbox.retry()

    def _open(self) -> Session:
        s = self.settings
        client = self._make_client()
        session = Session(client)
        client.on_connect = lambda c, u, flags, rc, props: self._on_connect(session, rc)
        client.on_disconnect = lambda c, u, flags, rc, props: self._on_disconnect(session)
        client.on_publish = lambda c, u, mid, rc, props: self._on_publish(session, mid)
        client.on_message = lambda c, u, msg: self._on_message(msg)
        client.connect(s.host, s.effective_port, keepalive=s.keepalive)
        return session

    def _turn(self, session: Session, timeout: float) -> mqtt.MQTTErrorCode:
        """One wait in select() on the paho socket and the wake-up socket, then paho's reads and writes."""
        client = session.client
        sock = client.socket()
        if sock is None:
            return mqtt.MQTT_ERR_NO_CONN
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        wlist = [sock] if client.want_write() else []
        try:
            readable, writable, _ = select.select([sock, self._wake_r], wlist, [], 0.0 if pending else timeout)
        except (OSError, ValueError, TypeError):
            return mqtt.MQTT_ERR_CONN_LOST
        if self._wake_r in readable:
            self._drain_wake()
        rc = mqtt.MQTT_ERR_SUCCESS
        if sock in readable or pending:
            rc = client.loop_read()
        if rc == mqtt.MQTT_ERR_SUCCESS and writable and client.socket() is not None:
            rc = client.loop_write()
        return rc

    def _serve(self, session: Session, part: Part) -> str:
        """Run one session until it is lost or the connection stops; returns what went wrong ("" if nothing)."""
        s = self.settings
        client = session.client
        connack_deadline = time.monotonic() + s.connect_timeout
        next_misc = time.monotonic() + self.tick
        try:
            while True:
                if self._stopping():
                    if session.established:
                        self._finish(session)
                    return ""
                now = time.monotonic()
                timeout = next_misc - now
                if not session.connack:
                    timeout = min(timeout, connack_deadline - now)
                retry = self.outbox.retry_at
                if retry is not None:
                    timeout = min(timeout, retry - now)
                rc = self._turn(session, max(0.0, timeout))
                now = time.monotonic()
                if rc == mqtt.MQTT_ERR_SUCCESS and now >= next_misc:
                    rc = client.loop_misc()
                    next_misc = now + self.tick
                    part.beat(within=2 * self.tick + 5.0, state=RUNNING if session.established else WAITING)
                if session.refused:
                    return session.refused
                if rc != mqtt.MQTT_ERR_SUCCESS or session.lost:
                    return self._lost(session, rc)
                if not session.connack:
                    if now > connack_deadline:
                        return (
                            f"broker {s.host}:{s.effective_port} sent no CONNACK within "
                            f"mqtt.connect_timeout={s.connect_timeout} s"
                        )
                    continue
                if not session.established:
                    self._established(session, part)
                self._retry_outbox()
                self.owner.on_wake(session)
                self._pump(session)
        finally:
            if self._session is session:
                self._session = None
            if not session.lost:
                session.lost = True
                try:
                    client.disconnect()  # refused, timed out or failed: close the socket
                except Exception as exc:  # the socket is going away either way
                    log.debug("MQTT disconnect: %s", exc)

    def _established(self, session: Session, part: Part) -> None:
        s = self.settings
        session.established = True
        session.generation = self.outbox.generation
        self._connections += 1
        self._session = session
        self._state = "connected"
        self._errors.recovered(f"connected to {s.host}:{s.effective_port}")
        if self._connections == 1:
            log.info("MQTT connected to %s:%d as %s", s.host, s.effective_port, self.client_id)
        else:
            log.info("MQTT reconnected to %s:%d (outbox: %d queued)", s.host, s.effective_port, self.outbox.depth)
        part.beat(within=2 * self.tick + 5.0)
        for topic in self.owner.subscriptions():
            session.client.subscribe(topic, qos=1)
        self.owner.on_connected(session)

    def _lost(self, session: Session, rc: mqtt.MQTTErrorCode) -> str:
        s = self.settings
        if not session.established:
            return f"broker {s.host}:{s.effective_port} closed the connection during CONNECT"
        self._state = "connecting"
        log.warning(
            "MQTT connection to %s:%d lost (%s)",
            s.host,
            s.effective_port,
            mqtt.error_string(rc) if rc != mqtt.MQTT_ERR_SUCCESS else "disconnected",
        )
        self._blame(session)
        return ""

    def _blame(self, session: Session) -> None:
        """The connection was lost with messages unacknowledged: resend those one at a time, and set aside
        one that, sent alone, is followed by the loss of the connection ``STRIKES`` times."""
        if not session.inflight:
            return
        now = time.monotonic()
        if self._suspects and len(session.inflight) == 1:
            [(mid, msg)] = session.inflight.items()
            if now - session.sent_at.get(mid, 0.0) <= PROBE_WINDOW:
                strikes = self._strikes[msg.id] = self._strikes.get(msg.id, 0) + 1
                if strikes >= STRIKES:
                    self.outbox.dead_letter(
                        msg, f"the broker closed the connection each of the {strikes} times it was sent alone"
                    )
                    self._suspects.discard(msg.id)
                    del self._strikes[msg.id]
                    return
        self._suspects.update(m.id for m in session.inflight.values())

    def _pump(self, session: Session) -> None:
        if session.generation != self.outbox.generation:  # reopened: rows below sent_upto may be new to us
            session.generation = self.outbox.generation
            session.sent_upto = 0
        if self.outbox.newest_id <= session.sent_upto:
            return  # nothing queued since the last send: no database query on an idle connection
        window = 1 if self._suspects else self.settings.outbox.max_inflight
        room = window - len(session.inflight)
        if room <= 0:
            return
        inflight = {m.id for m in session.inflight.values()}
        for msg in self.outbox.peek(session.sent_upto, room):
            if msg.id in inflight:
                session.sent_upto = msg.id
                continue
            if self._suspects and msg.id > max(self._suspects):
                self._suspects.clear()  # the suspects were acknowledged, dropped or set aside
            try:
                check_publish_topic(msg.topic)
                info = session.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            except (MessageError, ValueError, UnicodeError) as exc:
                session.sent_upto = msg.id
                self.outbox.dead_letter(msg, f"the broker would refuse it: {exc}")
                continue
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                log.debug("MQTT publish on %s not sent: %s", msg.topic, mqtt.error_string(info.rc))
                return
            session.sent_upto = msg.id
            if msg.qos == 0:
                self._acked(msg)  # written (or queued in paho): QoS 0 has no acknowledgement
            else:
                session.inflight[info.mid] = msg
                session.sent_at[info.mid] = time.monotonic()

    def _acked(self, msg: OutboxMessage) -> None:
        self.outbox.ack(msg.id)
        self.published += 1
        self._suspects.discard(msg.id)
        self._strikes.pop(msg.id, None)

    def _finish(self, session: Session) -> None:
        """Stopping: flush the outbox until the deadline, publish the final state, disconnect cleanly."""
        client = session.client
        self.owner.on_wake(session)
        self._pump(session)
        while time.monotonic() < self._flush_deadline and (self.outbox.depth or session.inflight):
            rc = self._turn(session, min(0.2, max(0.0, self._flush_deadline - time.monotonic())))
            if rc != mqtt.MQTT_ERR_SUCCESS or session.lost:
                return
            self.owner.on_wake(session)
            self._pump(session)
        if self.outbox.depth:
            log.info("MQTT stopping with %d message(s) kept in the outbox", self.outbox.depth)
        infos = self.owner.on_closing(session)
        end = time.monotonic() + 1.0
        while time.monotonic() < end and not all(i.is_published() for i in infos):
            if self._turn(session, 0.1) != mqtt.MQTT_ERR_SUCCESS or session.lost:
                return
        session.lost = True
        client.disconnect()
        self._turn(session, 0.1)

    # ---- paho callbacks (connection thread, inside loop_read/loop_write) -------------------------------------

    def _on_connect(self, session: Session, rc: Any) -> None:
        if not rc.is_failure:
            session.connack = True
            return
        s = self.settings
        name = str(rc)
        if rc.value in (4, 5, 134, 135):  # bad user name or password / not authorised
            who = f"mqtt.username={s.username!r}" if s.username else "anonymous login (mqtt.username is empty)"
            session.refused = (
                f"broker {s.host}:{s.effective_port} refused {who}: {name} (check mqtt.password/password_file)"
            )
        elif rc.value in (2, 133):
            session.refused = f"broker {s.host}:{s.effective_port} rejected mqtt.client_id={self.client_id!r}: {name}"
        else:
            session.refused = f"broker {s.host}:{s.effective_port} refused the connection: {name}"

    def _on_disconnect(self, session: Session) -> None:
        session.lost = True

    def _on_publish(self, session: Session, mid: int) -> None:
        msg = session.inflight.pop(mid, None)
        session.sent_at.pop(mid, None)
        if msg is not None:  # else a status, discovery or error message sent outside the outbox
            self._acked(msg)

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = msg._topic.decode("utf-8", "replace")
        self.owner.on_message(topic, bytes(msg.payload))

    # ---- connecting ------------------------------------------------------------------------------------------

    def _describe_connect_error(self, exc: BaseException) -> str:
        s = self.settings
        where = f"broker {s.host}:{s.effective_port}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return f"TLS verification of {where} failed: {exc.verify_message} (check mqtt.tls.ca_file, mqtt.host)"
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
        client.will_set(self.will[0], self.will[1], qos=1, retain=True)
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
