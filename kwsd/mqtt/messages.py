"""Wire messages: one frozen dataclass per payload, with its topic, ``to_payload()`` and ``from_payload()``.

Every ``from_payload`` validates strictly and raises ``MessageError`` naming the message and
the field, so an inbound payload can never crash the caller with a ``KeyError`` or ``TypeError``.
Time fields carry their unit in the docstring; stream times are seconds since the stream's first sample.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import numpy as np

from kwsd.audio import wavfile
from kwsd.audio.resample import resample_once

SAMPLE_RATE = 16000

EndReason = Literal["silence", "max_length", "interrupted", "stopped"]


class MessageError(ValueError):
    """An inbound payload is malformed; the message names the message type and the field."""


# ----------------------------------------------------------------------------------------------------
# helpers


def utc_now_iso() -> str:
    """Current time, UTC, ISO-8601 with milliseconds and a ``Z`` suffix."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _load_object(payload: bytes | bytearray, what: str) -> dict[str, Any]:
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MessageError(f"{what}: payload is not UTF-8 JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise MessageError(f"{what}: payload must be a JSON object, got {type(data).__name__}")
    return data


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _get(
    data: dict[str, Any], what: str, name: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    """Field ``name`` of type ``kind``; missing or null takes ``default`` (required if none)."""
    if name not in data or (data[name] is None and default is not ...):
        if default is ...:
            raise MessageError(f"{what}: field {name!r} is missing")
        return default
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise MessageError(f"{what}: field {name!r} must be {_kind_name(kinds)}, got {value!r}")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise MessageError(f"{what}: field {name!r} must be {_kind_name(kinds)}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise MessageError(f"{what}: field {name!r} must be a finite number")
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        float: "a number",
        int: "an integer",
        bool: "true/false",
        list: "a list",
        dict: "an object",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


_TOPIC_PART = re.compile(r"^[^/+#\x00]{1,128}$")

MAX_TOPIC_BYTES = 65535
"""MQTT's limit on the UTF-8 length of a topic name."""
MAX_SITE_ID = 64
"""Longest siteId accepted from the network (satellites, toggles): it becomes a topic level and an entity."""


def check_topic_part(value: str, what: str) -> str:
    """A siteId / wakewordId / sessionId must fit one topic level (no ``/``, ``+``, ``#``)."""
    if not _TOPIC_PART.match(value) or _bad_topic_char(value) is not None:
        raise MessageError(f"{what}: {value!r} cannot be used as a topic level")
    return value


def _bad_topic_char(topic: str) -> str | None:
    """The first character a broker refuses in a topic name, as a description, or None.

    mosquitto closes the connection on a PUBLISH whose topic holds a wildcard, a C0/C1 control character
    (NUL included), a UTF-16 surrogate or a Unicode noncharacter (U+FDD0..U+FDEF, U+xFFFE, U+xFFFF).
    """
    for ch in topic:
        c = ord(ch)
        if ch in "+#":
            return f"wildcard {ch!r}"
        if c <= 0x1F or 0x7F <= c <= 0x9F:
            return f"control character U+{c:04X}"
        if 0xD800 <= c <= 0xDFFF:
            return f"surrogate U+{c:04X}"
        if 0xFDD0 <= c <= 0xFDEF or (c & 0xFFFF) in (0xFFFE, 0xFFFF):
            return f"noncharacter U+{c:04X}"
    return None


def check_publish_topic(topic: str) -> str:
    """A topic the broker accepts in PUBLISH, or ``MessageError`` saying what is wrong with it."""
    if not topic:
        raise MessageError("topic is empty")
    bad = _bad_topic_char(topic)
    if bad is not None:
        raise MessageError(f"topic {topic[:200]!r} holds a {bad}")
    if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise MessageError(f"topic {topic[:60]!r}... is longer than {MAX_TOPIC_BYTES} bytes")
    return topic


def check_site_id(value: str, what: str = "siteId") -> str:
    """A siteId from the network: 1..``MAX_SITE_ID`` printable characters that fit one topic level."""
    if not value:
        raise MessageError(f"{what} is empty")
    if len(value) > MAX_SITE_ID:
        raise MessageError(f"{what} {value[:40]!r}... is longer than {MAX_SITE_ID} characters")
    if "/" in value or not value.isprintable() or value != value.strip():
        raise MessageError(f"{what} {value!r} cannot be used as a topic level")
    bad = _bad_topic_char(value)
    if bad is not None:
        raise MessageError(f"{what} {value!r} holds a {bad}")
    return value


# ----------------------------------------------------------------------------------------------------
# native


@dataclass(frozen=True)
class WakeEvent:
    """A detection. Topic ``<prefix>/<siteId>/wake``, JSON, QoS 1, not retained."""

    site_id: str
    """The site (microphone channel or satellite) that heard the keyword."""
    wakeword_id: str
    """Id of the keyword (topics, Hermes ``modelId``)."""
    keyword: str
    """The keyword phrase as spelled in the config."""
    score: float
    """Length-normalised keyword score, 0..1."""
    threshold: float
    """The threshold the score passed, 0..1."""
    start: float
    """Keyword start, seconds of stream time."""
    end: float
    """Keyword end, seconds of stream time."""
    session_id: str
    """Unique id of this wake; the follow-up segment carries the same id."""
    device: str = ""
    """Capture device (name) or ``satellite`` for remote audio."""
    energy: float = -120.0
    """Keyword energy, dBFS (RMS over the keyword); compare sites that heard the same wake."""
    latency: float = 0.0
    """Milliseconds of audio between the keyword's end and the detection (model look-ahead + decoding)."""
    timestamp: str = field(default_factory=utc_now_iso)
    """Wall-clock time of the detection, UTC, ISO-8601."""

    WHAT: ClassVar[str] = "wake event"

    @staticmethod
    def topic(prefix: str, site_id: str) -> str:
        return f"{prefix}/{site_id}/wake"

    def to_dict(self) -> dict[str, Any]:
        return {
            "siteId": self.site_id,
            "wakewordId": self.wakeword_id,
            "keyword": self.keyword,
            "score": self.score,
            "threshold": self.threshold,
            "start": self.start,
            "end": self.end,
            "timestamp": self.timestamp,
            "sessionId": self.session_id,
            "device": self.device,
            "energy": self.energy,
            "latency": self.latency,
        }

    def to_payload(self) -> bytes:
        return _dump(self.to_dict())

    @classmethod
    def from_payload(cls, payload: bytes | bytearray) -> WakeEvent:
        d = _load_object(payload, cls.WHAT)
        w = cls.WHAT
        return cls(
            site_id=_get(d, w, "siteId", str),
            wakeword_id=_get(d, w, "wakewordId", str),
            keyword=_get(d, w, "keyword", str),
            score=_get(d, w, "score", float),
            threshold=_get(d, w, "threshold", float),
            start=_get(d, w, "start", float),
            end=_get(d, w, "end", float),
            timestamp=_get(d, w, "timestamp", str),
            session_id=_get(d, w, "sessionId", str),
            device=_get(d, w, "device", str, ""),
            energy=_get(d, w, "energy", float, -120.0),
            latency=_get(d, w, "latency", float, 0.0),
        )


@dataclass(frozen=True)
class SegmentAnnouncement:
    """Describes a follow-up segment. Topic ``<prefix>/<siteId>/segment``, JSON, published right after the WAV
    on ``<prefix>/<siteId>/segment/<sessionId>`` (named in ``topic``)."""

    site_id: str
    session_id: str
    topic: str
    """Topic of the WAV bytes."""
    start: float
    """Segment start (pre-roll included), seconds of stream time."""
    duration: float
    """Segment length, seconds."""
    pre_roll: float
    """Seconds of audio before the keyword start at the beginning of the segment."""
    reason: EndReason
    """Why it ended: ``silence`` (speaker stopped), ``max_length`` (cut), ``interrupted`` (a new wake on the
    same site), ``stopped`` (daemon shutdown)."""
    sample_rate: int = SAMPLE_RATE
    """Hz."""
    sample_format: str = "s16le"
    """Sample encoding inside the WAV."""
    channels: int = 1
    size: int = 0
    """Bytes of the WAV payload."""

    WHAT: ClassVar[str] = "segment announcement"

    @staticmethod
    def topic_for(prefix: str, site_id: str) -> str:
        return f"{prefix}/{site_id}/segment"

    @staticmethod
    def wav_topic(prefix: str, site_id: str, session_id: str) -> str:
        return f"{prefix}/{site_id}/segment/{session_id}"

    def to_payload(self) -> bytes:
        return _dump(
            {
                "siteId": self.site_id,
                "sessionId": self.session_id,
                "topic": self.topic,
                "start": self.start,
                "duration": self.duration,
                "preRoll": self.pre_roll,
                "reason": self.reason,
                "sampleRate": self.sample_rate,
                "sampleFormat": self.sample_format,
                "channels": self.channels,
                "size": self.size,
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes | bytearray) -> SegmentAnnouncement:
        d = _load_object(payload, cls.WHAT)
        w = cls.WHAT
        reason = _get(d, w, "reason", str)
        if reason not in ("silence", "max_length", "interrupted", "stopped"):
            raise MessageError(f"{w}: field 'reason' has unknown value {reason!r}")
        return cls(
            site_id=_get(d, w, "siteId", str),
            session_id=_get(d, w, "sessionId", str),
            topic=_get(d, w, "topic", str),
            start=_get(d, w, "start", float),
            duration=_get(d, w, "duration", float),
            pre_roll=_get(d, w, "preRoll", float),
            reason=reason,
            sample_rate=_get(d, w, "sampleRate", int),
            sample_format=_get(d, w, "sampleFormat", str),
            channels=_get(d, w, "channels", int),
            size=_get(d, w, "size", int, 0),
        )


# ----------------------------------------------------------------------------------------------------
# Hermes (Rhasspy / Snips)


@dataclass(frozen=True)
class HotwordDetected:
    """Topic ``hermes/hotword/<wakewordId>/detected``."""

    model_id: str
    """The wake word id."""
    site_id: str = "default"
    model_version: str = ""
    model_type: str = "personal"
    """``personal`` or ``universal`` (Snips); kwsd models are ``universal`` keyword spotters."""
    current_sensitivity: float = 1.0
    """Sensitivity in use, 0..1 (kwsd: 1 − threshold)."""
    session_id: str | None = None
    send_audio_captured: bool | None = None
    lang: str | None = None
    custom_entities: list[Any] | None = None

    WHAT: ClassVar[str] = "hermes hotword detected"

    @staticmethod
    def topic(wakeword_id: str) -> str:
        return f"hermes/hotword/{wakeword_id}/detected"

    def to_payload(self) -> bytes:
        return _dump(
            {
                "modelId": self.model_id,
                "modelVersion": self.model_version,
                "modelType": self.model_type,
                "currentSensitivity": self.current_sensitivity,
                "siteId": self.site_id,
                "sessionId": self.session_id,
                "sendAudioCaptured": self.send_audio_captured,
                "lang": self.lang,
                "customEntities": self.custom_entities,
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes | bytearray) -> HotwordDetected:
        d = _load_object(payload, cls.WHAT)
        w = cls.WHAT
        return cls(
            model_id=_get(d, w, "modelId", str),
            model_version=_get(d, w, "modelVersion", str, ""),
            model_type=_get(d, w, "modelType", str, "personal"),
            current_sensitivity=_get(d, w, "currentSensitivity", float, 1.0),
            site_id=_get(d, w, "siteId", str, "default"),
            session_id=_get(d, w, "sessionId", str, None),
            send_audio_captured=_get(d, w, "sendAudioCaptured", bool, None),
            lang=_get(d, w, "lang", str, None),
            custom_entities=_get(d, w, "customEntities", list, None),
        )


@dataclass(frozen=True)
class HotwordToggle:
    """Topics ``hermes/hotword/toggleOn`` and ``hermes/hotword/toggleOff``: ``{siteId, reason}``."""

    enabled: bool
    """True for toggleOn, False for toggleOff (the topic, not a payload field)."""
    site_id: str = "default"
    reason: str = ""
    """Why (``dialogueSession``, ``playAudio``, ``ttsSay`` ...); detection resumes when all are cleared."""

    WHAT: ClassVar[str] = "hermes hotword toggle"
    TOPIC_ON: ClassVar[str] = "hermes/hotword/toggleOn"
    TOPIC_OFF: ClassVar[str] = "hermes/hotword/toggleOff"

    def topic(self) -> str:
        return self.TOPIC_ON if self.enabled else self.TOPIC_OFF

    def to_payload(self) -> bytes:
        return _dump({"siteId": self.site_id, "reason": self.reason})

    @classmethod
    def from_payload(cls, payload: bytes | bytearray, enabled: bool) -> HotwordToggle:
        w = "hermes hotword " + ("toggleOn" if enabled else "toggleOff")
        d = _load_object(payload, w)
        return cls(
            enabled=enabled,
            site_id=_get(d, w, "siteId", str, "default"),
            reason=_get(d, w, "reason", str, ""),
        )


@dataclass(frozen=True)
class HotwordError:
    """Topic ``hermes/error/hotword``: something kwsd could not do or understand."""

    error: str
    context: str | None = None
    """What it concerned (the inbound topic, usually)."""
    site_id: str = "default"
    session_id: str | None = None

    WHAT: ClassVar[str] = "hermes hotword error"
    TOPIC: ClassVar[str] = "hermes/error/hotword"

    def to_payload(self) -> bytes:
        return _dump(
            {
                "error": self.error,
                "context": self.context,
                "siteId": self.site_id,
                "sessionId": self.session_id,
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes | bytearray) -> HotwordError:
        d = _load_object(payload, cls.WHAT)
        w = cls.WHAT
        return cls(
            error=_get(d, w, "error", str),
            context=_get(d, w, "context", str, None),
            site_id=_get(d, w, "siteId", str, "default"),
            session_id=_get(d, w, "sessionId", str, None),
        )


@dataclass(frozen=True)
class AudioFrame:
    """Topic ``hermes/audioServer/<siteId>/audioFrame``: one WAV chunk (any rate, 16-bit, any channel count).

    ``from_payload`` validates the WAV; ``samples()`` gives 16 kHz mono int16 for the detector.
    """

    wav: bytes
    site_id: str = "default"

    WHAT: ClassVar[str] = "hermes audioFrame"
    MAX_RATE: ClassVar[int] = 192000
    MIN_RATE: ClassVar[int] = 8000

    @staticmethod
    def topic(site_id: str) -> str:
        return f"hermes/audioServer/{site_id}/audioFrame"

    @staticmethod
    def site_from_topic(topic: str) -> str:
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != "hermes" or parts[1] != "audioServer" or parts[3] != "audioFrame":
            raise MessageError(f"not an audioFrame topic: {topic!r}")
        return parts[2]

    def to_payload(self) -> bytes:
        return self.wav

    @classmethod
    def from_samples(
        cls, samples: np.ndarray, site_id: str = "default", sample_rate: int = SAMPLE_RATE
    ) -> AudioFrame:
        return cls(wav=to_wav(samples, sample_rate), site_id=site_id)

    @classmethod
    def from_payload(
        cls, payload: bytes | bytearray, site_id: str = "default", max_bytes: int = 262144
    ) -> AudioFrame:
        if len(payload) > max_bytes:
            raise MessageError(f"{cls.WHAT}: frame of {len(payload)} bytes exceeds the limit of {max_bytes}")
        frame = cls(wav=bytes(payload), site_id=site_id)
        frame.pcm()  # validates
        return frame

    def pcm(self) -> tuple[np.ndarray, int, int]:
        """(interleaved int16 samples, rate, channels), or ``MessageError``.

        The RIFF chunks are walked with bounds checks here (the standard library's reader raises assorted
        errors, RuntimeError among them, on hostile headers); ``fmt`` must say 16-bit PCM.
        """
        w = self.WHAT
        b = self.wav
        if len(b) < 44 or b[:4] != b"RIFF" or b[8:12] != b"WAVE":
            raise MessageError(f"{w}: payload is not a RIFF/WAVE file")
        fmt: tuple[int, int, int, int] | None = None
        data: bytes | None = None
        pos = 12
        while pos + 8 <= len(b):
            chunk, size = b[pos : pos + 4], int.from_bytes(b[pos + 4 : pos + 8], "little")
            body = pos + 8
            if chunk == b"fmt ":
                if size < 16 or body + 16 > len(b):
                    raise MessageError(f"{w}: fmt chunk of {size} bytes is too short")
                tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", b, body)
                fmt = (tag, channels, rate, bits)
            elif chunk == b"data":
                if fmt is None:
                    raise MessageError(f"{w}: data chunk before the fmt chunk")
                frame = 2 * max(1, fmt[1])
                if size in (0, 0xFFFFFFFF):  # a streaming writer that did not know the length
                    size = len(b) - body
                if body + size > len(b):
                    raise MessageError(
                        f"{w}: header claims {size // frame} frames, more than the payload holds"
                    )
                data = b[body : body + size]
                break
            pos = body + size + (size & 1)
        if fmt is None:
            raise MessageError(f"{w}: no fmt chunk")
        tag, channels, rate, bits = fmt
        if tag not in (1, 0xFFFE):
            raise MessageError(f"{w}: format tag {tag} is not PCM")
        if bits != 16:
            raise MessageError(f"{w}: sample width {bits} bits is not supported (16-bit PCM only)")
        if not 1 <= channels <= 8:
            raise MessageError(f"{w}: {channels} channels is not supported (1..8)")
        if not self.MIN_RATE <= rate <= self.MAX_RATE:
            raise MessageError(f"{w}: sample rate {rate} Hz is outside {self.MIN_RATE}..{self.MAX_RATE}")
        if data is None:
            raise MessageError(f"{w}: no data chunk")
        usable = len(data) - len(data) % (2 * channels)
        return np.frombuffer(data[:usable], dtype="<i2"), rate, channels

    def mono(self) -> tuple[np.ndarray, int]:
        """(mono int16 samples, rate): channels averaged, the sample rate left as sent."""
        data, rate, channels = self.pcm()
        if channels == 1:
            return data.astype(np.int16, copy=False), rate
        mixed = data.reshape(-1, channels).astype(np.int32).sum(axis=1) // channels
        return mixed.astype(np.int16), rate

    def samples(self) -> np.ndarray:
        """The audio as 16 kHz mono int16 (channels averaged, resampled with a polyphase filter)."""
        data, rate, channels = self.pcm()
        return to_mono_16k(data, rate, channels)


def to_mono_16k(interleaved: np.ndarray, rate: int, channels: int) -> np.ndarray:
    """Interleaved int16 at ``rate`` Hz → 16 kHz mono int16."""
    x = interleaved.reshape(-1, channels).astype(np.float32)
    mono = x.mean(axis=1) if channels > 1 else x[:, 0]
    if rate != SAMPLE_RATE and len(mono):
        mono = resample_once(mono, rate, SAMPLE_RATE)
    return np.clip(np.rint(mono), -32768, 32767).astype(np.int16)


def to_wav(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """int16 samples (interleaved when ``channels`` > 1) → WAV bytes (the one writer: ``kwsd.audio.wavfile``)."""
    return wavfile.to_wav(samples, sample_rate, channels)


# ----------------------------------------------------------------------------------------------------
# Home Assistant


@dataclass(frozen=True)
class HaEventDiscovery:
    """Home Assistant MQTT discovery of an ``event`` entity for one site.

    Topic ``<discovery_prefix>/event/<node_id>/<object_id>/config``, retained; an empty retained payload
    removes it.
    """

    discovery_prefix: str
    node_id: str
    site_id: str
    state_topic: str
    """Where the wake is published as ``{"event_type": "detected", ...}``."""
    availability_topics: tuple[str, ...]
    """Retained ``online``/``offline`` topics; the entity is available when all say ``online``."""
    sw_version: str = ""

    @property
    def object_id(self) -> str:
        return "wake_" + re.sub(r"[^A-Za-z0-9_-]", "_", self.site_id)

    @property
    def unique_id(self) -> str:
        return f"{self.node_id}_{self.object_id}"

    def topic(self) -> str:
        return f"{self.discovery_prefix}/event/{self.node_id}/{self.object_id}/config"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": f"Wake word {self.site_id}",
            "unique_id": self.unique_id,
            "object_id": f"{self.node_id}_{self.object_id}",
            "state_topic": self.state_topic,
            "event_types": ["detected"],
            "device_class": None,
            "icon": "mdi:microphone-message",
            "availability": [
                {"topic": t, "payload_available": "online", "payload_not_available": "offline"}
                for t in self.availability_topics
            ],
            "availability_mode": "all",
            "device": {
                "identifiers": [self.node_id],
                "name": "kwsd" if self.node_id == "kwsd" else f"kwsd {self.node_id}",  # not "kwsd kwsd"
                "manufacturer": "kwsd",
                "model": "wake-word daemon",
                "sw_version": self.sw_version,
            },
            "origin": {"name": "kwsd", "sw_version": self.sw_version},
        }

    def to_payload(self) -> bytes:
        d = self.to_dict()
        if d["device_class"] is None:
            del d["device_class"]
        return _dump(d)


def ha_event_payload(event: WakeEvent) -> bytes:
    """The wake on the event entity's state topic: ``{"event_type": "detected", <wake fields>}``."""
    return _dump({"event_type": "detected", **event.to_dict()})
