"""Configuration: a tree of frozen dataclasses loaded from YAML.

Defaults live only in the dataclass fields below. Loading rejects unknown keys and values of the wrong type with
an error that names the key's full path (``mqtt.tls.ca_file: file not found``), so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import sys
import threading
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

if TYPE_CHECKING:  # yaml, ssl and socket are imported where they are used: most commands never need them
    import ssl

    import yaml

T = TypeVar("T")

DEFAULT_MODEL = Path("models/kwsd-xiaoyun.onnx")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


# --- value rules shared by the sections below ------------------------------------------------------------------

TOPIC_LEVEL_MAX = 128
"""Longest siteId / wake word id, characters: each is one MQTT topic level and part of a Home Assistant entity."""
SATELLITE_SITE_MAX = 64
"""Longest siteId accepted from a satellite (the MQTT side refuses longer ones from the network)."""
_TOPIC_FORBIDDEN = ("/", "+", "#", "\x00")
_HA_NODE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _show(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, so an error message stays one short line."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return f"an integer of more than {limit} digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_host(value: str) -> bool:
    """A host name (ASCII or internationalised) or an IPv4/IPv6 address, as a resolver accepts it."""
    if not value or len(value) > 253 or value.startswith("-"):
        return False
    if re.fullmatch(r"[A-Za-z0-9._:%-]+", value):
        return True
    try:
        value.encode("idna")
    except UnicodeError:
        return False
    return True


def _unfit_for_mqtt(char: str) -> bool:
    """Control characters and Unicode non-characters: mosquitto drops a client whose topic or id has one."""
    code = ord(char)
    return code <= 0x1F or 0x7F <= code <= 0x9F or 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE


def check_topic_level(key: str, value: str, what: str = "siteId", limit: int = TOPIC_LEVEL_MAX) -> None:
    """``value`` must fit one MQTT topic level: non-empty, at most ``TOPIC_LEVEL_MAX`` characters, none of
    ``/ + #``, no control character (NUL, tab, ...) or Unicode non-character. A broker drops the connection of a
    client that publishes to a topic with one of those."""
    if not value:
        raise ConfigError(key, f"{what} must not be empty")
    if len(value) > limit:
        raise ConfigError(key, f"{what} {_show(value)} is longer than {limit} characters")
    bad = [c for c in _TOPIC_FORBIDDEN if c in value]
    if bad:
        listed = " ".join("NUL" if c == "\x00" else repr(c) for c in bad)
        raise ConfigError(key, f"{what} {_show(value)} cannot be an MQTT topic level (contains {listed})")
    odd = next((c for c in value if _unfit_for_mqtt(c)), None)
    if odd is not None:
        raise ConfigError(key, f"{what} {_show(value)} cannot be an MQTT topic level (contains the control or "
                          f"non-character U+{ord(odd):04X})")


def check_topic_prefix(key: str, value: str) -> None:
    """A topic prefix: one or more levels joined by ``/``, each a valid topic level."""
    if not value:
        raise ConfigError(key, "must not be empty")
    for level in value.split("/"):
        if not level:
            raise ConfigError(key, f"{_show(value)} has an empty topic level (leading, trailing or double '/')")
        check_topic_level(key, level, "topic level")


def _bound(key: str, value: float, lo: float, hi: float, *, lo_open: bool = False, unit: str = "") -> None:
    """``lo <= value <= hi`` (``lo < value`` with ``lo_open``), else a ConfigError naming ``key`` and the range."""
    below = value <= lo if lo_open else value < lo
    if below or value > hi:
        low = "more than" if lo_open else "at least"
        u = f" {unit}" if unit else ""
        raise ConfigError(key, f"must be {low} {lo:g} and at most {hi:g}{u}, got {_show(value)}")


@dataclass(frozen=True)
class ModelSettings:
    path: Path = DEFAULT_MODEL
    """The exported streaming ONNX (``kwsd model export``). Relative paths are relative to the config file."""
    providers: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
    """onnxruntime execution providers in order of preference; CPU is always appended as the last resort."""
    intra_op_threads: int = 1
    """Threads onnxruntime may use inside one inference call (CPU provider)."""
    max_batch: int = 4096
    """Most streams processed in one inference call; more streams are split into several calls."""

    def validate(self, key: str) -> None:
        for i, name in enumerate(self.providers):
            if not name or any(c.isspace() for c in name):
                raise ConfigError(f"{key}.providers[{i}]", f"expected an execution provider name, got {_show(name)}")
        _bound(f"{key}.intra_op_threads", self.intra_op_threads, 1, 256)
        _bound(f"{key}.max_batch", self.max_batch, 1, 1 << 20)


@dataclass(frozen=True)
class KeywordSettings:
    phrase: str = "小云小云"
    """The keyword, spelled with characters the model knows (spaces are ignored)."""
    id: str = ""
    """Wake word id used in topics and payloads (``wakewordId``); defaults to the phrase."""
    threshold: float = 0.40
    """Detection threshold on the length-normalised keyword score (0..1); higher means fewer false wakes.
    The default was chosen on the dev DET curves (README, "Choosing a threshold"); measure your own with
    ``kwsd eval``."""
    min_duration: float = 0.25
    """Shortest plausible keyword, seconds, from its first syllable's peak to its last one's."""
    max_duration: float = 1.8
    """Longest plausible keyword, seconds (first to last syllable peak). Said 小云小云 spans 0.5-1.0 s; a longer
    span is syllables of different words (a false alarm on read speech spanned 2.5 s)."""
    max_gap: float = 0.75
    """Longest plausible pause between the peaks of two consecutive syllables, seconds; 0: no limit. Said
    小云小云 has at most 0.55 s between syllables."""

    @property
    def wakeword_id(self) -> str:
        return self.id or self.phrase.replace(" ", "")

    def validate(self, key: str) -> None:
        spelled = "".join(self.phrase.split())
        if not spelled:
            raise ConfigError(f"{key}.phrase", "must spell the keyword (it is empty)")
        if len(spelled) > 64:
            raise ConfigError(f"{key}.phrase", f"is longer than 64 characters: {_show(self.phrase)}")
        check_topic_level(f"{key}.id" if self.id else f"{key}.phrase", self.wakeword_id, "wake word id")
        _bound(f"{key}.threshold", self.threshold, 0.0, 1.0, lo_open=True)
        _bound(f"{key}.min_duration", self.min_duration, 0.0, 10.0, lo_open=True, unit="seconds")
        _bound(f"{key}.max_duration", self.max_duration, self.min_duration, 10.0, unit="seconds (min_duration..10)")
        _bound(f"{key}.max_gap", self.max_gap, 0.0, 10.0, unit="seconds (0: no limit)")


@dataclass(frozen=True)
class DetectorSettings:
    keywords: tuple[KeywordSettings, ...] = (KeywordSettings(),)
    """Keywords to detect; each has its own threshold."""
    refractory: float = 1.0
    """After a detection, the same keyword cannot fire again on the same stream for this many seconds (counted in
    samples); other keywords can."""
    step_frames: int = 1
    """Model frames (30 ms each) gathered per stream before one batched inference step while a keyword may be
    forming on it (its first syllables heard in order, recently): the wake latency's share."""
    quiet_step_frames: int = 15
    """Model frames gathered per step by a stream on which no keyword is forming (at least ``step_frames``): the
    next few frames cannot decide a keyword there, and a long step costs much less CPU than several short ones.
    A keyword forms once its first two tokens are heard; the rest of it and the model's look-ahead (for 小云小云
    at least about 0.6 s) must outlast one quiet step (15 frames: 0.45 s) for the wake latency to stay the same.
    Up to 32 streams: beyond that every stream steps at ``step_frames``, all in one call per step, which costs less."""
    beam: int = 20
    """Prefixes kept by the CTC prefix beam search."""
    top_k: int = 10
    """Tokens considered per frame (a keyword token must rank among the top k)."""
    token_floor: float = 0.01
    """Tokens below this posterior are ignored. Low enough that one keyword syllable the model half-hears
    (e.g. 小 heard as 导 at 0.02) can still complete the keyword; the threshold then decides."""
    site_thresholds: dict[str, float] = field(default_factory=dict)
    """siteId -> threshold used on that site instead of every keyword's own (a noisy room, a far microphone);
    ``kwsd review stats`` shows which sites need one."""

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        if not 1 <= len(self.keywords) <= 64:
            raise ConfigError(f"{k}keywords", f"needs 1 to 64 keywords, got {len(self.keywords)}")
        first: dict[str, int] = {}
        for i, kw in enumerate(self.keywords):
            if kw.wakeword_id in first:
                raise ConfigError(f"{k}keywords[{i}].id", f"wake word id {_show(kw.wakeword_id)} is already used "
                                  f"by keywords[{first[kw.wakeword_id]}]; give each keyword its own id")
            first[kw.wakeword_id] = i
        _bound(f"{k}refractory", self.refractory, 0.0, 60.0, unit="seconds")
        _bound(f"{k}step_frames", self.step_frames, 1, 100)
        _bound(f"{k}quiet_step_frames", self.quiet_step_frames, 1, 100)
        _bound(f"{k}beam", self.beam, 1, 1000)
        _bound(f"{k}top_k", self.top_k, 1, 10000)
        if not 0.0 <= self.token_floor < 1.0:
            raise ConfigError(f"{k}token_floor", f"must be at least 0 and below 1, got {_show(self.token_floor)}")
        for site, threshold in self.site_thresholds.items():
            if not 0.0 < threshold <= 1.0:
                raise ConfigError(f"{k}site_thresholds.{site}", f"must be in (0, 1], got {threshold}")


