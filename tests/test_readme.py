"""What the README tells a user matches what the code does: topics, metrics, scripts, config comments."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import yaml

from kwsd.metrics import Metrics
from kwsd.mqtt.messages import HaEventDiscovery
from tests.conftest import REPO

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
        exposed.add(family.name + ("_total" if family.type == "counter" else ""))
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
