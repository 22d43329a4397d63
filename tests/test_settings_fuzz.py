"""Fuzzed configs through the one loader: no traceback, no secret in a message, and what passes starts ``run``.

A seeded ``hypothesis`` search mutates the repo's config.yaml, made runnable here (the real model, a real
recording replayed as the input, a real mosquitto, a state folder in the test's folder): values of every key
(known-bad ones: NaN/inf, zero, negative, huge integers, topic-breaking siteIds, characters the model lacks), keys
removed and added, a second input reusing a siteId, the model swapped for files that are not a kwsd export, a
state folder that is a file, a busy metrics port; then the text itself: other encodings, cut, flipped and
inserted bytes, deep nesting, a broken password line. Each result goes through ``load_for_run`` (what
``check-config`` and ``run`` call): it must either pass or raise one ``ConfigError`` line that does not contain the
password. A bounded number of the configs that passed then start the real ``kwsd run``, each to READY=1 on its
own NOTIFY_SOCKET, and stop cleanly on SIGTERM.
"""

from __future__ import annotations

import copy
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from kwsd import settings
from kwsd.settings import ConfigError
from tests.fixtures_broker import Broker, free_port
from tests.fixtures_systemd import NotifySocket
from tests.test_service_config import _relabelled_model, _tiny_onnx

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-Pa55word"
EXAMPLES = int(os.environ.get("KWSD_FUZZ_EXAMPLES", "300"))
"""Mutated configs tried (seeded: the same ones on every run); raise it for a longer search."""
RUNS = int(os.environ.get("KWSD_FUZZ_RUNS", "6"))
"""Of those check-config accepts, how many start ``kwsd run`` to READY, ``BATCH`` at a time."""
BATCH = 6
READY_TIMEOUT = 45.0

KNOWN_BAD: list[Any] = [
    math.nan, math.inf, -math.inf, 0, -1, 0.0, 5, 1e29, 10**29, -(10**30), 10**400, 2**63,
    "", "a/b", "x+", "#", "nul\x00", "k" * 300, "小云😀", "\ud800", "  ", True, False, None, [], {}, [1, 2, 3],
    {"a": 1}, "1e29", "0x10", "~", "../../etc",
]


@dataclass
class World:
    """The runnable base config and the files its mutations may point at."""

    base: dict
    folder: Path
    files: dict[str, str] = field(default_factory=dict)
    busy_port: int = 0
    broker_port: int = 0


def _leaves(data: Any, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(data, list) and data:
        for i, v in enumerate(data):
            yield from _leaves(v, (*path, i))
    if path:
        yield path


def _get(data: Any, path: tuple) -> Any:
    for p in path:
        data = data[p]
    return data


def _set(data: Any, path: tuple, value: Any) -> None:
    _get(data, path[:-1])[path[-1]] = value


def _values(default: Any) -> st.SearchStrategy[Any]:
    options: list[st.SearchStrategy[Any]] = [
        st.sampled_from(KNOWN_BAD),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=40),
    ]
    if isinstance(default, int | float) and not isinstance(default, bool):
        # near the default, where most values are valid and get through to run
        options += [st.sampled_from([0.5, 1, 2, 3, 10, 0.1]).map(lambda f: type(default)(default * f))] * 3
    if isinstance(default, bool):
        options += [st.booleans()] * 3
    return st.one_of(options)


@st.composite
def _mutation(draw: st.DrawFn, world: World) -> tuple[str, dict, Any]:
    """One change to the config data: (what, new data, text mutation or None)."""
    data = copy.deepcopy(world.base)
    leaves = sorted(_leaves(data), key=repr)
    kind = draw(st.sampled_from(["value"] * 6 + ["delete", "unknown", "special"]))
    if kind == "value":
        path = draw(st.sampled_from(leaves))
        value = draw(_values(_get(data, path)))
        _set(data, path, value)
        what = f"{'.'.join(map(str, path))} = {value!r:.40}"
    elif kind == "delete":
        path = draw(st.sampled_from(leaves))
        parent = _get(data, path[:-1])
        del parent[path[-1]]
        what = f"delete {'.'.join(map(str, path))}"
    elif kind == "unknown":
        sections = [p for p in _leaves(data) if isinstance(_get(data, p), dict)] + [()]
        path = draw(st.sampled_from(sorted(sections, key=repr)))
        key = draw(st.sampled_from(["treshold", "sites2", "Port", "", "x" * 100, 1, "a.b"]))
        _get(data, path)[key] = 1
        what = f"unknown key {key!r:.20} under {'.'.join(map(str, path))}"
    else:
        specials = [*sorted(world.files), "duplicate site", "busy metrics port", "free metrics port", "keyword"]
        special = draw(st.sampled_from(specials))
        what = special
        if special.startswith("model:"):
            data["model"]["path"] = world.files[special]
        elif special.startswith("state:"):
            data["service"]["state_dir"] = world.files[special]
        elif special == "duplicate site":
            data["inputs"].append({**data["inputs"][0], "sites": {0: draw(st.sampled_from(["kitchen", "hall"]))}})
        elif special in ("busy metrics port", "free metrics port"):
            port = world.busy_port if special.startswith("busy") else free_port()
            data["service"]["metrics"].update(enabled=True, port=port)
        else:
            phrase = draw(st.sampled_from(["小云小云", "你好小云", "小云😀", "hello", "ｘｙｚ", "小 云 小 云", "云"]))
            data["detector"]["keywords"][0]["phrase"] = phrase
            what = f"keyword {phrase}"
    text = draw(st.one_of(
        *[st.none()] * 7,
        st.sampled_from(["latin-1", "utf-16", "utf-16-le", "utf-32", "utf-8-sig"]).map(lambda c: ("encode", c)),
        st.tuples(st.just("cut"), st.floats(0, 1)),
        st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4)),
        st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=20)),
        st.tuples(st.just("nest"), st.integers(20, 5000)),
        st.tuples(st.just("password line"), st.floats(0, 1), st.sampled_from(["'", '"', ": ", "[", "{", "\t", "\n x"])),
    ))
    return what, data, text


