"""Configuration: a tree of frozen dataclasses loaded from YAML.

Defaults live only in the dataclass fields below. Loading rejects unknown keys and values of the wrong type with
an error that names the key's full path (``mqtt.tls.ca_file: file not found``), so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

DEFAULT_MODEL = Path("models/kwsd-xiaoyun.onnx")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


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


@dataclass(frozen=True)
class DetectorSettings:
    keywords: tuple[KeywordSettings, ...] = (KeywordSettings(),)
    """Keywords to detect; each has its own threshold."""
    refractory: float = 1.0
    """After a detection, the same keyword cannot fire again on the same stream for this many seconds (counted in
    samples); other keywords can."""
    step_frames: int = 3
    """Model frames (30 ms each) gathered per stream before one batched inference step."""
    beam: int = 20
    """Prefixes kept by the CTC prefix beam search."""
    top_k: int = 10
    """Tokens considered per frame (a keyword token must rank among the top k)."""
    token_floor: float = 0.01
    """Tokens below this posterior are ignored. Low enough that one keyword syllable the model half-hears
    (e.g. 小 heard as 导 at 0.02) can still complete the keyword; the threshold then decides."""


# --- audio inputs (kwsd/audio) ---------------------------------------------------------------------------------


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
        if self.rate < 0:
            raise ConfigError(f"{pre}rate", f"must be positive (or 0 for the source's rate), got {self.rate}")
        if self.channels < 0:
            raise ConfigError(
                f"{pre}channels",
                f"must be positive (or 0 for the source's count), got {self.channels}"
            )
        for ch, site in self.sites.items():
            if ch < 0 or (self.channels and ch >= self.channels):
                have = "no negative channels"
                if self.channels:
                    have = f"{self.channels} channels (0..{self.channels - 1})"
                raise ConfigError(f"{pre}sites.{ch}", f"channel {ch} is out of range: input has {have}")
            if not site:
                raise ConfigError(f"{pre}sites.{ch}", "siteId must not be empty")
        names = list(self.site_map().values())
        for site in names:
            if names.count(site) > 1:
                raise ConfigError(f"{pre}sites", f"siteId {site!r} is used by more than one channel")
        if not 1 <= self.block_ms <= 1000:
            raise ConfigError(f"{pre}block_ms", f"must be 1..1000, got {self.block_ms}")
        if self.buffer_seconds < 1.0:
            raise ConfigError(f"{pre}buffer_seconds", f"must be at least 1 second, got {self.buffer_seconds}")
        if self.stall_timeout <= 0:
            raise ConfigError(f"{pre}stall_timeout", f"must be positive, got {self.stall_timeout}")
        if len(self.reopen_backoff) != 2:
            raise ConfigError(
                f"{pre}reopen_backoff",
                f"needs two numbers [first, longest], got {self.reopen_backoff}"
            )
        lo, hi = self.reopen_backoff
        if not 0 < lo <= hi:
            raise ConfigError(
                f"{pre}reopen_backoff",
                f"needs 0 < first <= longest, got {list(self.reopen_backoff)}"
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


@dataclass(frozen=True)
class HomeAssistantSettings:
    """Home Assistant MQTT discovery: one ``event`` entity per site."""

    enabled: bool = True
    """Publish discovery configs and the wake on each site's event entity."""
    discovery_prefix: str = "homeassistant"
    """Home Assistant's discovery prefix; its birth message is expected on ``<discovery_prefix>/status``."""
    node_id: str = "kwsd"
    """Node id in discovery topics and the device identifier; use one per daemon when several run."""


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
        if self.max_frame_bytes < 64:
            raise ConfigError(f"{key}.max_frame_bytes", f"must be at least 64, got {self.max_frame_bytes}")
        if not 1 <= self.max_sites <= 1024:
            raise ConfigError(f"{key}.max_sites", f"must be 1..1024, got {self.max_sites}")
        if not 1.0 <= self.idle_timeout <= 86400:
            raise ConfigError(f"{key}.idle_timeout", f"must be 1..86400 seconds, got {self.idle_timeout}")
        if not 0.5 <= self.buffer_seconds <= 60:
            raise ConfigError(f"{key}.buffer_seconds", f"must be 0.5..60 seconds, got {self.buffer_seconds}")


