"""One input: opens its device (or file, or stdin), keeps it running, and turns its channels into 16 kHz sites.

Per input: the source (PortAudio callback or replay feeder thread) copies native-rate interleaved frames into a
preallocated ring and wakes the input's own thread, which takes them from there, picks each site's channel,
resamples to 16 kHz and appends to one 16 kHz ring per site. Readers (the hub) keep a cursor per site. The reader
says up to which 16 kHz index it wants each site (``want``: the detector's next step), so the source wakes the
input's thread once that much audio has come, not once per capture block, and a real-time replay reads and
delivers the blocks of a whole step at once.

Recovery: a device that delivers nothing for ``stall_timeout`` seconds, reports an error, or whose PulseAudio source
disappears is aborted (never ``stop()``, which can hang) and reopened by name with doubling backoff; a source that
PulseAudio reports back wakes the input at once. The 16 kHz index of a site counts delivered samples: it continues
from where it stopped, so a gap in the audio is not filled with invented samples and time simply jumps.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from kwsd.audio import portaudio
from kwsd.audio.resample import StreamResampler
from kwsd.audio.ring import Ring, rings_reached
from kwsd.audio.wavfile import AUDIO_SUFFIXES, AudioFileError, AudioReader
from kwsd.lifecycle import RUNNING, WAITING, Finished, Liveness, Part, describe, name_os_thread, supervise
from kwsd.settings import InputSettings

log = logging.getLogger(__name__)

RATE = 16000
"""The pipeline's sample rate."""

Kind = Literal["pulse", "alsa", "file", "stdin"]
State = Literal["starting", "running", "reopening", "failed", "finished", "stopped"]

_ALSA_WORDS = ("default", "pulse", "sysdefault", "dmix", "dsnoop")
_PROBE_RATES = (48000, 44100, 16000)


class DeviceError(RuntimeError):
    """A device cannot be opened or stopped delivering; the message names the device."""


def resolve_kind(settings: InputSettings) -> Kind:
    """What ``settings.device`` is (``kind: auto`` guesses from the name)."""
    if settings.kind != "auto":
        return settings.kind
    dev = settings.device
    if dev == "-":
        return "stdin"
    if dev.lower().endswith(AUDIO_SUFFIXES) or "/" in dev or Path(dev).is_file():
        return "file"
    if ":" in dev or dev in _ALSA_WORDS:
        return "alsa"
    return "pulse"


@dataclass
class InputStatus:
    """What one input is doing; ``status()`` returns a snapshot."""

    name: str
    device: str
    kind: str
    sites: list[str]
    state: State = "starting"
    rate: int = 0
    channels: int = 0
    overruns: int = 0
    """Readers that fell more than the ring behind (capture side and site side), plus PortAudio input overflows."""
    reopens: int = 0
    samples: int = 0
    """16 kHz samples delivered per site."""
    last_error: str = ""
    since: float = field(default_factory=time.monotonic)


class _Source:
    """An opened source that fills ``ring`` with native frames; ``failure`` is set once it cannot go on."""

    ring: Ring
    rate: int
    channels: int
    failure: str = ""
    finished: bool = False

    def begin(self) -> None:
        """Start delivering (after the input can see the source)."""

    def close(self) -> None:
        raise NotImplementedError