def _dump(data: dict) -> str:
    try:
        text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # a lone surrogate: YAML's escape for it
        return yaml.safe_dump(data, allow_unicode=False, sort_keys=False)


def _apply(text: str, mutation: Any) -> bytes:
    raw = text.encode("utf-8")
    if mutation is None:
        return raw
    kind = mutation[0]
    if kind == "encode":
        return text.encode(mutation[1], errors="replace")
    if kind == "cut":
        return raw[: int(len(raw) * mutation[1])]
    if kind == "flip":
        out = bytearray(raw)
        for where, byte in mutation[1]:
            out[min(len(out) - 1, int(len(out) * where))] = byte
        return bytes(out)
    if kind == "insert":
        at = int(len(raw) * mutation[1])
        return raw[:at] + mutation[2] + raw[at:]
    if kind == "nest":
        return raw + b"extra: " + b"[" * mutation[1] + b"]" * mutation[1] + b"\n"
    lines = text.splitlines(keepends=True)
    i = next((n for n, line in enumerate(lines) if SECRET in line), None)
    if i is None:  # the mutation removed the password
        return raw
    at = int(len(lines[i].rstrip("\n")) * mutation[1])
    lines[i] = lines[i][:at] + mutation[2] + lines[i][at:]
    return "".join(lines).encode("utf-8")


@pytest.fixture
def world(tmp_path: Path, model_path: Path, positives: list[Path], broker: Broker) -> Iterator[World]:
    data = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    data["model"]["path"] = str(model_path)
    data["inputs"][0].update(device=str(positives[0]), kind="file", sites={0: "kitchen"})
    data["mqtt"].update(host="127.0.0.1", port=broker.port, username="kwsd", password=SECRET,
                        reconnect_min=0.2, reconnect_max=1.0)
    data["service"]["state_dir"] = "state"  # beside the config file: each daemon below has its own
    assert settings.loads(_dump(data)) is not None  # the base itself is valid
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("x")
    files = {
        "model: missing": str(tmp_path / "missing.onnx"),
        "model: config.yaml": str(REPO / "config.yaml"),
        "model: not kwsd's": str(_tiny_onnx(tmp_path / "tiny.onnx")),
        "model: contract off": str(_relabelled_model(model_path, tmp_path, **{"kwsd.delay_frames": "x"})),
        "state: a file": str(not_a_folder),
        "state: deeper, new": str(tmp_path / "new" / "state"),
    }
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield World(data, tmp_path, files, busy.getsockname()[1], broker.port)


@dataclass
class Tried:
    what: str
    text: bytes
    error: str = ""


