"""``kwsd check-config`` and the service settings."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import wave
from pathlib import Path

import pytest
import yaml

from kwsd import app
from kwsd.settings import DEFAULT_STATE_DIR, ConfigError, ServiceSettings, loads
from tests.fixtures_broker import free_port

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


def _base(model_path: Path, tmp_path: Path) -> str:
    """What every config that passes needs here: the model, and a state folder this test may write."""
    return f"model: {{path: {model_path}}}\n" + f"service: {{state_dir: {tmp_path / 'state'}}}\n"


def test_valid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], model_path: Path) -> None:
    text = (f"model: {{path: {model_path}}}\n" + f"service:\n  state_dir: {tmp_path / 'state'}\n  log_level: debug\n"
            f"  metrics:\n    enabled: true\n    port: {free_port()}\n  status_interval: 10\n")
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
        ("service:\n  status_interval: 0\n", "service.status_interval: must be at least 0.1 and at most 86400"),
        ("service: [1, 2]\n", "service: expected a mapping"),
        ("servce: {}\n", "servce: unknown key"),
        ("service:\n  metrics: {port: 1\n", "line 3, column 1: not valid YAML: expected ',' or '}'"),
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


def _tiny_onnx(path: Path) -> Path:
    """A valid ONNX graph that is not a kwsd export (no contract in its metadata)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(path))
    return path


def _relabelled_model(model_path: Path, tmp_path: Path, **changes: str) -> Path:
    """The real model with some of its contract metadata changed."""
    import onnx

    model = onnx.load(str(model_path))
    for prop in model.metadata_props:
        if prop.key in changes:
            prop.value = changes[prop.key]
    out = tmp_path / "relabelled.onnx"
    onnx.save(model, str(out))
    return out


def _wav(path: Path, rate: int = 16000, channels: int = 1, width: int = 2) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(b"\0" * (width * channels * rate // 10))
    return path


def _host_cases(tmp: Path) -> dict[str, tuple[dict, str]]:
    """Configs that pass every check of the file itself but not one of the host, with the line expected."""
    wav = tmp / "a.wav"
    return {
        "model missing": ({"model": {"path": str(tmp / "nope.onnx")}}, r"model.path: model file .*nope.onnx not found"),
        "model not ONNX": ({"model": {"path": str(REPO / "config.yaml")}},
                           r"model.path: model file .*config.yaml is not an ONNX model"),
        "ONNX, not kwsd's": ({"model": {"path": str(tmp / "tiny.onnx")}},
                             r"model.path: model file .*tiny.onnx: metadata key 'kwsd.format' is missing"),
        "contract disagrees": ({"model": {"path": str(tmp / "relabelled.onnx")}},
                               r"model.path: model file .*relabelled.onnx: cache input \[4, 128, 11\] disagrees"),
        "keyword not spellable": ({"detector": {"keywords": [{"phrase": "小云😀"}]}},
                                  r"detector.keywords\[0\].phrase: keyword '小云😀': character '😀' .* not in"),
        "top_k above the tokens": ({"detector": {"top_k": 5000}},
                                   r"detector.top_k: must be at most the model's 2599 tokens"),
        "metrics address not here": ({"service": {"metrics": {"enabled": True, "address": "192.0.2.7"}}},
                                     r"service.metrics.address: cannot listen on 192.0.2.7:9750"),
        "metrics host unknown": ({"service": {"metrics": {"enabled": True, "address": "no-such-host.invalid"}}},
                                 r"service.metrics.address: cannot resolve 'no-such-host.invalid'"),
        "state_dir is a file": ({"service": {"state_dir": str(REPO / "config.yaml")}},
                                r"service.state_dir: .*config.yaml is not a folder"),
        "replay file missing": ({"inputs": [{"device": str(tmp / "gone.wav"), "sites": {0: "a"}}]},
                                r"inputs\[0\].device: cannot replay .*gone.wav: no such file"),
        "replay file not audio": ({"inputs": [{"device": str(REPO / "config.yaml"), "kind": "file",
                                               "sites": {0: "a"}}]},
                                  r"inputs\[0\].device: cannot replay .*config.yaml: cannot read audio: not an audio"),
        "replay rate differs": ({"inputs": [{"device": str(wav), "rate": 48000, "sites": {0: "a"}}]},
                                r"inputs\[0\].rate: .*a.wav is 16000 Hz, but rate says 48000"),
        "replay too few channels": ({"inputs": [{"device": str(wav), "sites": {1: "a"}}]},
                                    r"inputs\[0\].sites: .*a.wav has 1 channel\(s\); sites need channel 1"),
        "replay truncated": ({"inputs": [{"device": str(tmp / "b.wav"), "sites": {0: "a"}}]},
                             r"inputs\[0\].device: cannot replay .*b.wav: truncated"),
    }


def _host_case(case: str, model: Path, tmp: Path) -> tuple[dict, str]:
    """The files of the cases made in ``tmp``; the case's config (over a good base) and its expected line."""
    _wav(tmp / "a.wav")
    (tmp / "b.wav").write_bytes(_wav(tmp / "full.wav").read_bytes()[:44])  # a header announcing audio, none there
    _tiny_onnx(tmp / "tiny.onnx")
    _relabelled_model(model, tmp, **{"kwsd.cache_shape": "[4, 128, 9]"})
    extra, expected = _host_cases(tmp)[case]
    cfg: dict = {"model": {"path": str(model)}, "service": {"state_dir": str(tmp / "state")}}
    for section, value in extra.items():
        cfg[section] = {**cfg[section], **value} if isinstance(value, dict) and section in cfg else value
    return cfg, expected


HOST_CASES = sorted(_host_cases(Path("/nonexistent")))


@pytest.mark.parametrize("case", HOST_CASES)
def test_host_checks_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], model_path: Path,
                                  case: str) -> None:
    cfg, expected = _host_case(case, model_path, tmp_path)
    rc, out, err = _check(tmp_path, yaml.safe_dump(cfg, allow_unicode=True), capsys)
    assert (rc, out) == (1, ""), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.match(rf"^{re.escape(str(tmp_path / 'config.yaml'))}: {expected}", err), err


