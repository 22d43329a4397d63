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