@pytest.mark.broker
@pytest.mark.slow
def test_fuzzed_configs_never_traceback_and_what_passes_runs(world: World, tmp_path: Path) -> None:
    tried: list[Tried] = []
    path = tmp_path / "fuzzed.yaml"

    @hsettings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
               suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data: st.DataObject) -> None:
        what, mutated, text_mutation = data.draw(_mutation(world))
        if isinstance(mutated.get("mqtt"), dict) and mutated["mqtt"].get("client_id") == "":
            mutated["mqtt"]["client_id"] = f"fuzz-{len(tried)}"  # daemons run side by side need their own ids
        raw = _apply(_dump(mutated), text_mutation)
        path.write_bytes(raw)
        one = Tried(f"{what}; text: {text_mutation!r:.40}", raw)
        try:
            settings.load_for_run(path)
        except ConfigError as exc:
            one.error = str(exc)
            assert "\n" not in one.error and "\r" not in one.error, one.error
            assert len(one.error) < 400, one.error
            assert SECRET not in one.error and "Pa55" not in one.error, one.error
        tried.append(one)

    t0 = time.monotonic()
    check()
    check_seconds = time.monotonic() - t0
    accepted = [t for t in tried if not t.error]
    rejected = [t for t in tried if t.error]
    keys = sorted({t.error.split(":", 1)[0] for t in rejected})
    print(f"\nconfigs tried {len(tried)} in {check_seconds:.1f} s: {len(accepted)} accepted, {len(rejected)} rejected "
          f"with one line each ({len(keys)} distinct keys/places)")
    for t in rejected[:: max(1, len(rejected) // 12)]:
        print(f"  {t.what[:70]:70} -> {t.error[:110]}")
    assert len(tried) >= EXAMPLES * 0.9
    assert rejected and len(accepted) >= min(RUNS, BATCH)

    # The accepted ones most unlike the base start the real daemon: changed values and encodings before special
    # files, unknown keys and deleted keys; one per mutated key.
    def rank(t: Tried) -> tuple[int, str]:
        order = 0 if " = " in t.what else 1 if "text: None" not in t.what else 3 if t.what.startswith("delete") else 2
        return order, t.what

    def key(t: Tried) -> str:
        return t.what.split(" = ")[0]

    # A live device a mutation names (PulseAudio, ALSA, stdin) is absent here: the daemon is READY and waits for it.
    ranked = sorted(accepted, key=rank)
    chosen: list[Tried] = []
    for t in [t for i, t in enumerate(ranked) if key(t) not in map(key, ranked[:i])] + ranked:
        if t not in chosen and len(chosen) < RUNS:
            chosen.append(t)
    t0 = time.monotonic()
    connected = sum(_run_to_ready(tmp_path, chosen[start:start + BATCH], start, world.broker_port)
                    for start in range(0, len(chosen), BATCH))
    print(f"kwsd run: {len(chosen)} of the accepted configs reached READY=1 and stopped cleanly on SIGTERM "
          f"({time.monotonic() - t0:.1f} s, {BATCH} at a time); {connected} of them connected to the test broker "
          "and kept the connection:")
    for t in chosen[:12]:
        print(f"  {t.what[:110]}")


def _run_to_ready(folder: Path, batch: list[Tried], first: int, broker_port: int) -> int:
    """Start ``batch`` side by side: each must reach READY=1, and one that connects to the test broker must keep
    its connection (a broker drops a client that publishes a topic it refuses), then stop cleanly. Returns how
    many were checked against the broker."""
    daemons: list[_Daemon] = []
    taken: set[object] = set()
    later: list[Tried] = []
    try:
        for i, t in enumerate(batch):
            # Two daemons of a batch must not want the same metrics port, nor the same MQTT client id.
            cfg = settings.loads(settings.decode(t.text))
            wants = {("metrics", cfg.service.metrics.port)} if cfg.service.metrics.enabled else set()
            wants.add(("client", cfg.mqtt.client_id))
            if wants & taken:
                later.append(t)
                continue
            taken |= wants
            m = cfg.mqtt
            ours = (m.enabled and m.host in ("127.0.0.1", "localhost") and m.effective_port == broker_port
                    and not m.tls.active and m.connect_timeout >= 1.0)
            daemons.append(_Daemon(folder / f"run{first + i}", t, ours))
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not all(d.ready() or d.exited() for d in daemons):
            time.sleep(0.1)
        for d in daemons:
            assert d.ready(), f"{d.tried.what}: check-config accepted it, run did not reach READY:\n{d.log()[-3000:]}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(CONNECTED.search(d.log()) for d in daemons if d.broker):
            time.sleep(0.1)
        time.sleep(1.0)  # what the daemon publishes once connected (status, discovery) has reached the broker
        for d in daemons:
            if d.broker:
                assert CONNECTED.search(d.log()), f"{d.tried.what}: never connected:\n{d.log()[-3000:]}"
                assert not LOST.search(d.log()), f"{d.tried.what}: the broker dropped it:\n{d.log()[-3000:]}"
        for d in daemons:
            d.proc.send_signal(signal.SIGTERM)
        for d in daemons:
            assert d.proc.wait(20) == 0, f"{d.tried.what}: exit status {d.proc.returncode}:\n{d.log()[-3000:]}"
            assert "Traceback" not in d.log(), f"{d.tried.what}:\n{d.log()[-3000:]}"
    finally:
        for d in daemons:
            d.close()
    return sum(d.broker for d in daemons) + sum(_run_to_ready(folder, [t], first + 1000 * (n + 1), broker_port)
                                                for n, t in enumerate(later))


CONNECTED = re.compile(r"MQTT (re)?connected to")
LOST = re.compile(r"MQTT connection to .* lost|closed the connection")


class _Daemon:
    def __init__(self, folder: Path, tried: Tried, broker: bool) -> None:
        folder.mkdir()
        self.tried = tried
        self.broker = broker
        """It talks plain MQTT to the test broker: it must connect and stay connected."""
        self.config = folder / "config.yaml"
        self.config.write_bytes(tried.text)
        self.notify = NotifySocket(folder / "notify.sock")
        self.notify.collect()
        self._log = folder / "kwsd.log"
        self._fh = open(self._log, "wb")
        env = {**os.environ, **self.notify.env(), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "kwsd", "run", "--config", str(self.config)],
                                     stdin=subprocess.DEVNULL, stdout=self._fh, stderr=subprocess.STDOUT,
                                     env=env, cwd=REPO)

    def ready(self) -> bool:
        return bool(self.notify.lines("READY=1"))

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def log(self) -> str:
        return self._log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._fh.close()
        self.notify.close()
