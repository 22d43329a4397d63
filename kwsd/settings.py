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
    threshold: float = 0.2
    """Detection threshold on the length-normalised keyword score (0..1); higher means fewer false wakes."""
    min_duration: float = 0.25
    """Shortest plausible keyword, seconds."""
    max_duration: float = 2.5
    """Longest plausible keyword, seconds."""

    @property
    def wakeword_id(self) -> str:
        return self.id or self.phrase.replace(" ", "")


@dataclass(frozen=True)
class DetectorSettings:
    keywords: tuple[KeywordSettings, ...] = (KeywordSettings(),)
    """Keywords to detect; each has its own threshold."""
    refractory: float = 1.0
    """After a detection, the same stream cannot fire again for this many seconds (counted in samples)."""
    step_frames: int = 3
    """Model frames (30 ms each) gathered per stream before one batched inference step."""
    beam: int = 20
    """Prefixes kept by the CTC prefix beam search."""
    top_k: int = 3
    """Tokens considered per frame."""
    token_floor: float = 0.05
    """Tokens below this posterior are ignored."""


# --- audio inputs (kwsd/audio) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSettings:
    """One capture device, file or stdin; its channels feed one site each."""


# --- MQTT (kwsd/mqtt) ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MqttSettings:
    """Broker connection and the topic conventions kwsd publishes."""


# --- follow-up segments (kwsd/segments.py) ---------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentSettings:
    """The audio published after a wake: pre-roll, then speech until silence or the maximum length."""


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


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    inputs: tuple[InputSettings, ...] = ()
    """Capture devices and replay sources."""
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    segments: SegmentSettings = field(default_factory=SegmentSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)


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
    return dataclasses.replace(obj, **changes) if changes else obj  # type: ignore[type-var]


def _resolve_value(value: Any, base_dir: Path) -> Any:
    if isinstance(value, Path):
        return value if value.is_absolute() else base_dir / value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return resolve_paths(value, base_dir)
    if isinstance(value, tuple):
        items = tuple(_resolve_value(v, base_dir) for v in value)
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    return value
