"""What the README tells a user matches what the code does: topics, metrics, scripts, config comments."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kwsd import settings
from kwsd.metrics import Metrics
from kwsd.mqtt.messages import HaEventDiscovery
from tests.conftest import REPO
from tests.fixtures_broker import Broker, Subscriber

README = (REPO / "README.md").read_text(encoding="utf-8")


def table_rows(heading: str) -> list[list[str]]:
    """The cells of the first table after ``heading``, header and rule rows left out."""
    lines = README.split(heading, 1)[1].splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith("## ")), None)
    lines = lines[:end]
    rows = [line for line in lines if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def test_home_assistant_discovery_topic_and_device_name() -> None:
    topics = [row[0] for row in table_rows("## MQTT topics and payloads")]
    assert "`homeassistant/event/<node>/wake_<siteId>/config`" in topics
    assert "`kwsd/<siteId>/event`" in topics
    d = HaEventDiscovery("homeassistant", "kwsd", "kitchen", "kwsd/kitchen/event", ("kwsd/status",))
    assert d.topic() == "homeassistant/event/kwsd/wake_kitchen/config"
    assert d.to_dict()["device"]["name"] == "kwsd"  # not "kwsd kwsd"
    assert HaEventDiscovery("homeassistant", "attic", "a", "t", ()).to_dict()["device"]["name"] == "kwsd attic"
    # the entity id the automation example uses comes from the discovery's object_id
    assert d.to_dict()["object_id"] == "kwsd_wake_kitchen" and "event.kwsd_wake_kitchen" in README


def test_segment_audio_is_documented_before_its_announcement() -> None:
    topics = [row[0] for row in table_rows("## MQTT topics and payloads")]
    assert topics.index("`kwsd/<siteId>/segment/<sessionId>`") < topics.index("`kwsd/<siteId>/segment`")


def test_every_metric_is_listed_with_a_line() -> None:
    listed = {row[0].strip("`").split("{")[0]: row[1] for row in table_rows("## Metrics")}
    exposed = set()
    for family in Metrics().registry.collect():
        exposed.add(family.name + {"counter": "_total", "info": "_info"}.get(family.type, ""))
    assert set(listed) == exposed
    assert all(len(text) > 20 for text in listed.values())


def test_scripts_the_readme_names_run_from_the_venv() -> None:
    named = sorted(set(re.findall(r"scripts/([a-z_]+\.py)", README)))
    assert len(named) >= 7
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")  # venv active
    for name in named:
        path = REPO / "scripts" / name
        assert os.access(path, os.X_OK), f"{name} is not executable"
        assert path.read_text().startswith("#!/usr/bin/env python3\n"), name
        r = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: {name}"), (name, r.stderr[-500:])


def test_config_comment_for_stdin_is_valid_yaml() -> None:
    text = (REPO / "config.yaml").read_text()
    assert 'or "-" (quoted) for raw s16le on stdin' in text
    assert yaml.safe_load('device: "-"') == {"device": "-"}
    try:  # why the README and config say to quote it
        yaml.safe_load("inputs:\n  - device: -\n")
    except yaml.YAMLError as exc:
        assert "sequence entries are not allowed here" in str(exc)
    else:
        raise AssertionError("a bare - loaded")
    assert '- device: "-"                     # quoted: a bare - is a YAML syntax error' in README


def test_no_wheel_is_committed() -> None:
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0
    assert not [f for f in listed.stdout.splitlines() if f.endswith((".whl", ".onnx", ".wav"))]


def try_configs() -> list[dict]:
    """The YAML blocks of "Try it without a microphone", parsed."""
    section = README.split("## Try it without a microphone", 1)[1].split("\n## ", 1)[0]
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", section, re.S)]


def test_try_it_configs_are_valid(tmp_path: Path) -> None:
    configs = try_configs()
    assert [c["inputs"][0]["device"] for c in configs] == [
        "models/upstream/example/kws_xiaoyunxiaoyun.wav", "-", "fake.monitor"]
    for cfg in configs:
        settings.loads(yaml.safe_dump(cfg), base_dir=REPO)  # the daemon accepts it as it stands


@pytest.mark.broker
def test_try_it_replay_wakes_over_mqtt(
    broker: Broker, audio_dir: Path, model_mirror: Path, model_path: Path, tmp_path: Path
) -> None:
    """The first way, run as the README says from the checkout, against a real mosquitto."""
    cfg = try_configs()[0]
    example = model_mirror / "example/kws_xiaoyunxiaoyun.wav"
    if not example.is_file():  # set up from a mirror without it: the README says to use KWSD_MODEL_EXAMPLE's file
        cfg["inputs"][0]["device"] = str(audio_dir / "positive/kws_xiaoyunxiaoyun.wav")
    cfg["service"]["state_dir"] = str(tmp_path / "state")
    cfg["mqtt"] = {"port": broker.port}  # the README's broker is on the default port; this one is private
    cfg["model"] = {"path": str(model_path)}  # what models/... resolves to with try.yaml saved in the checkout
    config = tmp_path / "try.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    sub = Subscriber(broker, "kwsd/#")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KWSD_", "NOTIFY_SOCKET"))}
    proc = subprocess.Popen([str(Path(sys.prefix) / "bin" / "kwsd"), "run", "--config", str(config)], cwd=REPO,
                            env=clean, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        [wake] = sub.wait_for(1, "kwsd/desk/wake", timeout=30)
        assert json.loads(wake.payload)["keyword"] == "小云小云"
        [segment] = sub.wait_for(1, "kwsd/desk/segment/", timeout=15)
        assert segment.payload[:4] == b"RIFF"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        sub.close()
    assert proc.returncode == 0, out
    assert "wake: site desk heard 小云小云" in out