@dataclass(frozen=True)
class OutboxSettings:
    """On-disk queue of messages not yet acknowledged by the broker; survives broker and daemon restarts."""

    max_bytes: int = 64 * 1024 * 1024
    """Bound on payload bytes kept; when reached, the oldest segments go first, then the oldest events."""
    max_inflight: int = 20
    """QoS 1 messages sent and not yet acknowledged at any time."""

    def validate(self, key: str) -> None:
        if self.max_bytes < 4096:
            raise ConfigError(f"{key}.max_bytes", f"must be at least 4096, got {self.max_bytes}")
        if self.max_inflight < 1:
            raise ConfigError(f"{key}.max_inflight", f"must be at least 1, got {self.max_inflight}")


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
        if not self.host:
            raise ConfigError(f"{k}host", "must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{k}port", f"must be 0..65535, got {self.port}")
        if self.qos not in (0, 1):
            raise ConfigError(f"{k}qos", f"must be 0 or 1, got {self.qos}")
        if not 5 <= self.keepalive <= 65535:
            raise ConfigError(f"{k}keepalive", f"must be 5..65535 seconds, got {self.keepalive}")
        if self.connect_timeout <= 0:
            raise ConfigError(f"{k}connect_timeout", f"must be positive, got {self.connect_timeout}")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ConfigError(f"{k}reconnect_min", "must be positive and at most reconnect_max")
        if self.password and self.password_file is not None:
            raise ConfigError(f"{k}password_file", "set either password or password_file, not both")
        if (self.password or self.password_file is not None) and not self.username:
            raise ConfigError(f"{k}username", "required when a password is set")
        if self.password_file is not None and self.password_file.is_absolute():
            if not self.password_file.is_file():
                raise ConfigError(f"{k}password_file", f"file not found: {self.password_file}")
        for name, value in (("prefix", self.prefix), ("home_assistant.node_id", self.home_assistant.node_id)):
            if not value or any(c in value for c in "+#") or value.startswith("/") or value.endswith("/"):
                raise ConfigError(f"{k}{name}", f"not a usable topic part: {value!r}")

    def read_password(self, key: str = "mqtt") -> str:
        """The password from ``password`` or ``password_file``; errors name ``<key>.password_file``."""
        if self.password_file is None:
            return self.password
        try:
            lines = self.password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"{key}.password_file", f"cannot read {self.password_file}: {exc}") from exc
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
            raise ConfigError(f"{k}vad_aggressiveness", f"must be 0..3, got {self.vad_aggressiveness}")
        for name in ("pre_roll", "min_speech"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{k}{name}", f"must not be negative, got {getattr(self, name)}")
        for name in ("silence_timeout", "initial_silence", "max_length", "lookback"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{k}{name}", f"must be positive, got {getattr(self, name)}")
        if self.max_length <= self.pre_roll:
            raise ConfigError(f"{k}max_length", f"must be longer than pre_roll ({self.pre_roll} s)")


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
            raise ConfigError(f"{key}.port", f"must be a TCP port 1..65535, got {self.port}")
        if not self.address or any(c.isspace() for c in self.address):
            raise ConfigError(f"{key}.address", f"expected an IP address or host name, got {self.address!r}")


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
        if not self.status_interval > 0:
            problem = f"must be a positive number of seconds, got {self.status_interval}"
            raise ConfigError(f"{key}.status_interval", problem)

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
    wyoming: WyomingSettings = field(default_factory=WyomingSettings)


# --------------------------------------------------------------------------------------------------------------
# Loading


def load(path: str | Path) -> Settings:
    """Read and validate a YAML config file; relative paths inside it are resolved against its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror or exc}") from exc
    return loads(text, base_dir=path.resolve().parent, source=str(path))


def loads(text: str, base_dir: Path | None = None, source: str = "<config>") -> Settings:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{source} is not valid YAML: {exc}") from exc
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
        sub = f"{key}.{name}" if key else str(name)
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


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, Mapping | list) else type(value).__name__


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
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key)  # type: ignore[arg-type]
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {_describe(value)}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {_describe(value)}")
        kt, vt = args
        return {_convert(kt, k, f"{key}.{k}"): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(key, f"expected a string, got {_describe(value)}")
        return str(value)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"expected a file path, got {_describe(value)}")
        return Path(value).expanduser()
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