def test_busy_metrics_port_and_tls_and_password_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      model_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        metrics = f"metrics: {{enabled: true, port: {port}}}"
        text = f"model: {{path: {model_path}}}\nservice: {{state_dir: {tmp_path}, {metrics}}}\n"
        rc, _, err = _check(tmp_path, text, capsys)
        assert rc == 1 and f"service.metrics.port: 127.0.0.1:{port} is already in use" in err
    # The same config passes once the port is free again.
    assert _check(tmp_path, text, capsys)[0] == 0

    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    rc, _, err = _check(tmp_path, _base(model_path, tmp_path) + f"mqtt: {{tls: {{ca_file: {garbage}}}}}\n", capsys)
    assert rc == 1 and "mqtt.tls.ca_file: cannot load CA certificates from" in err and err.count("\n") == 1

    secret = tmp_path / "password"
    secret.write_bytes(b"\xffs3cr3t\n")
    text = _base(model_path, tmp_path) + f"mqtt: {{username: kwsd, password_file: {secret}}}\n"
    rc, _, err = _check(tmp_path, text, capsys)
    assert rc == 1 and f"mqtt.password_file: {secret} is not UTF-8 text" in err and "s3cr3t" not in err
    # With MQTT off, nothing of it is used, so nothing of it is checked.
    assert _check(tmp_path, text.replace("{username", "{enabled: false, username"), capsys)[0] == 0


def _kwsd(*args: str, env: dict[str, str] | None = None, unprivileged: bool = False
          ) -> subprocess.CompletedProcess[str]:
    """``kwsd ARGS`` as a process; ``unprivileged``: without any capability, as the shipped unit runs it
    (``CapabilityBoundingSet=``), so file permissions apply to it as to any other user."""
    cmd = [sys.executable, "-m", "kwsd", *args]
    if unprivileged:
        cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", *cmd]
    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=60, cwd=REPO)


@pytest.mark.parametrize(("data", "problem"), [
    ("mqtt:\n  host: café\n".encode("latin-1"), "not UTF-8 text: byte 0xe9 at line 2, column 12"),
    ("model: {}\n".encode("utf-16-le"), "contains a NUL byte"),
    (b"a: " + b"[" * 100000, "nested more than 32 levels deep"),
    (b"mqtt: {port: " + b"9" * 100000 + b"}", "integer too long"),
    (b"mqtt: {port: 1" + b"0" * 40 + b"}", "mqtt.port: must be at least 0 and at most 65535"),
    (bytes(range(1, 256)) * 50, "not UTF-8 text"),
    (b"mqtt:\n  username: kwsd\n  password: 's3cr3t\n", "line 4, column 1: not valid YAML"),
])
def test_check_config_and_run_print_one_line(tmp_path: Path, data: bytes, problem: str) -> None:
    """Through the real command line: one line naming the file and the problem, exit status 1, both commands."""
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    check = _kwsd("check-config", str(path))
    assert (check.returncode, check.stdout) == (1, "")
    assert check.stderr.startswith(f"{path}: ") and check.stderr.count("\n") == 1, check.stderr
    assert problem in check.stderr and "Traceback" not in check.stderr and "s3cr3t" not in check.stderr
    run = _kwsd("run", "--config", str(path))
    assert (run.returncode, run.stderr) == (1, f"kwsd run: {check.stderr}")