# --- audio inputs (kwsd/audio) ---------------------------------------------------------------------------------


RING_BYTES_MAX = 2 << 30
"""Largest capture ring of one input (``buffer_seconds`` × rate × channels × 2 bytes)."""


@dataclass(frozen=True)
class InputSettings:
    """One capture device, file or stdin; its channels feed one site each."""

    device: str = "default"
    """What to capture: a PulseAudio source name (``pactl list short sources``), an ALSA pcm name
    (``default``,
    ``hw:CARD=USB,DEV=0``, ``plughw:CARD=PCH,DEV=0``), a WAV file to replay, or ``-`` for raw s16le on stdin.
    Devices are selected by name, so card numbers that change across reboots do not matter (``kwsd
    devices``)."""
    kind: Literal["auto", "pulse", "alsa", "file", "stdin"] = "auto"
    """How to open ``device``; ``auto``: ``-`` is stdin, an existing file or a ``.wav`` path is a file, a
    name with
    ``:`` or ``default``/``pulse``/``sysdefault`` is ALSA, anything else a PulseAudio source."""
    name: str = ""
    """Name of this input in logs and status; defaults to ``device``."""
    rate: int = 0
    """Native sample rate to open the device at, Hz; 0 takes the source's own rate (PulseAudio source, WAV
    header,
    ALSA: the first of 48000, 44100, 16000 the device accepts; stdin: 16000). Audio is resampled to 16 kHz."""
    channels: int = 0
    """Channels to open; 0 takes the source's own count (PulseAudio source, WAV header), else the highest
    channel
    named in ``sites`` plus one."""
    sites: dict[int, str] = field(default_factory=dict)
    """Channel index (0-based) -> siteId; each listed channel becomes its own stream. Empty: channel 0 is the
    site
    named like the input."""
    realtime: bool = True
    """Replay (file or stdin) at real-time pace; false feeds it as fast as the pipeline takes it."""
    block_ms: int = 20
    """Capture block length, milliseconds (device latency vs. wake-ups per second)."""
    buffer_seconds: float = 30.0
    """Audio kept per input and per site (native and 16 kHz rings); readers that fall further behind lose
    audio
    (counted as overruns)."""
    stall_timeout: float = 2.0
    """Seconds without audio from a live device before it is closed and reopened."""
    reopen_backoff: tuple[float, float] = (0.5, 30.0)
    """First and longest wait between reopen attempts, seconds (doubling in between)."""

    @property
    def label(self) -> str:
        return self.name or self.device

    def site_map(self) -> dict[int, str]:
        """Channel -> siteId, with the default single site filled in."""
        return dict(self.sites) if self.sites else {0: self.label}

    def validate(self, key: str) -> None:
        pre = f"{key}." if key else ""
        if not self.device:
            raise ConfigError(f"{pre}device", "must name a device, a file or '-' for stdin")
        if self.rate != 0:
            _bound(f"{pre}rate", self.rate, 4000, 384000, unit="Hz (or 0 for the source's rate)")
        _bound(f"{pre}channels", self.channels, 0, 64, unit="(0 for the source's count)")
        for ch, site in self.sites.items():
            if not 0 <= ch < (self.channels or 64):
                have = f"{self.channels} channels (0..{self.channels - 1})" if self.channels else "channels 0..63"
                raise ConfigError(f"{pre}sites.{ch}", f"channel {_show(ch)} is out of range: input has {have}")
            check_topic_level(f"{pre}sites.{ch}", site)
        if not self.sites:
            what = "name" if self.name else "device"
            try:
                check_topic_level(f"{pre}{what}", self.label)
            except ConfigError as exc:
                raise ConfigError(exc.key, f"is this input's siteId when sites is empty: {exc.problem}; "
                                  "name the site in sites (e.g. {0: kitchen})") from None
        names = list(self.site_map().values())
        for site in names:
            if names.count(site) > 1:
                raise ConfigError(f"{pre}sites", f"siteId {_show(site)} is used by more than one channel")
        _bound(f"{pre}block_ms", self.block_ms, 1, 1000, unit="ms")
        _bound(f"{pre}buffer_seconds", self.buffer_seconds, 1.0, 600.0, unit="seconds")
        ring = self.buffer_seconds * (self.rate or 48000) * (self.channels or 2) * 2
        if ring > RING_BYTES_MAX:
            raise ConfigError(f"{pre}buffer_seconds", f"a ring of {ring / 2**30:.1f} GiB at {self.rate or 48000} Hz "
                              f"and {self.channels or 2} channels is more than {RING_BYTES_MAX >> 30} GiB")
        _bound(f"{pre}stall_timeout", self.stall_timeout, 0.05, 3600.0, unit="seconds")
        if self.stall_timeout <= self.block_ms / 1000:
            raise ConfigError(f"{pre}stall_timeout", f"must be longer than one capture block ({self.block_ms} ms), "
                              f"got {_show(self.stall_timeout)}")
        if len(self.reopen_backoff) != 2:
            raise ConfigError(
                f"{pre}reopen_backoff",
                f"needs two numbers [first, longest], got {len(self.reopen_backoff)} numbers"
            )
        lo, hi = self.reopen_backoff
        if not 0.01 <= lo <= hi <= 3600:
            raise ConfigError(
                f"{pre}reopen_backoff",
                f"needs 0.01 <= first <= longest <= 3600 seconds, got {_show(list(self.reopen_backoff))}"
            )


