"""A real mosquitto per test: plain, or TLS with a password file; stop/start to simulate broker outages."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl CLI)."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=kwsd test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn in (("server", "localhost"), ("client", "kwsd client")):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        extra = ["-extfile", "san.ext"] if name == "server" else []
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.crt",
            *extra,
        )
    return TlsFiles(
        folder / "ca.crt",
        folder / "server.crt",
        folder / "server.key",
        folder / "client.crt",
        folder / "client.key",
    )


@dataclass
class Broker:
    """One mosquitto on a loopback port; ``stop()``/``start()`` keep the port."""

    folder: Path
    port: int = field(default_factory=free_port)
    tls: TlsFiles | None = None
    users: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"
    extra: tuple[str, ...] = ()
    """More mosquitto.conf lines (limits such as ``max_packet_size``)."""

    def config(self) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence false",
            "log_dest stderr",
            "user root",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if self.users:
            pw = self.folder / "passwd"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(pw), user, password],
                    check=True,
                    timeout=30,
                    capture_output=True,
                )
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls:
            lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
        lines += self.extra
        conf = self.folder / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> None:
        assert self.proc is None
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config())], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.folder / 'mosquitto.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class Subscriber:
    """A plain paho client that records every message on its topics (the hub's side in tests)."""

    def __init__(self, broker: Broker, *topics: str, **tls_auth: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{time.monotonic_ns()}"
        )
        if "username" in tls_auth:
            self.client.username_pw_set(tls_auth["username"], tls_auth.get("password"))
        if "ca" in tls_auth:
            self.client.tls_set(ca_certs=tls_auth["ca"])
        subscribed = threading.Event()

        def on_connect(c: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
            for t in topics:
                c.subscribe(t, qos=1)

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(5), "test subscriber could not subscribe"
        time.sleep(0.05)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def wait_for(self, count: int, topic_prefix: str = "", timeout: float = 10.0) -> list[mqtt.MQTTMessage]:
        """The messages whose topic starts with ``topic_prefix``, once there are ``count`` (else fail)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for m in self.messages if m.topic.startswith(topic_prefix)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [m.topic for m in self.messages]
                    raise AssertionError(
                        f"expected {count} message(s) on {topic_prefix!r}*, got topics {got}"
                    )
                self.cond.wait(left)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A plain mosquitto, anonymous access."""
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_broker(tmp_path: Path, tls_files: TlsFiles) -> Iterator[Broker]:
    """mosquitto with TLS (test CA) and a password file: user ``kwsd`` / ``s3cret``."""
    b = Broker(tmp_path / "tls-broker", tls=tls_files, users={"kwsd": "s3cret"})
    b.start()
    yield b
    b.stop()