class _DeviceSource(_Source):
    def __init__(self, settings: InputSettings, kind: Kind, device_index: int, wake: Callable[[], None]) -> None:
        sd = portaudio.sounddevice()
        self.settings = settings
        dev = settings.device
        needed = max(settings.site_map()) + 1
        if kind == "pulse":
            from kwsd.audio import pulse

            try:
                src = pulse.find_source(dev)
            except pulse.PulseError as exc:
                raise DeviceError(f"PulseAudio source {dev!r}: {exc}") from exc
            except LookupError as exc:
                raise DeviceError(str(exc)) from exc
            self.rate = settings.rate or src.rate
            self.channels = settings.channels or max(src.channels, needed)
        else:
            problem = portaudio.capture_problem(dev)  # before PortAudio, which prints its own failures to stderr
            if problem is not None:
                raise DeviceError(problem)
            self.channels = settings.channels or needed
            self.rate = settings.rate or self._probe_rate(sd, device_index)
        if needed > self.channels:
            raise DeviceError(
                f"{kind} device {dev!r} has {self.channels} channels; sites need channel {needed - 1}"
            )
        self.xruns = 0
        self.ring = Ring(max(1, int(settings.buffer_seconds * self.rate)), self.channels, np.int16)
        ring = self.ring

        def callback(indata: np.ndarray, frames: int, t: Any, status: Any) -> None:
            if status:
                self.xruns += 1
            ring.write(indata)
            wake()

        def finished() -> None:
            if not self.failure:
                self.failure = f"{kind} device {dev!r} stopped delivering (stream ended)"

        what = f"PulseAudio source {dev!r}" if kind == "pulse" else f"ALSA device {dev!r}"
        try:
            self.stream = sd.InputStream(
                device=device_index,
                samplerate=self.rate,
                channels=self.channels,
                dtype="int16",
                blocksize=max(1, self.rate * settings.block_ms // 1000),
                callback=callback,
                finished_callback=finished,
            )
        except Exception as exc:  # PortAudioError, ValueError for impossible settings
            raise DeviceError(f"cannot open {what} at {self.rate} Hz, {self.channels} ch: {exc}") from exc
        try:
            self.stream.start()
        except Exception as exc:
            self.stream.close(ignore_errors=True)
            raise DeviceError(f"cannot start {what}: {exc}") from exc

    def _probe_rate(self, sd: Any, device_index: int) -> int:
        errors = []
        for rate in _PROBE_RATES:
            try:
                sd.check_input_settings(
                    device=device_index, samplerate=rate, channels=self.channels, dtype="int16"
                )
                return rate
            except Exception as exc:
                errors.append(f"{rate} Hz: {exc}")
        raise DeviceError(f"ALSA device {self.settings.device!r} cannot be opened: {'; '.join(errors)}")

    def alive(self) -> bool:
        return self.stream.active

    def close(self) -> None:
        try:
            self.stream.abort(ignore_errors=True)
        finally:
            self.stream.close(ignore_errors=True)


class _ReplaySource(_Source):
    """A WAV file or raw s16le stdin, fed into the ring by a thread at real-time pace or as fast as it is read."""

    def __init__(
        self,
        settings: InputSettings,
        kind: Kind,
        backlog: Callable[[], float],
        halt: threading.Event,
        wake: Callable[[], None],
        ahead: Callable[[], int] = lambda: 0,
    ) -> None:
        self.settings = settings
        self._wake = wake
        self._backlog = backlog
        self._ahead = ahead
        self._halt = halt
        self._replan = threading.Event()
        self._fh: BinaryIO
        self._wav: AudioReader | None = None
        if kind == "file":
            path = Path(settings.device)
            try:
                self._wav = AudioReader(path)
            except AudioFileError as exc:
                raise DeviceError(f"cannot replay {exc}") from exc
            self.rate = self._wav.rate
            self.channels = self._wav.channels
            if settings.rate and settings.rate != self.rate:
                raise DeviceError(f"{path} is {self.rate} Hz but the input says rate {settings.rate}")
        else:
            self._fh = sys.stdin.buffer
            self.rate = settings.rate or RATE
            self.channels = settings.channels or max(settings.site_map()) + 1
        needed = max(settings.site_map()) + 1
        if needed > self.channels:
            raise DeviceError(
                f"{settings.device} has {self.channels} channels; sites need channel {needed - 1}"
            )
        self.xruns = 0
        self.ring = Ring(max(1, int(settings.buffer_seconds * self.rate)), self.channels, np.int16)
        self._thread = threading.Thread(target=self._feed, name=f"kwsd-replay-{settings.label}", daemon=True)

    def begin(self) -> None:
        self._thread.start()

    def _read(self, frames: int) -> bytes:
        if self._wav is not None:
            return self._wav.read_int16(frames)
        return self._fh.read(frames * 2 * self.channels)

    def replan(self) -> None:
        """The reader wants audio sooner than the feeder planned: deliver what is due now and plan again."""
        self._replan.set()

    def _feed(self) -> None:
        name_os_thread(threading.current_thread().name)
        block = max(1, self.rate * self.settings.block_ms // 1000)
        longest = max(block, self.rate // 2)  # most audio delivered at once at real-time pace
        t0 = time.monotonic()
        sent = 0
        width = 2 * self.channels
        pending = b""
        held = np.zeros((0, self.channels), dtype=np.int16)  # read, not yet due
        ended = False
        try:
            while not self._halt.is_set():
                if self.settings.realtime:
                    # Whole capture blocks, as many as the reader needs before it wants waking (a device would
                    # have delivered them one by one; the last one arrives at the same moment).
                    want = min(longest, -(-max(block, self._ahead()) // block) * block)
                else:
                    want = block
                    while self._backlog() > 0.5 and not self._halt.is_set():
                        self._halt.wait(0.005)
                while held.shape[0] < want and not ended:
                    # Read ahead (at real-time pace: two seconds at a time), so the file is read rarely: each
                    # read costs the library two seeks besides the copy.
                    chunk = self._read(max(want, 4 * longest if self.settings.realtime else 0) - held.shape[0])
                    if not chunk:
                        ended = True
                        break
                    data = pending + chunk
                    usable = len(data) - len(data) % width
                    pending = data[usable:]
                    if usable:
                        frames = np.frombuffer(data[:usable], dtype="<i2").reshape(-1, self.channels)
                        held = np.concatenate((held, frames)) if held.shape[0] else frames
                if held.shape[0] == 0:
                    break
                n = min(want, held.shape[0])
                if self.settings.realtime:
                    self._replan.clear()
                    # A block goes out when its first frame is due (as the block-by-block replay always did).
                    delay = t0 + (sent + n - min(n, block)) / self.rate - time.monotonic()
                    if delay > 0 and self._replan.wait(delay):
                        # Wanted sooner: what is due by now goes at once, the rest is planned again.
                        due = int((time.monotonic() - t0) * self.rate) - sent + block
                        n = min(n, max(0, due // block * block))
                        if n == 0:
                            continue
                self.ring.write(held[:n])
                held = held[n:]
                sent += n
                self._wake()
        except (OSError, ValueError) as exc:  # AudioFileError is a ValueError
            self.failure = f"reading {self.settings.device}: {exc}"
        self.finished = True
        self._wake()

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        self._halt.set()
        self._replan.set()
        if self._wav is not None:
            if self._thread.is_alive():
                self._thread.join(timeout=1.0)
            self._wav.close()


class InputWorker:
    """Runs one input for its whole life on a supervised thread (``lifecycle.supervise``); see the module
    docstring. Its liveness part is ``input:<label>``: beating while it delivers, waiting (with the time of the
    next attempt) while its device is away, so the watchdog knows it is in a known state either way."""

    def __init__(
        self,
        settings: InputSettings,
        stop: threading.Event,
        notify: Callable[[InputWorker], None],
        liveness: Liveness | None = None,
        part_name: str | None = None,
    ) -> None:
        self.settings = settings
        self.kind: Kind = resolve_kind(settings)
        self.site_channels = settings.site_map()
        self.part_name = part_name or f"input:{settings.label}"
        """The name this input beats under in the liveness registry."""
        self.liveness = liveness if liveness is not None else Liveness()
        self._stop_all = stop
        self._halt = threading.Event()
        self._wake = threading.Event()
        self._gone = threading.Event()
        self._notify = notify
        self._thread: threading.Thread | None = None
        self._part: Part | None = None
        self._last_beat = 0.0
        cap = max(1, int(settings.buffer_seconds * RATE))
        self.rings: dict[str, Ring] = {site: Ring(cap, 1, np.int16) for site in self.site_channels.values()}
        self.cursors: dict[str, int] = dict.fromkeys(self.rings, 0)
        self._lock = threading.Lock()  # cursors (several reader threads may call read)
        self.status = InputStatus(settings.label, settings.device, self.kind, list(self.rings))
        self._device_index: int | None = None
        self._source: _Source | None = None
        self._source_overruns = 0
        self._native_cursor = 0
        self._delivered_since_open = False
        self._resampler: StreamResampler | None = None
        self._channels: list[int] = []  # source channels of the sites, in ``_sites`` order
        self._sites: list[str] = []
        self._wanted: dict[str, int] = {}  # site -> 16 kHz index the reader waits for
        self._wanted_min = 0  # the nearest of them
        self._stride = 0  # how far the reader's want moved last time (one detector step)
        self._wake_at = 0
        """Native index of the source ring from which a delivery wakes this input's thread."""
        self.on_state: Callable[[], None] | None = None
        """Called after the input changed state."""

    def start(self) -> None:
        """Start the input's supervised thread."""
        if self._thread is None:
            self._thread = supervise(self.part_name, self._body, stop=self._halt, liveness=self.liveness,
                                     beat_within=self._running_within(), logger=log)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _running_within(self) -> float:
        # The pump checks its source at least every 0.25 s and gives up on a silent one after stall_timeout.
        return self.settings.stall_timeout + 5.0

    # ---- reader side -------------------------------------------------------------------------------------
    def read(self, site: str) -> tuple[np.ndarray, int]:
        ring = self.rings[site]
        with self._lock:
            self._transfer()
            data, start = ring.read(self.cursors[site])
            self.cursors[site] = start + data.shape[0]
        return data[:, 0], start

    def _untaken(self) -> int:
        """16 kHz samples per site the source delivered that no reader has taken over into the site rings yet."""
        src, resampler = self._source, self._resampler
        if src is None or resampler is None:
            return 0
        return resampler.outputs_after(src.ring.end - self._native_cursor)

    def end(self, site: str) -> int:
        """Absolute 16 kHz index after the newest sample of ``site``, audio not yet taken over included."""
        return self.rings[site].end + self._untaken()

    def reached(self, targets: dict[str, int]) -> bool:
        """Whether a site has audio up to its target (a site without one: any unread audio), counting what the
        source delivered and no reader has taken over yet. Without locks (the capture callback's thread may
        ask): a read torn by a concurrent transfer can only undercount, and that transfer notifies the hub."""
        return rings_reached(self.rings, self.cursors, targets, self._untaken())

    def _transfer(self, flush: bool = False) -> int:
        """Take what the source delivered into the site rings: its channels picked, resampled to 16 kHz
        (``flush``: also the resampler's tail, at the end of the source). The caller holds ``_lock``. Returns
        the 16 kHz samples added per site."""
        src, resampler = self._source, self._resampler
        if src is None or resampler is None:
            return 0
        added = 0
        data, start = src.ring.read(self._native_cursor)
        if data.shape[0]:
            self._native_cursor = start + data.shape[0]
            self._delivered_since_open = True
            added += self._deliver(resampler.process(data[:, self._channels]))
        if flush:
            added += self._deliver(resampler.flush())
        return added

    def pending(self) -> bool:
        """Whether a site has unread audio (also audio the source delivered that no reader took over yet)."""
        src = self._source
        if src is not None and src.ring.end > self._native_cursor:
            return True
        return any(r.end > self.cursors[s] for s, r in self.rings.items())

    def want(self, targets: dict[str, int]) -> None:
        """The reader waits for these sites up to these absolute 16 kHz indices (a site of this input without
        one: for any new audio). Any thread."""
        self._wanted = targets
        if targets and len(targets) == len(self.rings):
            nearest = min(targets.values())
            if nearest > self._wanted_min:
                self._stride = nearest - self._wanted_min if self._wanted_min else 0
            self._wanted_min = nearest
        before = self._wake_at
        with self._lock:
            self._plan()
        src = self._source
        if isinstance(src, _ReplaySource) and src.ring.end < self._wake_at < before:
            src.replan()

    def _plan(self) -> None:
        """Set the native index from which a delivery wakes the reader: enough for the nearest wanted index.
        The caller holds ``_lock`` (the site rings and the native cursor move together)."""
        src, resampler = self._source, self._resampler
        wanted = self._wanted
        if src is None or resampler is None or len(wanted) < len(self.rings):
            self._wake_at = 0
            return
        need = min(wanted.get(site, 0) - ring.end for site, ring in self.rings.items())
        if need <= 0 < self._stride:
            # Met: the reader's next want is most likely one step further (a nearer one replans the source).
            need += self._stride
        if need <= 0:
            self._wake_at = 0
            return
        self._wake_at = self._native_cursor + -(-need * src.rate // RATE) + resampler.delay_in

    def _source_wrote(self) -> None:
        """Called by the source after each delivery: wake the reader once its want is met (it takes the audio
        over itself, on its own thread), this input's thread when the source failed or ended."""
        src = self._source
        if src is None or src.failure or src.finished:
            self._wake.set()
        elif src.ring.end >= self._wake_at:
            self._notify(self)
            if self._stride and self._wake_at:
                # The reader's next want is most likely one step further: a replay plans its next delivery by
                # it before this thread has run (a nearer want replans it).
                self._wake_at += -(-self._stride * src.rate // RATE)

    def _ahead(self) -> int:
        """Native frames the source may still deliver before the reader wants waking."""
        src = self._source
        return 0 if src is None else max(0, self._wake_at - src.ring.end)

    def backlog(self) -> float:
        """Largest unread share of a site ring (0..1): how far behind the slowest reader is."""
        src = self._source
        native = 0.0
        if src is not None:
            native = (src.ring.end - self._native_cursor) / src.ring.capacity
        sites = max((r.end - self.cursors[s]) / r.capacity for s, r in self.rings.items())
        return max(native, sites)

    # ---- control -----------------------------------------------------------------------------------------
    def halt(self) -> None:
        """Stop the input (its thread ends within a fraction of a second; ``join`` to wait)."""
        self._halt.set()
        self._wake.set()
        src = self._source
        if isinstance(src, _ReplaySource):
            src.replan()

    def source_changed(self, present: set[str]) -> None:
        """PulseAudio's current source names: a vanished source is reopened now, a returned one opened now."""
        if self.kind != "pulse":
            return
        if self.settings.device in present:
            if self.status.state == "reopening":
                self._wake.set()
        elif self._source is not None:  # open (delivering or not yet): reopen it now
            self._gone.set()
            self._wake.set()

    def _stopping(self) -> bool:
        if self._stop_all.is_set():
            self._halt.set()  # the daemon stops: so does this input's supervised loop
        return self._halt.is_set()

    def _set_state(self, state: State, error: str = "") -> None:
        """Record the input's state; the journal hears of each change of state once (a new error text while
        the state stays the same goes to the debug log)."""
        st = self.status
        if state == st.state and error == st.last_error:
            return
        changed = state != st.state
        st.state = state
        st.since = time.monotonic()
        if error:
            st.last_error = error
        if not changed:
            log.debug("input %s: still %s: %s", st.name, state, error)
        elif state in ("running", "finished", "stopped"):
            log.info("input %s: %s (%s, %d Hz, %d ch)", st.name, state, self.kind, st.rate, st.channels)
        elif state == "reopening":
            log.warning("input %s: reopening: %s", st.name, error)
        else:
            log.error("input %s: %s: %s", st.name, state, error)
        if changed and self.on_state is not None:
            self.on_state()

    def _beat(self, within: float | None = None, state: str = RUNNING, detail: str = "", force: bool = False) -> None:
        """Tell the liveness registry where this input stands (at most every 0.1 s while running)."""
        part = self._part
        if part is None:
            return
        now = time.monotonic()
        if force or state != RUNNING or now - self._last_beat >= 0.1:
            self._last_beat = now
            part.beat(within, state, detail)

    # ---- the input's thread ------------------------------------------------------------------------------
    def _body(self, part: Part) -> None:
        """The supervised body: open, pump, reopen with backoff; ends with ``Finished`` when a replay ends."""
        self._part = part
        lo, hi = self.settings.reopen_backoff
        backoff = lo
        waiting = f"waiting for {self.kind} device {self.settings.device!r}"
        try:
            while not self._stopping():
                self._beat(backoff + 15.0, WAITING, f"opening {self.settings.device!r}", force=True)
                try:
                    self._source = self._open()
                except DeviceError as exc:
                    if self.kind in ("file", "stdin"):
                        self._set_state("failed", str(exc))
                        raise Finished from exc
                    self._set_state("reopening", str(exc))
                    self._beat(backoff + 5.0, WAITING, waiting)
                    self._sleep(backoff)
                    backoff = min(backoff * 2, hi)
                    continue
                self._source.begin()
                st = self.status
                st.rate, st.channels = self._source.rate, self._source.channels
                self._set_state("running")
                self._beat(force=True)
                outcome = self._pump(self._source)
                self._close()
                if outcome == "finished":
                    self._set_state("finished")
                    raise Finished
                if outcome == "stopped":
                    break
                st.reopens += 1
                self._set_state("reopening", outcome)
                if self._delivered_since_open:
                    backoff = lo
                self._beat(backoff + 5.0, WAITING, waiting)
                self._sleep(backoff)
                backoff = min(backoff * 2, hi)
        except Exception as exc:
            if not isinstance(exc, Finished):  # a bug: the supervisor logs it and restarts the input
                self._set_state("failed", describe(exc))
            raise
        finally:
            self._close()
            if self._device_index is not None:
                portaudio.SLOTS_REGISTRY.release(self._device_index)
                self._device_index = None
        if self.status.state not in ("failed", "finished"):
            self._set_state("stopped")

    def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        deadline = time.monotonic() + seconds
        while not self._stopping() and not self._wake.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wake.wait(min(left, 0.1))

    def _open(self) -> _Source:
        self._gone.clear()
        if self.kind in ("file", "stdin"):
            return _ReplaySource(self.settings, self.kind, self.backlog, self._halt, self._source_wrote,
                                 self._ahead)
        if self._device_index is None:
            body = (
                portaudio.pulse_pcm(self.settings.device)
                if self.kind == "pulse"
                else portaudio.alias_pcm(self.settings.device)
            )
            try:
                self._device_index = portaudio.SLOTS_REGISTRY.assign(body)
            except RuntimeError as exc:
                raise DeviceError(f"{self.settings.device!r}: {exc}") from exc
        return _DeviceSource(self.settings, self.kind, self._device_index, self._source_wrote)

    def _close(self) -> None:
        src = self._source
        if src is not None:
            with self._lock:
                self._source = None
                self._resampler = None
            self._source_overruns += src.ring.overruns + getattr(src, "xruns", 0)
            src.close()

    def _pump(self, src: _Source) -> str:
        """Keep the source running until it ends or must be reopened; returns why it stopped.

        The reader takes the audio over into the site rings on its own thread (``read``), woken by the source
        once it has what it waits for, so a capture block costs this thread nothing. This thread checks the
        device, beats, and takes the audio over itself when the reader falls behind (nothing is lost while
        nobody reads) and when the source stops (the old stream's last samples are in the site rings before a
        reopen is counted).
        """
        channels = list(self.site_channels)
        with self._lock:
            self._native_cursor = 0
            self._delivered_since_open = False
            self._channels = channels
            self._sites = [self.site_channels[c] for c in channels]
            self._resampler = StreamResampler(src.rate, RATE, len(channels))
            self._plan()
        outcome = self._watch(src)
        with self._lock:
            added = self._transfer(flush=outcome == "finished")
        if added:
            self._notify(self)
        return outcome

    def _watch(self, src: _Source) -> str:
        # The source wakes this thread only when it fails or ends; the timeout paces the liveness checks.
        live = isinstance(src, _DeviceSource)
        idle = min(0.25, self.settings.stall_timeout / 4) if live else 1.0
        last_end, last_data = src.ring.end, time.monotonic()
        while True:
            if self._stopping():
                return "stopped"
            self._beat()
            self._wake.clear()  # before looking: a failure or the end from now on makes the wait return at once
            if src.failure and not live:
                return src.failure
            if src.finished:
                return "finished" if not src.failure else src.failure
            now = time.monotonic()
            if src.ring.end != last_end:
                last_end, last_data = src.ring.end, now
            if live:
                dev = f"{self.kind} device {self.settings.device!r}"
                if self._gone.is_set():
                    return f"{dev} was removed"
                if src.failure:
                    return src.failure
                if not src.alive():  # type: ignore[attr-defined]
                    return f"{dev} stream stopped"
                if now - last_data > self.settings.stall_timeout:
                    return f"{dev} delivered no audio for {self.settings.stall_timeout:g} s"
            if self.backlog() > 0.25:  # the reader is behind or absent: take the audio over here
                with self._lock:
                    added = self._transfer()
                if added:
                    self._notify(self)
            self._wake.wait(idle)

    def _deliver(self, out: np.ndarray) -> int:
        """Append resampled frames (one column per site) to the site rings; returns the frames added."""
        if out.shape[0] == 0:
            return 0
        if out.ndim == 1:
            out = out[:, None]
        for i, site in enumerate(self._sites):
            self.rings[site].write(out[:, i])
        self.status.samples += out.shape[0]
        return int(out.shape[0])

    def snapshot(self) -> InputStatus:
        st = self.status
        src = self._source
        live = src.ring.overruns + getattr(src, "xruns", 0) if src is not None else 0
        sites = sum(r.overruns for r in self.rings.values())
        return InputStatus(
            name=st.name,
            device=st.device,
            kind=st.kind,
            sites=list(st.sites),
            state=st.state,
            rate=st.rate,
            channels=st.channels,
            overruns=self._source_overruns + live + sites,
            reopens=st.reopens,
            samples=st.samples,
            last_error=st.last_error,
            since=st.since,
        )