# --- MQTT (kwsd/mqtt) ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MqttTlsSettings:
    """TLS towards the broker; enabled when ``enabled`` is true or any file below is set."""

    enabled: bool = False
    """Use TLS even without a custom CA (the system trust store verifies the broker)."""
    ca_file: Path | None = None
    """PEM file with the CA certificate(s) that signed the broker's certificate; default: the system store."""
    cert_file: Path | None = None
    """PEM client certificate for brokers that require client authentication (needs ``key_file``)."""
    key_file: Path | None = None
    """PEM private key of ``cert_file``."""
    insecure: bool = False
    """Skip the check that the broker's certificate names ``host`` (the chain is still verified)."""

    @property
    def active(self) -> bool:
        return self.enabled or self.ca_file is not None or self.cert_file is not None

    def validate(self, key: str) -> None:
        if self.cert_file is not None and self.key_file is None:
            raise ConfigError(f"{key}.key_file", "required when cert_file is set (the certificate's key)")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError(f"{key}.cert_file", "required when key_file is set")
        self.check_files(key)

    def ssl_context(self, key: str = "mqtt.tls") -> ssl.SSLContext:
        """The client TLS context these settings describe; a file that cannot be loaded is a ConfigError."""
        import ssl

        self.check_files(key, relative_too=True)
        ctx = ssl.create_default_context()
        if self.ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=str(self.ca_file))
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError(f"{key}.ca_file", f"cannot load CA certificates from {self.ca_file}: "
                                  f"{_ssl_reason(exc)}") from exc
        if self.cert_file is not None and self.key_file is not None:
            try:
                # A key protected by a passphrase cannot be unlocked by a service: fail instead of prompting.
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file), password=lambda: b"")
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError(f"{key}.cert_file", f"cannot load {self.cert_file} with key {key}.key_file="
                                  f"{self.key_file}: {_ssl_reason(exc)}") from exc
        return ctx

    def check_files(self, key: str, relative_too: bool = False) -> None:
        """Raise ``ConfigError`` naming the setting of a TLS file that does not exist.

        At load time relative paths are not yet resolved against the config folder, so only absolute ones are
        checked there; the publisher checks all of them (``relative_too``) before it connects.
        """
        for name in ("ca_file", "cert_file", "key_file"):
            path: Path | None = getattr(self, name)
            if path is None or (not path.is_absolute() and not relative_too):
                continue
            if not path.is_file():
                raise ConfigError(f"{key}.{name}", f"file not found: {path}")


def _ssl_reason(exc: Exception) -> str:
    import ssl

    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


