"""The config tree: the shipped config.yaml documents every key with its default; errors name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from kwsd import settings
from kwsd.settings import ConfigError, InputSettings, Settings

REPO = Path(__file__).resolve().parent.parent


def _keys(data: object, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(data, dict):
        for k, v in data.items():
            out.add(f"{prefix}{k}")
            out |= _keys(v, f"{prefix}{k}.")
    elif isinstance(data, list) and data and isinstance(data[0], dict):
        out |= _keys(data[0], f"{prefix}[].")
    return out


def _fields(obj: object, prefix: str = "") -> set[str]:
    """Every key of a settings object (defaults instantiated), nested sections included."""
    out: set[str] = set()
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        out.add(f"{prefix}{f.name}")
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= _fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            out |= _fields(value[0], f"{prefix}{f.name}.[].")
    return out


def test_shipped_config_documents_every_key_with_its_default() -> None:
    data = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    documented = {k for k in _keys(data) if not k.startswith("inputs.[].sites.")}  # sites maps channels
    expected = _fields(Settings()) | {f"inputs.[].{f.name}" for f in dataclasses.fields(InputSettings)}
    assert expected - documented == set(), "keys missing from config.yaml"
    assert documented - expected == set(), "config.yaml documents keys kwsd does not know"
    loaded = settings.load(REPO / "config.yaml")
    defaults = settings.resolve_paths(Settings(), REPO)
    assert dataclasses.replace(loaded, inputs=()) == defaults
    assert loaded.inputs == (InputSettings(device="default", sites={0: "default"}),)


@pytest.mark.parametrize(("text", "message"), [
    ("detector:\n  keywords:\n    - phrase: 小云小云\n      treshold: 0.3\n",
     r"detector\.keywords\[0\]\.treshold: unknown key"),
    ("mqtt:\n  port: eighty\n", r"mqtt\.port: expected an integer"),
    ("model: [1, 2]\n", r"model: expected a mapping"),
    ("inputs:\n  - device: x\n    realtime: maybe\n", r"inputs\[0\]\.realtime: expected true or false"),
    ("model:\n  path: [unclosed\n", r"not valid YAML"),
])
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings.loads(text)


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("model:\n  path: m/x.onnx\n")
    assert settings.load(tmp_path / "c.yaml").model.path == tmp_path / "m/x.onnx"
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yaml"):
        settings.load(tmp_path / "nope.yaml")


# Every number is range-checked and finite; every siteId and wake word id fits one MQTT topic level.
@pytest.mark.parametrize(("text", "key", "problem"), [
    ("detector: {refractory: .nan}", "detector.refractory", "finite"),
    ("segments: {max_length: .inf}", "segments.max_length", "finite"),
    ("inputs: [{device: x, stall_timeout: -.inf}]", "inputs[0].stall_timeout", "finite"),
    ("detector: {keywords: [{phrase: 小云小云, min_duration: .nan}]}", "detector.keywords[0].min_duration", "finite"),
    ("detector: {beam: 0}", "detector.beam", "at least 1"),
    ("detector: {keywords: [{phrase: 小云小云, max_gap: -0.1}]}", "detector.keywords[0].max_gap", "at least 0"),
    ("detector: {top_k: -3}", "detector.top_k", "at least 1"),
    ("detector: {step_frames: 100000}", "detector.step_frames", "at most 100"),
    ("detector: {token_floor: 1.0}", "detector.token_floor", "below 1"),
    ("detector: {keywords: [{phrase: 小云小云, threshold: 5}]}", "detector.keywords[0].threshold", "at most 1"),
    ("detector: {keywords: [{phrase: 小云小云, threshold: 0}]}", "detector.keywords[0].threshold", "more than 0"),
    ("detector: {keywords: [{phrase: 小云小云, min_duration: 2, max_duration: 1}]}",
     "detector.keywords[0].max_duration", "at least 2"),
    ("detector: {keywords: []}", "detector.keywords", "1 to 64"),
    ("detector: {keywords: [{phrase: '  '}]}", "detector.keywords[0].phrase", "empty"),
    ("model: {intra_op_threads: 100000000000000000000000000000}", "model.intra_op_threads", "at most 256"),
    ("model: {intra_op_threads: 1.0e+29}", "model.intra_op_threads", "expected an integer"),
    ("model: {max_batch: -1}", "model.max_batch", "at least 1"),
    ("model: {providers: ['']}", "model.providers[0]", "execution provider"),
    ("detector: {refractory: 1" + "0" * 400 + "}", "detector.refractory", "out of range"),
    ("mqtt: {port: 1" + "0" * 30 + "}", "mqtt.port", "at most 65535"),
    ("mqtt: {keepalive: 0}", "mqtt.keepalive", "at least 5"),
    ("mqtt: {reconnect_min: 5, reconnect_max: 1}", "mqtt.reconnect_min", "at most 1"),
    ("mqtt: {outbox: {max_inflight: 70000}}", "mqtt.outbox.max_inflight", "at most 65535"),
    ("mqtt: {satellites: {max_frame_bytes: 1000000000000}}", "mqtt.satellites.max_frame_bytes", "at most"),
    ("inputs: [{device: x, buffer_seconds: 1.0e+12}]", "inputs[0].buffer_seconds", "at most 600"),
    ("inputs: [{device: x, rate: 12}]", "inputs[0].rate", "at least 4000"),
    ("inputs: [{device: x, rate: 384000, channels: 64, buffer_seconds: 600}]", "inputs[0].buffer_seconds",
     "a ring of 27.5 GiB at 384000 Hz and 64 channels is more than 2 GiB"),
    ("inputs: [{device: x, reopen_backoff: [1, .inf]}]", "inputs[0].reopen_backoff[1]", "finite"),
    ("segments: {vad_aggressiveness: 9}", "segments.vad_aggressiveness", "must be 0..3"),
    ("service: {status_interval: 1.0e+300}", "service.status_interval", "at most 86400"),
    # siteIds and wake word ids become topic levels
    ("inputs: [{device: x, sites: {0: a/b}}]", "inputs[0].sites.0", "contains '/'"),
    ("inputs: [{device: x, sites: {0: 'a+'}}]", "inputs[0].sites.0", "contains '+'"),
    ("inputs: [{device: x, sites: {0: '#'}}]", "inputs[0].sites.0", "contains '#'"),
    ('inputs: [{device: x, sites: {0: "a\\0b"}}]', "inputs[0].sites.0", "NUL"),
    ("inputs: [{device: x, sites: {0: " + "k" * 300 + "}}]", "inputs[0].sites.0", "longer than 128"),
    ("inputs: [{device: x, sites: {0: ''}}]", "inputs[0].sites.0", "must not be empty"),
    ('inputs: [{device: x, sites: {0: "a\\tb"}}]', "inputs[0].sites.0", "non-character U+0009"),
    ('inputs: [{device: x, sites: {0: "a\\x90"}}]', "inputs[0].sites.0", "non-character U+0090"),
    ('inputs: [{device: x, sites: {0: "a\\x7f"}}]', "inputs[0].sites.0", "non-character U+007F"),
    ('inputs: [{device: x, sites: {0: "a\\ufdd0"}}]', "inputs[0].sites.0", "non-character U+FDD0"),
    ('inputs: [{device: x, sites: {0: "a\\U0010ffff"}}]', "inputs[0].sites.0", "non-character U+10FFFF"),
    ('detector: {keywords: [{phrase: 小云小云, id: "\\uffff"}]}', "detector.keywords[0].id", "U+FFFF"),
    ('mqtt: {prefix: "kwsd/\\x01"}', "mqtt.prefix", "U+0001"),
    ("inputs: [{device: /srv/audio/kitchen.wav}]", "inputs[0].device", "siteId when sites is empty"),
    ("inputs: [{device: x, sites: {0: a}}, {device: y, sites: {1: a}}]", "inputs[1].sites.1", "already used"),
    ("inputs: [{device: x}, {device: x}]", "inputs[1].device", "already used by inputs[0]"),
    ("inputs: [{device: x, sites: {0: a}}]\nmqtt: {satellites: {sites: [a]}}", "mqtt.satellites.sites[0]",
     "also a local site"),
    ("mqtt: {satellites: {sites: [ok, 'x/y']}}", "mqtt.satellites.sites[1]", "contains '/'"),
    ("mqtt: {satellites: {sites: [" + "s" * 65 + "]}}", "mqtt.satellites.sites[0]", "longer than 64"),
    ("detector: {keywords: [{phrase: 小云小云, id: 'x#'}]}", "detector.keywords[0].id", "wake word id"),
    ('detector: {keywords: [{phrase: 小云小云, id: "a\\0"}]}', "detector.keywords[0].id", "NUL"),
    ("detector: {keywords: [{phrase: 小云小云}, {phrase: 小云 小云}]}", "detector.keywords[1].id", "already used"),
    ("mqtt: {prefix: 'a//b'}", "mqtt.prefix", "empty topic level"),
    ("mqtt: {prefix: 'kwsd/+'}", "mqtt.prefix", "contains '+'"),
    ("mqtt: {home_assistant: {node_id: 'my node'}}", "mqtt.home_assistant.node_id", "A-Z a-z 0-9"),
    ("mqtt: {home_assistant: {discovery_prefix: '/ha'}}", "mqtt.home_assistant.discovery_prefix", "empty"),
    ('mqtt: {host: "\\ud800"}', "mqtt.host", "not valid Unicode"),
    ('model: {path: "m\\0.onnx"}', "model.path", "NUL"),
])
def test_bad_values_name_the_key(text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings.loads(text + "\n")
    assert info.value.key == key, str(info.value)
    assert problem in info.value.problem
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_the_limits_themselves_are_accepted() -> None:
    loaded = settings.loads(
        "model: {intra_op_threads: 256, max_batch: 1}\n"
        "detector: {beam: 1, top_k: 1, step_frames: 100, refractory: 0, token_floor: 0,\n"
        "           keywords: [{phrase: 小云小云, id: " + "k" * settings.TOPIC_LEVEL_MAX + ", threshold: 1}]}\n"
        "inputs: [{device: x, rate: 48000, channels: 2, sites: {0: 'living room', 1: 厨房}}]\n"
        "mqtt: {prefix: home/kwsd, satellites: {sites: [sat-1]}}\n"
    )
    assert loaded.inputs[0].site_map() == {0: "living room", 1: "厨房"}
    assert loaded.detector.keywords[0].wakeword_id == "k" * 128


@pytest.mark.parametrize(("data", "problem"), [
    ("caf\xe9: 1\n".encode("latin-1"), "not UTF-8 text: byte 0xe9 at line 1, column 4"),
    ("model: {}\n".encode("utf-16-le"), "NUL byte at line 1, column 2"),
    (b"\xff\xfe" + b"a\x00:", "not valid UTF-16-LE text"),
    (bytes(range(256)) * 4, "NUL byte at line 1, column 1"),
    (b"a: " + b"[" * 5000, "line 1, column 35: not valid YAML: nested more than 32 levels deep"),
    (b"mqtt: {port: " + b"9" * 5000 + b"}", "line 1, column 14: not valid YAML: integer too long"),
    (b"mqtt: {port: 1}\nmqtt: {port: 2}\n", "line 2, column 1: not valid YAML: duplicate key 'mqtt'"),
    (b"service: {state_dir: !!python/object:os.system x}", "line 1, column 22: not valid YAML: could not"),
    (b"model: {path: 2001-02-30}", "line 1, column 15: not valid YAML: cannot read this value"),
    (b"a: \x07", "line 1, column 4: not valid YAML: character #x0007 is not allowed"),
    (b'mqtt: {host: "\\U7fffffff"}', "line 1, column 17: not valid YAML: an escape sequence or value out of range"),
    (b'mqtt: {host: "\\Uffffffff"}', "line 1, column 17: not valid YAML: an escape sequence or value out of range"),
    (b"x: 1\n" * 300000, "larger than 1 MiB"),
])
def test_unreadable_files_give_one_line(tmp_path: Path, data: bytes, problem: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        settings.load(path)
    assert problem in str(info.value)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize("codec", ["utf-8-sig", "utf-16", "utf-32"])
def test_unicode_with_a_byte_order_mark_is_read(tmp_path: Path, codec: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("detector:\n  keywords: [{phrase: 小云小云, id: 小云}]\n", encoding=codec)
    assert settings.load(path).detector.keywords[0].wakeword_id == "小云"


@pytest.mark.parametrize("broken", [
    '  password: "s3cr3t-PASS\n',              # unclosed quote: the error is found at the end of the file
    "  password: s3cr3t-PASS: x\n",            # a second colon on the line
    "  password: [s3cr3t-PASS\n",              # unclosed flow sequence
    "  password: s3cr3t-PASS\n   bad: 1\n",    # wrong indentation after it
    "  password: {s3cr3t-PASS: [1, 2]}\n",     # the wrong type
    "  password: !!binary s3cr3t-PASS\n",      # not base64
])
def test_a_yaml_error_never_shows_the_password(broken: str) -> None:
    text = "mqtt:\n  username: kwsd\n" + broken + "service: {log_level: info}\n"
    with pytest.raises(ConfigError) as info:
        settings.loads(text)
    assert "s3cr3t" not in str(info.value) and "PASS" not in str(info.value)
    assert "line " in str(info.value) or info.value.key == "mqtt.password", str(info.value)
