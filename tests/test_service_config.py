"""``kwsd check-config`` and the service settings."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kwsd import app
from kwsd.settings import DEFAULT_STATE_DIR, ConfigError, ServiceSettings, loads

REPO = Path(__file__).resolve().parent.parent


def _check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    parser = argparse.ArgumentParser(prog="kwsd")
    app.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["check-config", str(path)])
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_valid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "service:\n  log_level: debug\n  metrics:\n    enabled: true\n    port: 9100\n  status_interval: 10\n"
    rc, out, err = _check(tmp_path, text, capsys)
    assert (rc, err) == (0, "")
    assert out.startswith(f"{tmp_path / 'config.yaml'}: OK")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("service:\n  metric:\n    enabled: true\n", "service.metric: unknown key"),
        ("service:\n  metrics:\n    port: nine\n", "service.metrics.port: expected an integer"),
        (
            "service:\n  metrics:\n    port: 70000\n",
            "service.metrics.port: must be a TCP port 1..65535, got 70000",
        ),
        ("service:\n  metrics:\n    enabled: 'yes'\n", "service.metrics.enabled: expected true or false"),
        ("service:\n  log_level: loud\n", "service.log_level: must be one of"),
        ("service:\n  status_interval: 0\n", "service.status_interval: must be a positive number"),
        ("service: [1, 2]\n", "service: expected a mapping"),
        ("servce: {}\n", "servce: unknown key"),
        ("service:\n  metrics: {port: 1\n", "is not valid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
    rc, out, err = _check(tmp_path, text, capsys)
    assert rc == 1
    assert out == ""
    assert err.startswith(f"{tmp_path / 'config.yaml'}: ")
    assert message in err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="kwsd")
    app.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["check-config", str(tmp_path / "nope.yaml")])
    assert args.func(args) == 1
    assert "cannot read config file" in capsys.readouterr().err


def test_state_dir_precedence(tmp_path: Path) -> None:
    assert ServiceSettings().state_path({}) == DEFAULT_STATE_DIR
    # systemd's StateDirectory= sets STATE_DIRECTORY (several directories are colon-separated)
    assert ServiceSettings().state_path({"STATE_DIRECTORY": "/var/lib/kwsd:/var/lib/other"}) == Path("/var/lib/kwsd")
    assert ServiceSettings().state_path({"STATE_DIRECTORY": str(tmp_path)}) == tmp_path
    # An explicit setting wins; a relative one is relative to the config file.
    loaded = loads("service:\n  state_dir: state\n", base_dir=tmp_path)
    assert loaded.service.state_path({"STATE_DIRECTORY": "/var/lib/kwsd"}) == tmp_path / "state"


def test_metrics_address_validated() -> None:
    with pytest.raises(ConfigError, match=r"^service\.metrics\.address: "):
        loads("service:\n  metrics:\n    address: ''\n")


def test_through_the_command_line(tmp_path: Path) -> None:
    """The same check as the unit's ExecStartPre= runs it: ``kwsd check-config FILE``, exit status 1."""
    path = tmp_path / "config.yaml"
    path.write_text("service:\n  metrics:\n    port: 0\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "kwsd", "check-config", str(path)], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"{path}: service.metrics.port: must be a TCP port 1..65535, got 0"
    result = subprocess.run(
        [sys.executable, "-m", "kwsd", "check-config", "--quiet", str(REPO / "config.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
