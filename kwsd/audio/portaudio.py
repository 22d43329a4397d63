"""PortAudio (sounddevice) with named devices.

Debian's PortAudio only has the ALSA host API and only enumerates devices at start-up, so neither a PulseAudio
source nor an ALSA name such as ``hw:CARD=USB,DEV=0`` can be opened directly. kwsd therefore adds an ALSA config
file of its own (via ``ALSA_CONFIG_PATH``, after the system's ``alsa.conf``) that defines a fixed number of slots
``kwsd_slot_N``. PortAudio enumerates them once; an input that needs a device rewrites its slot (``type pulse;
device "<source>"`` or ``type empty; slave.pcm "<alsa name>"``) and opens it. alsa-lib re-reads a changed config
file on every ``snd_pcm_open``, so any number of named sources can be opened, and later ones added, in one process
without re-initialising PortAudio (which would close every running stream).

alsa-lib prints its own errors to stderr (about 30 lines for each failed open of ``default`` on a host without a
sound card, PortAudio adding its own): kwsd installs an alsa-lib error handler that keeps the last messages for one
DEBUG line instead, and checks that an ALSA name opens (quietly, through alsa-lib) before PortAudio tries it.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import ctypes.util
import glob
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SLOTS = 64
SLOT_PREFIX = "kwsd_slot_"
SYSTEM_ALSA_CONF = Path("/usr/share/alsa/alsa.conf")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pulse_pcm(source: str) -> str:
    """ALSA pcm body that records from the PulseAudio source ``source`` (alsa-plugins pulse)."""
    return f"type pulse; device {_quote(source)}"


def alias_pcm(name: str) -> str:
    """ALSA pcm body that is ``name`` unchanged (the ``empty`` plugin)."""
    return f"type empty; slave.pcm {_quote(name)}"


# --- alsa-lib, quietly ------------------------------------------------------------------------------------------

SND_PCM_STREAM_CAPTURE = 1
SND_PCM_NONBLOCK = 1
# void handler(const char *file, int line, const char *function, int err, const char *fmt, ...): the variadic
# tail is not read, which the calling convention allows.
_ERROR_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                  ctypes.c_char_p)
_alsa_said: collections.deque[str] = collections.deque(maxlen=40)
_alsa: ctypes.CDLL | None = None
_handler_ref: object = None


def _on_alsa_error(file: bytes | None, line: int, function: bytes | None, err: int, fmt: bytes | None) -> None:
    where = f"{(file or b'?').decode(errors='replace')}:{line}"
    text = (fmt or b"").decode(errors="replace").replace("%s", "…").replace("%d", "…").strip()
    _alsa_said.append(f"{where} {text}")


def quiet_alsa() -> ctypes.CDLL | None:
    """Route alsa-lib's error messages to ``alsa_messages()`` instead of stderr; the library, or None if absent.

    Idempotent. Must run before PortAudio opens anything, in the process that captures.
    """
    global _alsa, _handler_ref
    if _alsa is not None:
        return _alsa
    name = ctypes.util.find_library("asound") or "libasound.so.2"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        log.debug("alsa-lib (%s) cannot be loaded", name)
        return None
    handler = _ERROR_HANDLER(_on_alsa_error)
    lib.snd_lib_error_set_handler(handler)
    lib.snd_strerror.restype = ctypes.c_char_p
    _alsa, _handler_ref = lib, handler
    return lib


def alsa_messages() -> list[str]:
    """alsa-lib's messages since the last call (oldest first), cleared."""
    said = list(_alsa_said)
    _alsa_said.clear()
    return said


def sound_cards() -> list[str]:
    """The capture PCM device nodes of the host's sound cards (``/dev/snd/pcmC<card>D<dev>c``)."""
    return sorted(glob.glob("/dev/snd/pcmC*D*c"))


def alsa_open_problem(name: str) -> str | None:
    """Why the ALSA pcm ``name`` cannot be opened for capture (alsa-lib's reason), or None if it opens.

    Opens and closes it at once, non-blocking, through alsa-lib with its messages kept off stderr, so that
    PortAudio is only asked for devices that exist.
    """
    lib = quiet_alsa()
    if lib is None:
        return None  # no alsa-lib to ask: let PortAudio say what is wrong
    pcm = ctypes.c_void_p()
    err = lib.snd_pcm_open(ctypes.byref(pcm), name.encode(), SND_PCM_STREAM_CAPTURE, SND_PCM_NONBLOCK)
    if err < 0:
        return str(lib.snd_strerror(err).decode(errors="replace"))
    lib.snd_pcm_close(pcm)
    return None


