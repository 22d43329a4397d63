"""A real PulseAudio server for the session, with pipe sources that tests feed at real-time pace.

Usage: ``src = pulse_server.pipe_source("room", rate=48000, channels=2)``; ``feeder = src.play(samples)`` writes the
int16 frames at real-time pace from a thread (then silence, so the source keeps delivering, until
``feeder.stop()``); ``src.play_wav(path)`` does the same with a WAV file; ``pulse_server.unload(src)`` unplugs it
and ``src.reload()`` plugs it back. Everything is stopped at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

BLOCK_S = 0.02


class Feeder:
    """Writes frames into a pipe source's FIFO at real-time pace, then silence until stopped."""

    def __init__(self, fifo: Path, rate: int, channels: int, frames: np.ndarray, silence_after: bool) -> None:
        self.rate, self.channels = rate, channels
        self.frames = frames.reshape(-1, channels).astype("<i2")
        self.silence_after = silence_after
        self.done = threading.Event()  # all of ``frames`` written
        self._halt = threading.Event()
        self._fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.set_blocking(self._fd, True)
        self._thread = threading.Thread(target=self._run, name=f"feeder-{fifo.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = int(self.rate * BLOCK_S)
        silence = np.zeros((n, self.channels), dtype="<i2")
        t0 = time.monotonic()
        i = 0
        pos = 0
        try:
            while not self._halt.is_set():
                if pos < len(self.frames):
                    chunk = self.frames[pos : pos + n]
                    pos += len(chunk)
                    if pos >= len(self.frames):
                        self.done.set()
                elif self.silence_after:
                    chunk = silence
                else:
                    break
                os.write(self._fd, chunk.tobytes())
                i += 1
                delay = t0 + i * BLOCK_S - time.monotonic()
                if delay > 0:
                    self._halt.wait(delay)
        except OSError:
            pass  # the source was unloaded
        finally:
            self.done.set()

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(timeout=2.0)
        os.close(self._fd)


@dataclass
class PipeSource:
    server: PulseServer
    name: str
    rate: int
    channels: int
    fifo: Path
    module: int = -1
    feeders: list[Feeder] = field(default_factory=list)

    def play(self, frames: np.ndarray, silence_after: bool = True) -> Feeder:
        feeder = Feeder(self.fifo, self.rate, self.channels, frames, silence_after)
        self.feeders.append(feeder)
        return feeder

    def play_wav(self, path: str | Path, silence_after: bool = True) -> Feeder:
        """Play a 16-bit WAV with this source's rate and channel count into the source at real-time pace."""
        with wave.open(str(path), "rb") as wav:
            if (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) != (self.rate, self.channels, 2):
                raise ValueError(
                    f"{path} does not match source {self.name} ({self.rate} Hz, {self.channels} ch)"
                )
            data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        return self.play(data, silence_after)

    def stop_feeding(self) -> None:
        for f in self.feeders:
            f.stop()
        self.feeders.clear()

    def reload(self) -> None:
        self.server._load(self)


class PulseServer:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "native"
        self.sources: dict[str, PipeSource] = {}
        for d in ("run", "home"):
            (base / d).mkdir(parents=True, exist_ok=True)
        (base / "test.pa").write_text(
            f"load-module module-native-protocol-unix auth-anonymous=1 socket={self.socket}\n"
            "load-module module-null-sink sink_name=vsink rate=16000 channels=1\n"
        )
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(base / "run"), HOME=str(base / "home"))
        self.env.pop("PULSE_SERVER", None)
        subprocess.run(
            ["pulseaudio", "-n", "-F", str(base / "test.pa"), "--daemonize=yes", "--exit-idle-time=-1",
             "--disallow-exit", "--disable-shm=yes", f"--log-target=file:{base / 'pa.log'}",
             "--use-pid-file=yes"],
            env=self.env, check=True, timeout=20,
        )
        self.server = f"unix:{self.socket}"
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"PulseAudio did not start; see {base / 'pa.log'}")
            time.sleep(0.05)

    def pactl(self, *args: str) -> str:
        out = subprocess.run(
            ["pactl", *args], env=dict(self.env, PULSE_SERVER=self.server),
            capture_output=True, text=True, timeout=10,
        )
        if out.returncode:
            raise RuntimeError(f"pactl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def pipe_source(self, name: str, rate: int = 16000, channels: int = 1) -> PipeSource:
        src = PipeSource(self, name, rate, channels, self.base / f"{name}.fifo")
        self._load(src)
        self.sources[name] = src
        return src

    def _load(self, src: PipeSource) -> None:
        out = self.pactl(
            "load-module", "module-pipe-source", f"source_name={src.name}", f"file={src.fifo}",
            "format=s16le", f"rate={src.rate}", f"channels={src.channels}",
        )
        src.module = int(out.strip())

    def unload(self, src: PipeSource) -> None:
        """Unplug: stop its feeders and unload the module."""
        src.stop_feeding()
        if src.module >= 0:
            self.pactl("unload-module", str(src.module))
            src.module = -1

    def remove(self, src: PipeSource) -> None:
        self.unload(src)
        self.sources.pop(src.name, None)

    def stop(self) -> None:
        for src in list(self.sources.values()):
            src.stop_feeding()
        subprocess.run(["pulseaudio", "--kill"], env=self.env, timeout=10, check=False)


@pytest.fixture(scope="session")
def pulse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PulseServer]:
    """A private PulseAudio server; ``PULSE_SERVER`` points at it for the whole session."""
    if shutil.which("pulseaudio") is None:
        pytest.fail(
            "pulseaudio is not installed (apt-get install pulseaudio pulseaudio-utils libasound2-plugins)"
        )
    base = tmp_path_factory.mktemp("pulse")
    server = PulseServer(base)
    old = os.environ.get("PULSE_SERVER")
    os.environ["PULSE_SERVER"] = server.server
    try:
        yield server
    finally:
        server.stop()
        if old is None:
            os.environ.pop("PULSE_SERVER", None)
        else:
            os.environ["PULSE_SERVER"] = old