@dataclass(frozen=True)
class HomeAssistantSettings:
    """Home Assistant MQTT discovery: one ``event`` entity per site."""

    enabled: bool = True
    """Publish discovery configs and the wake on each site's event entity."""
    discovery_prefix: str = "homeassistant"
    """Home Assistant's discovery prefix; its birth message is expected on ``<discovery_prefix>/status``."""
    node_id: str = "kwsd"
    """Node id in discovery topics and the device identifier; use one per daemon when several run."""

    def validate(self, key: str) -> None:
        check_topic_prefix(f"{key}.discovery_prefix", self.discovery_prefix)
        if not _HA_NODE_ID.match(self.node_id):
            raise ConfigError(f"{key}.node_id", "Home Assistant needs 1..64 of A-Z a-z 0-9 _ -, got "
                              f"{_show(self.node_id)}")


@dataclass(frozen=True)
class SatelliteSettings:
    """Remote satellites sending audio to kwsd on ``hermes/audioServer/<siteId>/audioFrame`` (WAV chunks)."""

    enabled: bool = False
    """Accept satellite audio at all."""
    sites: tuple[str, ...] = ()
    """siteIds accepted; empty accepts every site."""
    max_frame_bytes: int = 262144
    """Largest accepted audioFrame payload, bytes; larger ones are rejected (hermes/error/hotword)."""
    max_sites: int = 16
    """Remote sites listened to at once; audio from further siteIds is refused until one is dropped."""
    idle_timeout: float = 30.0
    """Seconds without audio after which a remote site is dropped (its discovery withdrawn)."""
    buffer_seconds: float = 2.0
    """Audio held per remote site (32 kB per second); also the largest burst accepted at once."""

    def validate(self, key: str) -> None:
        for i, site in enumerate(self.sites):
            check_topic_level(f"{key}.sites[{i}]", site, limit=SATELLITE_SITE_MAX)
            if site in self.sites[:i]:
                raise ConfigError(f"{key}.sites[{i}]", f"siteId {_show(site)} is listed twice")
        _bound(f"{key}.max_frame_bytes", self.max_frame_bytes, 64, 64 << 20, unit="bytes")
        if not 1 <= self.max_sites <= 1024:
            raise ConfigError(f"{key}.max_sites", f"must be 1..1024, got {_show(self.max_sites)}")
        if not 1.0 <= self.idle_timeout <= 86400:
            raise ConfigError(f"{key}.idle_timeout", f"must be 1..86400 seconds, got {_show(self.idle_timeout)}")
        if not 0.5 <= self.buffer_seconds <= 60:
            raise ConfigError(f"{key}.buffer_seconds", f"must be 0.5..60 seconds, got {_show(self.buffer_seconds)}")


@dataclass(frozen=True)
class OutboxSettings:
    """On-disk queue of messages not yet acknowledged by the broker; survives broker and daemon restarts."""

    max_bytes: int = 64 * 1024 * 1024
    """Bound on payload bytes kept; when reached, the oldest segments go first, then the oldest events."""
    max_inflight: int = 20
    """QoS 1 messages sent and not yet acknowledged at any time."""

    def validate(self, key: str) -> None:
        _bound(f"{key}.max_bytes", self.max_bytes, 4096, 1 << 40, unit="bytes")
        _bound(f"{key}.max_inflight", self.max_inflight, 1, 65535)


@dataclass(frozen=True)
class MqttSettings:
    """Broker connection and the topic conventions kwsd publishes."""

    enabled: bool = True
    """Publish to a broker at all."""
    host: str = "127.0.0.1"
    """Broker host name or address."""
    port: int = 0
    """Broker port; 0 means 1883, or 8883 with TLS."""
    tls: MqttTlsSettings = field(default_factory=MqttTlsSettings)
    username: str = ""
    """User name for the broker; empty means anonymous."""
    password: str = ""
    """Password for ``username``; prefer ``password_file``."""
    password_file: Path | None = None
    """File whose first line is the password (keeps it out of the config)."""
    client_id: str = ""
    """MQTT client id; empty means ``kwsd-<hostname>``."""
    keepalive: int = 30
    """Seconds between keepalive pings; the broker declares kwsd offline after 1.5 × this without traffic."""
    connect_timeout: float = 5.0
    """Seconds to wait for the TCP/TLS connection and the broker's CONNACK."""
    reconnect_min: float = 0.5
    """First delay before reconnecting, seconds; doubles on each failure."""
    reconnect_max: float = 30.0
    """Longest delay between reconnect attempts, seconds."""
    prefix: str = "kwsd"
    """Topic prefix of the native topics (``<prefix>/<siteId>/wake``, ``<prefix>/status``)."""
    qos: int = 1
    """QoS of wake events and segments (0 or 1); retained status and discovery use QoS 1."""
    hermes: bool = True
    """Speak the Rhasspy/Snips Hermes protocol (hotword detected, toggleOn/Off, errors)."""
    home_assistant: HomeAssistantSettings = field(default_factory=HomeAssistantSettings)
    satellites: SatelliteSettings = field(default_factory=SatelliteSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)

    @property
    def effective_port(self) -> int:
        return self.port or (8883 if self.tls.active else 1883)

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        if not _is_host(self.host):
            raise ConfigError(f"{k}host", f"expected a host name or address, got {_show(self.host)}")
        _bound(f"{k}port", self.port, 0, 65535, unit="(0: 1883, or 8883 with TLS)")
        if self.qos not in (0, 1):
            raise ConfigError(f"{k}qos", f"must be 0 or 1, got {_show(self.qos)}")
        _bound(f"{k}keepalive", self.keepalive, 5, 65535, unit="seconds")
        _bound(f"{k}connect_timeout", self.connect_timeout, 0.1, 600.0, unit="seconds")
        _bound(f"{k}reconnect_max", self.reconnect_max, 0.01, 3600.0, unit="seconds")
        _bound(f"{k}reconnect_min", self.reconnect_min, 0.01, self.reconnect_max, unit="seconds (reconnect_max)")
        for name in ("client_id", "username", "password"):
            if len(getattr(self, name)) > 1024:
                raise ConfigError(f"{k}{name}", "is longer than 1024 characters")
        for name in ("client_id", "username"):  # UTF-8 strings of the CONNECT packet, checked by the broker
            odd = next((c for c in getattr(self, name) if _unfit_for_mqtt(c)), None)
            if odd is not None:
                raise ConfigError(f"{k}{name}", f"contains the control or non-character U+{ord(odd):04X}, "
                                  "which a broker refuses")
        if self.password and self.password_file is not None:
            raise ConfigError(f"{k}password_file", "set either password or password_file, not both")
        if (self.password or self.password_file is not None) and not self.username:
            raise ConfigError(f"{k}username", "required when a password is set")
        if self.password_file is not None and self.password_file.is_absolute():
            if not self.password_file.is_file():
                raise ConfigError(f"{k}password_file", f"file not found: {self.password_file}")
        check_topic_prefix(f"{k}prefix", self.prefix)

    def read_password(self, key: str = "mqtt") -> str:
        """The password from ``password`` or ``password_file``; errors name ``<key>.password_file``."""
        if self.password_file is None:
            return self.password
        try:
            lines = self.password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"{key}.password_file", f"cannot read {self.password_file}: "
                              f"{exc.strerror or exc}") from exc
        except UnicodeDecodeError:
            raise ConfigError(f"{key}.password_file", f"{self.password_file} is not UTF-8 text") from None
        return lines[0] if lines else ""