def test_run_refuses_what_check_config_refuses_on_the_host(tmp_path: Path, model_path: Path) -> None:
    path = tmp_path / "config.yaml"
    cfg, _ = _host_case("keyword not spellable", model_path, tmp_path)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    check = _kwsd("check-config", str(path))
    run = _kwsd("run", "--config", str(path))
    assert check.returncode == run.returncode == 1
    assert run.stderr == f"kwsd run: {check.stderr}" and "detector.keywords[0].phrase" in run.stderr


def test_a_damaged_model_is_refused_by_both(tmp_path: Path, model_path: Path) -> None:
    """Weights cut short inside an ONNX whose contract reads fine: onnxruntime would refuse to load it, and so
    does check-config, without loading it; run stops at the same line."""
    import onnx

    model = onnx.load(str(model_path))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    weight.raw_data = weight.raw_data[:100]
    damaged = tmp_path / "damaged.onnx"
    onnx.save(model, str(damaged))
    path = tmp_path / "config.yaml"
    path.write_text(_base(damaged, tmp_path), encoding="utf-8")
    check = _kwsd("check-config", str(path))
    assert check.returncode == 1
    assert check.stderr.startswith(f"{path}: model.path: model file {damaged} is damaged: ")
    assert "too small for the declared shape" in check.stderr and check.stderr.count("\n") == 1
    run = _kwsd("run", "--config", str(path))
    assert (run.returncode, run.stderr) == (1, f"kwsd run: {check.stderr}")


def test_state_dir_must_be_writable_by_the_service_user(tmp_path: Path, model_path: Path) -> None:
    """A state folder of another user, then an outbox file of another user left there (kwsd run once as that
    user): check-config refuses both, run without privileges as the unit runs it."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chown(state, 65534, 65534)
    config = tmp_path / "config.yaml"
    config.write_text(_base(model_path, tmp_path), encoding="utf-8")
    result = _kwsd("check-config", str(config), unprivileged=True)
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"{config}: service.state_dir: {state} is not writable by this user (uid 0)\n"

    os.chown(state, 0, 0)
    assert _kwsd("check-config", "-q", str(config), unprivileged=True).returncode == 0
    (state / "outbox").mkdir()
    leftover = state / "outbox" / "outbox.sqlite3"
    leftover.write_bytes(b"")
    leftover.chmod(0o600)
    os.chown(leftover, 65534, 65534)
    result = _kwsd("check-config", str(config), unprivileged=True)
    assert result.returncode == 1
    assert f"service.state_dir: {leftover} is not readable and writable by this user" in result.stderr
    # The daemon itself stops at the same line.
    run = _kwsd("run", "--config", str(config), unprivileged=True)
    assert (run.returncode, run.stderr) == (1, f"kwsd run: {result.stderr}")


def test_a_reload_may_keep_its_own_metrics_port(tmp_path: Path, model_path: Path) -> None:
    """The running daemon holds its metrics port; its reload must not call that port busy, check-config must."""
    from kwsd.settings import load_for_run

    with socket.socket() as held:  # what the running daemon's endpoint looks like to a new bind
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        path = tmp_path / "config.yaml"
        path.write_text(f"model: {{path: {model_path}}}\nservice: {{state_dir: {tmp_path}, "
                        f"metrics: {{enabled: true, port: {port}}}}}\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=rf"^service\.metrics\.port: 127\.0\.0\.1:{port} is already in use"):
            load_for_run(path)
        running = load_for_run(path, running=loads(path.read_text(), base_dir=tmp_path))
        assert running.service.metrics.port == port
        # A reload that moves the endpoint to another busy port is refused like a start.
        other = loads(path.read_text().replace(str(port), str(free_port())), base_dir=tmp_path)
        with pytest.raises(ConfigError, match=r"^service\.metrics\.port: .* is already in use"):
            load_for_run(path, running=other)