def capture_problem(name: str) -> str | None:
    """None if the ALSA pcm ``name`` opens for capture, else one line saying why and what to do.

    alsa-lib's own messages about the attempt go to one DEBUG line.
    """
    problem = alsa_open_problem(name)
    said = alsa_messages()
    if problem is None:
        return None
    if said:
        log.debug("alsa-lib on %r: %s", name, "; ".join(said))
    hint = "`kwsd devices` lists what can be named"
    if not sound_cards():
        from kwsd.audio import pulse

        try:
            pulse.connect("kwsd-probe").close()
        except pulse.PulseError:
            return f"no capture device {name!r}: no sound card and no PulseAudio server; {hint}"
        return f"no capture device {name!r}: no sound card, and ALSA has no {name!r} ({problem}); {hint}"
    return f"ALSA device {name!r} cannot be opened: {problem}; {hint}"


class _Slots:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dir: Path | None = None
        self._defs: dict[int, str] = {}
        self._sd: ModuleType | None = None
        self._index: dict[int, int] = {}  # slot -> PortAudio device index
        self._mtime = 0  # whole-second mtime of the last config written

    @property
    def path(self) -> Path:
        assert self._dir is not None
        return self._dir / "asound.conf"

    def sounddevice(self) -> ModuleType:
        """The sounddevice module, with kwsd's slots enumerated by PortAudio."""
        with self._lock:
            if self._sd is None:
                self._install()
            assert self._sd is not None
            return self._sd

    def _install(self) -> None:
        quiet_alsa()
        self._dir = Path(tempfile.mkdtemp(prefix="kwsd-alsa-"))
        atexit.register(shutil.rmtree, self._dir, True)
        self._write()
        system = str(SYSTEM_ALSA_CONF) if SYSTEM_ALSA_CONF.exists() else ""
        base = os.environ.get("ALSA_CONFIG_PATH") or system
        os.environ["ALSA_CONFIG_PATH"] = f"{base}:{self.path}" if base else str(self.path)
        already = "sounddevice" in sys.modules
        import sounddevice as sd

        names = [d["name"] for d in sd.query_devices()]
        if already and f"{SLOT_PREFIX}0" not in names:
            # Imported before the slots existed: enumerate again (nothing of ours is open yet).
            sd._terminate()
            sd._initialize()
            names = [d["name"] for d in sd.query_devices()]
        self._index = {
            int(n[len(SLOT_PREFIX) :]): i for i, n in enumerate(names) if n.startswith(SLOT_PREFIX)
        }
        if not self._index:
            log.warning("PortAudio did not list kwsd's ALSA slots (%s): named devices cannot be opened",
                        self.path)
        self._sd = sd

    def _write(self) -> None:
        lines = [f"# kwsd capture slots (written by kwsd, pid {os.getpid()})"]
        for i in range(SLOTS):
            lines.append(f"pcm.{SLOT_PREFIX}{i} {{ {self._defs.get(i, 'type null')} }}")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        # alsa-lib reloads the file only when (device, inode, whole-second mtime) changed; a rename can reuse
        # the inode of an earlier version within the same second, so every version gets a later mtime.
        self._mtime = max(int(time.time()), self._mtime + 1)
        os.utime(tmp, (self._mtime, self._mtime))
        os.replace(tmp, self.path)

    def assign(self, body: str) -> int:
        """Define a free slot as ``body``; returns the PortAudio device index to open."""
        self.sounddevice()
        with self._lock:
            free = [i for i in sorted(self._index) if i not in self._defs]
            if not free:
                raise RuntimeError(
                    f"all {len(self._index)} kwsd ALSA slots are in use; cannot open another device"
                )
            slot = free[0]
            self._defs[slot] = body
            self._write()
            return self._index[slot]

    def release(self, device_index: int) -> None:
        with self._lock:
            for slot, idx in self._index.items():
                if idx == device_index and slot in self._defs:
                    del self._defs[slot]
                    self._write()
                    return


SLOTS_REGISTRY = _Slots()


def sounddevice() -> ModuleType:
    """sounddevice, imported with kwsd's named-device slots in place (use this instead of importing it)."""
    return SLOTS_REGISTRY.sounddevice()
