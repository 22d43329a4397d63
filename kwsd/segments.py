"""Follow-up segments: after a wake, the audio from a pre-roll before the keyword until the speaker stops.

Positions are absolute sample indices of each site's 16 kHz stream, so the cut does not depend on how
audio was chunked or when the detector reported the wake. A webrtcvad voice-activity detector (30 ms
frames) decides when the speaker stopped: ``silence_timeout`` of non-speech after at least ``min_speech``
of speech, or ``initial_silence`` without speech after the keyword; ``max_length`` cuts everything else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import webrtcvad

from kwsd.audio.wavfile import to_wav
from kwsd.settings import SegmentSettings

log = logging.getLogger(__name__)

EndReason = Literal["silence", "max_length", "interrupted", "stopped"]
"""Why a segment ended: the speaker stopped, ``max_length``, a new wake on the site, the stream or daemon stopped."""

VAD_FRAME_MS = 30


@dataclass(frozen=True, eq=False)
class Segment:
    """A finished follow-up segment of one site."""

    site: str
    session_id: str
    samples: np.ndarray
    """16 kHz mono int16."""
    start_sample: int
    """Absolute index of the first sample (keyword start minus pre-roll, or the oldest audio still held)."""
    keyword_start_sample: int
    keyword_end_sample: int
    reason: EndReason
    sample_rate: int = 16000

    @property
    def end_sample(self) -> int:
        return self.start_sample + len(self.samples)

    @property
    def duration(self) -> float:
        """Seconds."""
        return len(self.samples) / self.sample_rate

    @property
    def pre_roll(self) -> float:
        """Seconds of audio before the keyword start."""
        return max(0, self.keyword_start_sample - self.start_sample) / self.sample_rate

    def to_wav(self) -> bytes:
        return to_wav(self.samples, self.sample_rate)


class _History:
    """Fixed-size ring of the latest samples of one site, addressed by absolute sample index."""

    def __init__(self, capacity: int) -> None:
        self.buf = np.zeros(capacity, dtype=np.int16)
        self.end = 0  # absolute index one past the newest sample
        self.started = False

    @property
    def begin(self) -> int:
        return max(0, self.end - len(self.buf))

    def write(self, samples: np.ndarray) -> None:
        """Store ``samples`` as the ones starting at ``end`` (the caller then advances ``end``)."""
        cap = len(self.buf)
        start = self.end
        if len(samples) >= cap:
            start += len(samples) - cap
            samples = samples[-cap:]
        n = len(samples)
        pos = start % cap
        first = min(n, cap - pos)
        self.buf[pos : pos + first] = samples[:first]
        self.buf[: n - first] = samples[first:]

    def read(self, start: int, stop: int) -> np.ndarray:
        start = max(start, self.begin)
        stop = min(stop, self.end)
        if stop <= start:
            return np.zeros(0, dtype=np.int16)
        cap = len(self.buf)
        idx = np.arange(start, stop) % cap
        return self.buf[idx]


@dataclass
class _Recording:
    session_id: str
    start_sample: int
    keyword_start: int
    keyword_end: int
    chunks: list[np.ndarray] = field(default_factory=list)
    end: int = 0
    """Absolute index one past the last sample collected."""
    vad_pos: int = 0
    """Absolute index of the next sample to classify."""
    speech: int = 0
    """Samples classified as speech after the keyword."""
    silence_run: int = 0
    """Samples of non-speech since the last speech frame."""

    def collected(self) -> np.ndarray:
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0] if self.chunks else np.zeros(0, dtype=np.int16)


class SegmentRecorder:
    """Cuts follow-up segments for any number of sites; call from one thread (the pipeline's).

    Keeps ``pre_roll + lookback`` seconds of history per site, so ``start()`` may come after the keyword ended
    (the detector's delay) as long as the keyword start is still in that window.
    """

    def __init__(self, settings: SegmentSettings, sample_rate: int = 16000) -> None:
        if sample_rate not in (8000, 16000, 32000, 48000):
            raise ValueError(f"segment recorder: webrtcvad cannot handle {sample_rate} Hz")
        self.settings = settings
        self.sample_rate = sample_rate
        self._frame = sample_rate * VAD_FRAME_MS // 1000
        self._history_len = round((settings.pre_roll + settings.lookback) * sample_rate)
        self._pre_roll = round(settings.pre_roll * sample_rate)
        self._max_len = round(settings.max_length * sample_rate)
        self._silence = round(settings.silence_timeout * sample_rate)
        self._initial_silence = round(settings.initial_silence * sample_rate)
        self._min_speech = round(settings.min_speech * sample_rate)
        self._history: dict[str, _History] = {}
        self._active: dict[str, _Recording] = {}
        self._vad: dict[str, webrtcvad.Vad] = {}
        self._finished: list[Segment] = []

    def audio(self, site: str, start: int, stop: int) -> np.ndarray:
        """The site's recent audio between absolute indices ``start`` and ``stop`` (what is still held)."""
        hist = self._history.get(site)
        if hist is None:
            return np.zeros(0, dtype=np.int16)
        start = min(max(start, hist.begin), hist.end)
        return hist.read(start, min(max(stop, start), hist.end))

    def recording(self, site: str) -> bool:
        return site in self._active

    def feed(self, site: str, samples: np.ndarray, first_sample: int) -> list[Segment]:
        """Add a block of ``site``'s 16 kHz int16 audio starting at absolute index ``first_sample``.

        Returns the segments that finished (on any site) since the last call.
        """
        hist = self._history.get(site)
        if hist is None:
            hist = self._history[site] = _History(self._history_len)
            hist.end = first_sample
        block = np.asarray(samples, dtype=np.int16).reshape(-1)
        if first_sample > hist.end:  # samples lost upstream (overrun): keep indices right with silence
            gap = min(first_sample - hist.end, self._max_len)
            log.debug("segment recorder: %d samples missing on site %s", first_sample - hist.end, site)
            if first_sample - hist.end > gap:
                hist.end = first_sample - gap
            self._append(site, hist, np.zeros(gap, dtype=np.int16))
        elif first_sample < hist.end:  # overlap with what we have
            block = block[hist.end - first_sample :]
        if len(block):
            self._append(site, hist, block)
        done, self._finished = self._finished, []
        return done

    def _append(self, site: str, hist: _History, block: np.ndarray) -> None:
        rec = self._active.get(site)
        hist.write(block)
        block_start = hist.end
        hist.end += len(block)
        if rec is not None:
            if block_start < rec.end:
                block = block[rec.end - block_start :]
            rec.chunks.append(block.copy())
            rec.end += len(block)
            self._advance(site, rec)

    def start(self, site: str, session_id: str, keyword_start_sample: int, keyword_end_sample: int) -> None:
        """Begin a segment for a wake whose keyword spans the given absolute sample indices."""
        if not self.settings.enabled:
            return
        previous = self._active.pop(site, None)
        if previous is not None:
            self._finish(site, previous, previous.end, "interrupted")
        hist = self._history.get(site)
        if hist is None:
            hist = self._history[site] = _History(self._history_len)
            hist.end = keyword_end_sample
        start = max(0, keyword_start_sample - self._pre_roll)
        if start < hist.begin:
            log.debug("segment %s: audio before sample %d is gone; starting there", session_id, hist.begin)
            start = hist.begin
        start = min(start, hist.end)
        rec = _Recording(
            session_id=session_id,
            start_sample=start,
            keyword_start=keyword_start_sample,
            keyword_end=keyword_end_sample,
            end=start,
            vad_pos=max(start, keyword_end_sample),
        )
        held = hist.read(start, hist.end)
        rec.chunks.append(held)
        rec.end = start + len(held)
        if site not in self._vad:
            self._vad[site] = webrtcvad.Vad(self.settings.vad_aggressiveness)
        self._active[site] = rec
        self._advance(site, rec)

    def flush(self, site: str | None = None) -> list[Segment]:
        """End recordings in progress (all sites, or one) as ``stopped``; returns them and any finished."""
        for name in [site] if site is not None else list(self._active):
            rec = self._active.pop(name, None)
            if rec is not None:
                self._finish(name, rec, rec.end, "stopped")
        done, self._finished = self._finished, []
        return done

    def _advance(self, site: str, rec: _Recording) -> None:
        frame = self._frame
        vad = self._vad[site]
        audio: np.ndarray | None = None
        while rec.vad_pos + frame <= rec.end:
            limit = rec.start_sample + self._max_len
            if rec.vad_pos + frame > limit:
                break
            if audio is None:
                audio = rec.collected()
            off = rec.vad_pos - rec.start_sample
            is_speech = vad.is_speech(audio[off : off + frame].tobytes(), self.sample_rate)
            rec.vad_pos += frame
            if is_speech:
                rec.speech += frame
                rec.silence_run = 0
            else:
                rec.silence_run += frame
            if rec.speech >= self._min_speech and rec.speech > 0 and rec.silence_run >= self._silence:
                self._finish(site, rec, rec.vad_pos, "silence")
                return
            if rec.speech < self._min_speech and rec.vad_pos - rec.keyword_end >= self._initial_silence:
                self._finish(site, rec, rec.vad_pos, "silence")
                return
        if rec.end >= rec.start_sample + self._max_len:
            self._finish(site, rec, rec.start_sample + self._max_len, "max_length")

    def _finish(self, site: str, rec: _Recording, end: int, reason: EndReason) -> None:
        self._active.pop(site, None)
        audio = rec.collected()[: max(0, end - rec.start_sample)].copy()
        seg = Segment(
            site=site,
            session_id=rec.session_id,
            samples=audio,
            start_sample=rec.start_sample,
            keyword_start_sample=rec.keyword_start,
            keyword_end_sample=rec.keyword_end,
            reason=reason,
            sample_rate=self.sample_rate,
        )
        log.debug("segment %s on %s: %.2f s, ended by %s", rec.session_id, site, seg.duration, reason)
        self._finished.append(seg)
