"""Model sources for fetch tests: mirror folders built from the real model files, and a local server with
ModelScope's download API serving one, with injectable faults.

``bare_mirror`` holds only the required files, ``full_mirror`` also the example recording, so no test depends on
whether the mirror that ``scripts/setup`` used has it.

URL layout (as ModelScope): ``/api/v1/models/<owner>/<name>/repo?Revision=<rev>&FilePath=<path>``; any other
path, repository or revision is a 404, so a client that builds the URL wrongly fails. Range requests
(``bytes=N-``) are answered with 206. ``faults`` maps an upstream path to one misbehaviour:

- ``corrupt``: one byte flipped, correct length.
- ``short``: only the first half of the file, with a matching Content-Length.
- ``cut``: promises the whole file, sends 40 % and closes; every time, ignoring Range.
- ``drop_once``: like ``cut`` the first time, then behaves.
- ``drop_once_no_range``: like ``cut`` the first time, then sends the whole file and ignores Range.
- ``error_once``: HTTP 503 the first time, then behaves.
- ``missing``: HTTP 404.
- ``stall``: waits ``STALL_S`` before answering.
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kwsd.model.manifest import load_manifest

STALL_S = 1.0
_RANGE = re.compile(r"bytes=(\d+)-")


@dataclass(frozen=True)
class Request:
    raw_path: str
    file_path: str
    range: str | None
    status: int


@dataclass
class ModelServer:
    url: str
    root: Path
    repository: str
    revision: str
    faults: dict[str, str] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests_for(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.file_path == path]

    def first_time(self, path: str) -> bool:
        with self.lock:
            first = path not in self._seen
            self._seen.add(path)
            return first


def _handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    api_path = f"/api/v1/models/{server.repository}/repo"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def _record(self, file_path: str, status: int) -> None:
            with server.lock:
                server.requests.append(Request(self.path, file_path, self.headers.get("Range"), status))

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            file_path = query.get("FilePath", [""])[0]
            src = server.root / file_path
            fault = server.faults.get(file_path, "")
            ok = (
                url.path == api_path
                and query.get("Revision") == [server.revision]
                and file_path
                and ".." not in file_path.split("/")
                and src.is_file()
                and fault != "missing"
            )
            if not ok:
                self._record(file_path, 404)
                self.send_error(404, "file not found")
                return
            first = server.first_time(file_path)
            if fault == "stall":
                time.sleep(STALL_S)
            if fault == "error_once" and first:
                self._record(file_path, 503)
                self.send_error(503, "try again")
                return
            data = src.read_bytes()
            if fault == "corrupt":
                mid = len(data) // 2
                data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
            elif fault == "short":
                data = data[: len(data) // 2]
            cut = fault == "cut" or (fault in ("drop_once", "drop_once_no_range") and first)
            honour_range = fault not in ("cut", "drop_once_no_range")
            match = _RANGE.fullmatch(self.headers.get("Range") or "")
            start = int(match.group(1)) if match and honour_range else 0
            if start >= len(data) and start:
                self._record(file_path, 416)
                self.send_error(416, "range not satisfiable")
                return
            status = 206 if start else 200
            self._record(file_path, status)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            body = data[start:]
            try:
                if cut:
                    self.wfile.write(body[: len(body) * 2 // 5])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                self.close_connection = True

    return Handler


EXAMPLE = "example/kws_xiaoyunxiaoyun.wav"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_mirror(root: Path, upstream: Path, example: Path | None = None) -> Path:
    """A folder laid out like the upstream repository: the required files copied from ``upstream``, and the
    example recording copied from ``example`` when given."""
    for entry in load_manifest().files:
        if entry.required:
            (root / entry.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(upstream / entry.path, root / entry.path)
    if example is not None:
        (root / EXAMPLE).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(example, root / EXAMPLE)
    return root


@pytest.fixture(scope="session")
def bare_mirror(model_mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mirror of the required model files only (no example recording, as some mirrors are). Read only."""
    return build_mirror(tmp_path_factory.mktemp("bare-mirror"), model_mirror)


@pytest.fixture(scope="session")
def full_mirror(model_mirror: Path, audio_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mirror of the required model files and the example recording (as upstream). Read only."""
    example = audio_dir / "positive" / "kws_xiaoyunxiaoyun.wav"
    return build_mirror(tmp_path_factory.mktemp("full-mirror"), model_mirror, example)


@pytest.fixture
def model_server(bare_mirror: Path) -> Iterator[ModelServer]:
    """A ModelScope-like server on a free loopback port serving ``bare_mirror``; stopped after the test."""
    manifest = load_manifest()
    server = ModelServer(
        url="", root=bare_mirror, repository=manifest.repository, revision=manifest.revision
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    httpd.daemon_threads = False  # server_close() joins the request threads: nothing outlives the test
    httpd.block_on_close = True
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
