"""``python -m kwsd run --config FILE`` as a subprocess with its log in a file: the daemon as an operator runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


class Kwsd:
    """``python -m kwsd run --config FILE`` as a subprocess, its log in a file.

    Without ``env`` the daemon gets no NOTIFY_SOCKET; ``env`` (e.g. ``NotifySocket.env()``) is laid over the
    environment.
    """

    def __init__(self, config: dict, folder: Path, name: str = "kwsd", env: Mapping[str, str] | None = None) -> None:
        self.config = folder / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(config, allow_unicode=True))
        self.log = folder / f"{name}.log"
        self._fh = open(self.log, "wb")
        full = dict(os.environ, PYTHONUNBUFFERED="1")
        full.pop("NOTIFY_SOCKET", None)
        full.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "kwsd", "run", "--config", str(self.config)],
                                     stdout=self._fh, stderr=subprocess.STDOUT, env=full, cwd=REPO)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                pytest.fail(f"kwsd exited ({self.proc.returncode}) while waiting for {what}:\n{self.text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; kwsd log:\n{self.text()[-4000:]}")
            time.sleep(0.05)

    def wait_log(self, needle: str, count: int = 1, timeout: float = 20.0) -> None:
        self.wait_for(lambda: self.text().count(needle) >= count, timeout, f"{count}x {needle!r} in the log")

    def terminate(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._fh.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._fh.close()