# --- follow-up segments (kwsd/segments.py) ---------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentSettings:
    """The audio published after a wake: pre-roll, then speech until silence or the maximum length."""

    enabled: bool = True
    """Record and publish a follow-up segment after each wake."""
    pre_roll: float = 0.3
    """Seconds of audio before the keyword's start included at the beginning of the segment."""
    silence_timeout: float = 0.8
    """Seconds of continuous non-speech after speech that end the segment."""
    initial_silence: float = 3.0
    """Seconds after the keyword without any speech that end the segment (nobody went on talking)."""
    min_speech: float = 0.15
    """Seconds of speech after the keyword needed before a silence can end the segment."""
    max_length: float = 10.0
    """Longest segment in seconds, pre-roll and keyword included; a longer utterance is cut here."""
    vad_aggressiveness: int = 2
    """webrtcvad mode 0..3: higher rejects more non-speech."""
    lookback: float = 4.0
    """Seconds of audio kept per site besides the pre-roll: the longest keyword plus the detector's delay."""

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        if not 0 <= self.vad_aggressiveness <= 3:
            raise ConfigError(f"{k}vad_aggressiveness", f"must be 0..3, got {_show(self.vad_aggressiveness)}")
        _bound(f"{k}pre_roll", self.pre_roll, 0.0, 10.0, unit="seconds")
        _bound(f"{k}min_speech", self.min_speech, 0.0, 60.0, unit="seconds")
        for name in ("silence_timeout", "initial_silence"):  # at least one VAD frame
            _bound(f"{k}{name}", getattr(self, name), 0.03, 60.0, unit="seconds")
        _bound(f"{k}lookback", self.lookback, 0.1, 600.0, unit="seconds")
        if self.max_length <= self.pre_roll:
            raise ConfigError(f"{k}max_length", f"must be longer than pre_roll ({self.pre_roll:g} s), "
                              f"got {_show(self.max_length)}")
        _bound(f"{k}max_length", self.max_length, 0.0, 600.0, lo_open=True, unit="seconds")


# --- review archive (kwsd/review) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewSettings:
    """The wake archive: each wake's audio and figures kept under ``<state folder>/review`` for review."""

    enabled: bool = True
    """Keep every wake (and near miss) as a WAV with a JSON sidecar; false keeps no audio at all."""
    max_bytes: int = 256 * 1024 * 1024
    """Bound on the wakes' WAV and sidecar bytes; the oldest wakes are removed first beyond it."""
    max_days: float = 30.0
    """Wakes and near misses older than this many days are removed."""
    near_miss_ratio: float = 0.7
    """Candidates scoring at least this fraction of the threshold (and below it) are kept as near misses;
    0 keeps none."""
    near_miss_max_bytes: int = 32 * 1024 * 1024
    """Bound on the near misses' bytes, on its own (oldest removed first)."""
    margin: float = 2.0
    """Seconds kept before and after the keyword when there is no follow-up segment (segments off, near
    misses)."""
    window_days: float = 7.0
    """Days over which the effective wake rate is computed (metrics, status, ``kwsd review stats``)."""

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        for name in ("max_bytes", "near_miss_max_bytes"):
            _bound(f"{k}{name}", getattr(self, name), 65536, 1 << 40, unit="bytes")
        for name in ("max_days", "window_days"):
            _bound(f"{k}{name}", getattr(self, name), 0.0, 36500.0, lo_open=True, unit="days")
        _bound(f"{k}margin", self.margin, 0.0, 60.0, lo_open=True, unit="seconds")
        if not 0.0 <= self.near_miss_ratio < 1.0:
            raise ConfigError(f"{k}near_miss_ratio", f"must be at least 0 and below 1, got "
                              f"{_show(self.near_miss_ratio)}")


# --- service: state, metrics, logging (kwsd/app.py, kwsd/metrics.py, kwsd/logs.py) -----------------------------


DEFAULT_STATE_DIR = Path("/var/lib/kwsd")


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus endpoint (``/metrics``): off unless enabled, local-only unless an address is given."""

    enabled: bool = False
    """Serve Prometheus metrics over HTTP."""
    address: str = "127.0.0.1"
    """Address to bind; ``0.0.0.0`` or ``::`` exposes the endpoint (no authentication) to the network."""
    port: int = 9750
    """TCP port of the endpoint."""

    def validate(self, key: str) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"{key}.port", f"must be a TCP port 1..65535, got {_show(self.port)}")
        if not _is_host(self.address):
            raise ConfigError(f"{key}.address", f"expected an IP address or host name, got {_show(self.address)}")


@dataclass(frozen=True)
class ServiceSettings:
    """Where the daemon keeps state, and how it exposes metrics and logs."""

    state_dir: Path | None = None
    """Writable folder for the MQTT outbox and other state. Unset: ``$STATE_DIRECTORY`` (set by systemd's
    ``StateDirectory=``), else /var/lib/kwsd. A path given here wins over both; under the shipped unit it must
    then also be listed in ``ReadWritePaths=``, as everything else is read-only."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged (``kwsd -v`` forces debug)."""
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    status_interval: float = 30.0
    """Seconds between refreshes of the retained MQTT status message and the systemd ``STATUS=`` line."""

    def validate(self, key: str) -> None:
        _bound(f"{key}.status_interval", self.status_interval, 0.1, 86400.0, unit="seconds")

    def state_path(self, env: Mapping[str, str] | None = None) -> Path:
        """The state folder: ``state_dir`` if set, else ``$STATE_DIRECTORY`` (first entry), else default."""
        if self.state_dir is not None:
            return self.state_dir
        environ = os.environ if env is None else env
        from_systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
        return Path(from_systemd) if from_systemd else DEFAULT_STATE_DIR


