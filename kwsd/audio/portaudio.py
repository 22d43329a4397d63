"""PortAudio (sounddevice) with named devices.

Debian's PortAudio only has the ALSA host API and only enumerates devices at start-up, so neither a PulseAudio
source nor an ALSA name such as ``hw:CARD=USB,DEV=0`` can be opened directly. kwsd therefore adds an ALSA config
file of its own (via ``ALSA_CONFIG_PATH``, after the system's ``alsa.conf``) that defines a fixed number of slots
``kwsd_slot_N``. PortAudio enumerates them once; an input that needs a device rewrites its slot (``type pulse;
device "<source>"`` or ``type empty; slave.pcm "<alsa name>"``) and opens it. alsa-lib re-reads a changed config
file on every ``snd_pcm_open``, so any number of named sources can be opened, and later ones added, in one process
without re-initialising PortAudio (which would close every running stream).
"""

from __future__ import annotations

import atexit
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