# --- Wyoming wake-word service (kwsd/wyoming.py) ---------------------------------------------------------------


@dataclass(frozen=True)
class WyomingSettings:
    """A Wyoming-protocol wake-word service for Home Assistant Assist and wyoming-satellite.

    Each connection's audio is one more stream of the daemon's detector (same model, thresholds and refractory
    period as the microphones)."""

    enabled: bool = False
    """Serve the Wyoming protocol inside ``kwsd run``."""
    host: str = "127.0.0.1"
    """Address to listen on; ``0.0.0.0`` or ``::`` lets Home Assistant and satellites on other hosts connect
    (the protocol has no authentication)."""
    port: int = 10400
    """TCP port (10400 is the port Home Assistant suggests for wake-word services); 0 takes a free port and logs
    it."""
    max_clients: int = 32
    """Most connections at once; one more is sent an error event and closed."""
    max_event_bytes: int = 1048576
    """Largest data block or audio payload of one event, bytes (header lines are bounded at 64 KiB); a client
    sending a larger one is disconnected (1 MiB holds over 2 s of 48 kHz stereo 32-bit audio)."""
    publish_mqtt: bool = False
    """Also publish a Wyoming client's wakes (and follow-up segments) over MQTT as wake events of its site."""
    sites: dict[str, str] = field(default_factory=dict)
    """Client address -> siteId (``{192.168.1.20: kitchen}``) for logs, metrics and MQTT; an unlisted client is
    ``wyoming-<address>``. Concurrent streams from one address get ``-2``, ``-3``, ... appended."""
    zeroconf: bool = False
    """Announce the service over mDNS (``_wyoming._tcp``) so Home Assistant discovers it; needs a ``host`` other
    hosts can reach."""
    zeroconf_name: str = ""
    """Instance name in the announcement; empty: ``kwsd-<hostname>``."""

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        if self.zeroconf:
            if self.host.startswith("127.") or self.host in ("localhost", "::1"):
                raise ConfigError(f"{k}zeroconf", f"would announce {self.host}, which other hosts cannot reach; "
                                  "set wyoming.host to 0.0.0.0 or an address on the network")
        if not self.host or any(c.isspace() for c in self.host):
            raise ConfigError(f"{k}host", f"expected an IP address or host name, got {self.host!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{k}port", f"must be a TCP port 1..65535 (or 0 for any free port), got {self.port}")
        if self.max_clients < 1:
            raise ConfigError(f"{k}max_clients", f"must be at least 1, got {self.max_clients}")
        if self.max_event_bytes < 4096:
            raise ConfigError(f"{k}max_event_bytes", f"must be at least 4096, got {self.max_event_bytes}")
        for address, site in self.sites.items():
            if not site or any(c in site for c in "+#/") or any(c.isspace() for c in site):
                raise ConfigError(f"{k}sites.{address}", f"not a usable siteId (no spaces, '/', '+' or '#'): {site!r}")


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    inputs: tuple[InputSettings, ...] = ()
    """Capture devices and replay sources."""
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    segments: SegmentSettings = field(default_factory=SegmentSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    review: ReviewSettings = field(default_factory=ReviewSettings)
    wyoming: WyomingSettings = field(default_factory=WyomingSettings)

    def validate(self, key: str) -> None:
        """Rules across sections: every siteId names one stream."""
        owner: dict[str, int] = {}
        for i, inp in enumerate(self.inputs):
            for ch, site in inp.site_map().items():
                if site in owner:
                    default = "name" if inp.name else "device"
                    where = f"inputs[{i}].sites.{ch}" if inp.sites else f"inputs[{i}].{default}"
                    raise ConfigError(where, f"siteId {_show(site)} is already used by inputs[{owner[site]}]")
                owner[site] = i
        for i, site in enumerate(self.mqtt.satellites.sites):
            if site in owner:
                raise ConfigError(f"mqtt.satellites.sites[{i}]", f"siteId {_show(site)} is also a local site "
                                  f"(inputs[{owner[site]}]); a satellite needs a siteId of its own")


# --------------------------------------------------------------------------------------------------------------
# Loading


MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read; a bigger one is not a config (a log, a disk image) and is refused unread."""
MAX_DEPTH = 32
"""Deepest nesting of YAML collections accepted (the settings tree itself is four levels deep)."""


def load(path: str | Path) -> Settings:
    """Read and validate a YAML config file; relative paths inside it are resolved against its folder.

    Checks the file on its own (syntax, types, ranges, names); :func:`load_for_run` also checks the host.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL in the path
        raise ConfigError("", f"cannot read config file {_show(str(path))}: {exc}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError("", f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    return loads(decode(data), base_dir=path.resolve().parent)


def load_for_run(path: str | Path, running: Settings | None = None) -> Settings:
    """Everything ``kwsd run`` needs, checked: :func:`load` then :func:`check_host`.

    ``kwsd check-config``, ``kwsd run`` and a reload all call this, so a config the check accepts is one the
    daemon starts with. ``running``: the configuration of this daemon when it reloads (its own metrics port is
    not "in use").
    """
    settings = load(path)
    check_host(settings, running)
    return settings


def decode(data: bytes) -> str:
    """Config file bytes as text: UTF-8 (a byte order mark is allowed), or UTF-16/32 with a byte order mark."""
    for bom, codec in ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
                       (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"), (b"\xef\xbb\xbf", "utf-8")):
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(codec)
            except UnicodeDecodeError as exc:
                raise ConfigError("", f"not valid {codec.upper()} text (as its byte order mark says), "
                                  f"{_where(data, exc.start + len(bom))}") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ConfigError("", f"contains a NUL byte at {_where(data, nul)}: not a text file, or UTF-16 without "
                          "a byte order mark (save it as UTF-8)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"not UTF-8 text: byte 0x{data[exc.start]:02x} at {_where(data, exc.start)} "
                          "(save the file as UTF-8)") from None


def _where(data: bytes | str, offset: int) -> str:
    nl: Any = b"\n" if isinstance(data, bytes) else "\n"
    line = data.count(nl, 0, offset) + 1
    column = offset - (data.rfind(nl, 0, offset) + 1) + 1
    return f"line {line}, column {column}"


@cache
def _loader_class() -> type[yaml.SafeLoader]:
    """The YAML loader class, built on first use (importing yaml costs about 10 ms that ``detect`` never needs)."""
    import yaml
    import yaml.composer
    import yaml.constructor

    class Loader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses duplicate keys and deep nesting, and marks every construction error."""

        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self._depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self._depth += 1
            try:
                if self._depth > MAX_DEPTH:
                    raise yaml.composer.ComposerError(
                        None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep)
            except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits, a bad date
                problem = "integer too long" if "digits" in str(exc) else f"cannot read this value ({exc})"
                raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            if isinstance(node, yaml.MappingNode):
                for key_node, _ in node.value:
                    if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {_show(key)} (first at line {seen[key]})", key_node.start_mark)
                    seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep)

    return Loader


def _yaml_error(exc: yaml.YAMLError, text: str) -> ConfigError:
    """What is wrong and where, never the text of the line (it may hold a password)."""
    import yaml
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return ConfigError("", f"{_where(text, exc.position)}: not valid YAML: character #x{char:04x} is not "
                           "allowed in a YAML file")
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return ConfigError("", f"{where}not valid YAML: {problem}")
    return ConfigError("", f"not valid YAML: {type(exc).__name__}")


def loads(text: str, base_dir: Path | None = None) -> Settings:
    """Parse and validate config text; with ``base_dir``, relative paths are resolved against it."""
    import yaml

    loader: Any = None
    try:
        loader = _loader_class()(text)  # the reader checks every character here
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text) from None
    except (ValueError, OverflowError):  # the scanner's own: e.g. an escape "\U7fffffff" beyond Unicode
        mark = loader.get_mark() if loader is not None else None
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError("", f"{where}not valid YAML: an escape sequence or value out of range") from None
    except RecursionError:
        raise ConfigError("", f"not valid YAML: nested too deeply (more than {MAX_DEPTH} levels)") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        data = {}
    settings = from_dict(Settings, data)
    return resolve_paths(settings, base_dir) if base_dir is not None else settings


def from_dict(cls: type[T], data: Any, key: str = "") -> T:
    """Build dataclass ``cls`` from plain YAML data, naming the key path in every error."""
    if not isinstance(data, Mapping):
        raise ConfigError(key, f"expected a mapping, got {_describe(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = f"{key}.{_key_part(name)}" if key else _key_part(name)
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(sub, f"unknown key (known keys here: {known})")
        kwargs[name] = _convert(hints[name], value, sub)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, str(exc)) from exc
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(key)
    return obj


def _key_part(name: object) -> str:
    """A YAML key as it appears in an error's key path (odd keys quoted and shortened)."""
    if isinstance(name, str) and name.isprintable() and 0 < len(name) <= 60:
        return name
    if isinstance(name, int) and not isinstance(name, bool) and abs(name) < 10**18:
        return str(name)
    return _show(name)


def _describe(value: Any, key: str = "") -> str:
    if isinstance(value, Mapping | list) or key.rsplit(".", 1)[-1] == "password":  # never echo a secret
        return type(value).__name__
    return f"{type(value).__name__} {_show(value)}"


def _text(value: str, key: str, what: str = "string") -> str:
    """Strings reach C libraries, topics and file names: no NUL, and encodable as UTF-8."""
    if "\x00" in value:
        raise ConfigError(key, f"the {what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(key, f"the {what} is not valid Unicode (a lone surrogate escape)") from None
    return value


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, key)
            except ConfigError as exc:
                errors.append(exc.problem)
        raise ConfigError(key, "; ".join(errors))
    if origin is Literal:
        if isinstance(value, Mapping | list) or value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {_describe(value, key)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key)  # type: ignore[arg-type]
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {_describe(value, key)}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {_describe(value, key)}")
        kt, vt = args
        return {_convert(kt, k, f"{key}.{_key_part(k)}"): _convert(vt, v, f"{key}.{_key_part(k)}")
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_describe(value, key)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_describe(value, key)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {_describe(value, key)}")
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(key, f"number out of range: {_show(value)}") from None
        if not math.isfinite(number):
            raise ConfigError(key, f"expected a finite number, got {_show(number)}")
        return number
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(key, f"expected a string, got {_describe(value, key)}")
        if isinstance(value, str):
            return _text(value, key)
        try:
            return str(value)
        except ValueError:  # an integer too long to print
            raise ConfigError(key, "expected a string, got an integer of thousands of digits") from None
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"expected a file path, got {_describe(value, key)}")
        try:
            return Path(_text(value, key, "path")).expanduser()
        except RuntimeError as exc:  # ~user of an unknown user
            raise ConfigError(key, f"cannot expand {_show(value)}: {exc}") from None
    raise ConfigError(key, f"unsupported setting type {tp!r}")


def resolve_paths(obj: T, base_dir: Path) -> T:
    """Return ``obj`` with every relative ``Path`` field made absolute against ``base_dir``."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        new = _resolve_value(value, base_dir)
        if new is not value:
            changes[f.name] = new
    return dataclasses.replace(obj, **changes) if changes else obj


def _resolve_value(value: Any, base_dir: Path) -> Any:
    if isinstance(value, Path):
        return value if value.is_absolute() else base_dir / value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return resolve_paths(value, base_dir)
    if isinstance(value, tuple):
        items = tuple(_resolve_value(v, base_dir) for v in value)
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    return value


# --------------------------------------------------------------------------------------------------------------
# What the host must provide (after paths are resolved)


def check_host(s: Settings, running: Settings | None = None) -> None:
    """Check what ``kwsd run`` needs besides the file itself: the model and its tokens, replayed files, TLS and
    password files, a writable state folder, a free metrics port. ``running``: see :func:`load_for_run`."""
    check_model(s.model, s.detector)
    for i, inp in enumerate(s.inputs):
        _check_replay_file(inp, f"inputs[{i}]")
    if s.mqtt.enabled:
        if s.mqtt.tls.active:
            s.mqtt.tls.ssl_context("mqtt.tls")
        if s.mqtt.password_file is not None:
            s.mqtt.read_password("mqtt")
        _check_state_dir(s.service)
    if s.service.metrics.enabled:
        held = running is not None and running.service.metrics == s.service.metrics
        if not held:
            _check_port_free(s.service.metrics, "service.metrics")


def check_model(model: ModelSettings, detector: DetectorSettings) -> None:
    """The model file is an ONNX exported by kwsd whose contract fits, and it can spell every keyword.

    Reading and checking the ONNX needs the ``onnx`` package, which stays resident once imported (about 20 MiB,
    more than the rest of a daemon's per-site memory). A process with no other thread yet (``kwsd run`` and
    ``check-config`` at start) checks in a forked child, so the daemon never holds it; the answer is the same.
    """
    if sys.platform.startswith("linux") and threading.active_count() == 1 and "onnx" not in sys.modules:
        answer = _in_child(_model_problem, model, detector)
        if answer is not None:
            problem = answer[0]
            if problem is not None:
                raise ConfigError(*problem)
            return
    problem = _model_problem(model, detector)  # elsewhere, or the child could not answer
    if problem is not None:
        raise ConfigError(*problem)


def _model_problem(model: ModelSettings, detector: DetectorSettings) -> tuple[str, str] | None:
    """What :func:`check_model` refuses, as (key, problem); None when the model is fine."""
    from kwsd.kws.contract import ContractError, read_contract
    from kwsd.kws.decoder import KeywordError, tokenize

    try:
        contract = read_contract(model.path)
    except ContractError as exc:
        return "model.path", str(exc)
    for i, kw in enumerate(detector.keywords):
        try:
            tokenize(kw.phrase, contract.tokens)
        except KeywordError as exc:
            return f"detector.keywords[{i}].phrase", str(exc)
    if detector.top_k > len(contract.tokens):
        return "detector.top_k", f"must be at most the model's {len(contract.tokens)} tokens, got {detector.top_k}"
    return None


def _in_child(call: Callable[..., T], *args: object) -> tuple[T] | None:
    """``(call(*args),)`` computed in a forked child process; None when the child raised or died (the caller
    then computes it itself, so an error surfaces as it would have in-process)."""
    import pickle

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, then leave without running the parent's exit handlers
        code = 1
        try:
            os.close(read_end)
            data = pickle.dumps(call(*args))
            with os.fdopen(write_end, "wb") as out:
                out.write(data)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        data = answer.read()
    _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        return None
    return (pickle.loads(data),)  # our own child's answer


def _check_replay_file(inp: InputSettings, key: str) -> None:
    """A file to replay must open as the replay source opens it (live devices may come later)."""
    from kwsd.audio.capture import resolve_kind
    from kwsd.audio.wavfile import AudioFileError, AudioReader

    if resolve_kind(inp) != "file":
        return
    path = Path(inp.device)
    try:
        with AudioReader(path) as reader:
            rate, channels = reader.rate, reader.channels
    except AudioFileError as exc:
        raise ConfigError(f"{key}.device", f"cannot replay {exc}") from None
    if inp.rate and inp.rate != rate:
        raise ConfigError(f"{key}.rate", f"{path} is {rate} Hz, but rate says {inp.rate}")
    needed = max(inp.site_map()) + 1
    if needed > channels:
        raise ConfigError(f"{key}.sites", f"{path} has {channels} channel(s); sites need channel {needed - 1}")


def _check_state_dir(service: ServiceSettings) -> None:
    """The state folder (and its outbox) can be created or written by this user, and so can the files in it."""
    state = service.state_path()
    how = "" if service.state_dir is not None else " (unset: $STATE_DIRECTORY, else the default)"
    key = "service.state_dir"
    outbox = state / "outbox"
    for folder in (state, outbox):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(key, f"{folder}{how} is not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ConfigError(key, f"{folder}{how} is not writable by this user (uid {os.getuid()})")
            continue
        parent = folder.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(key, f"{folder}{how} does not exist and cannot be created: {parent} is not a "
                              f"writable folder for this user (uid {os.getuid()})")
        return
    try:
        files = [p for p in outbox.iterdir() if p.is_file()]
    except OSError as exc:
        raise ConfigError(key, f"cannot list {outbox}: {exc.strerror or exc}") from None
    for file in files:
        if not os.access(file, os.R_OK | os.W_OK):
            raise ConfigError(key, f"{file} is not readable and writable by this user (uid {os.getuid()}); "
                              "was kwsd run as another user (root) before?")


def _check_port_free(metrics: MetricsSettings, key: str) -> None:
    """Bind the metrics address and port the way the endpoint will, then let go."""
    import socket

    try:
        infos = socket.getaddrinfo(metrics.address, metrics.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ConfigError(f"{key}.address", f"cannot resolve {_show(metrics.address)}: {reason}") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"{key}.port", f"{metrics.address}:{metrics.port} is already in use (by another "
                                  "program, or by a kwsd that is running)") from None
            raise ConfigError(f"{key}.address", f"cannot listen on {metrics.address}:{metrics.port}: "
                              f"{exc.strerror or exc}") from None
