"""The archive's pipeline-thread half: the last seconds of each site, cut into keyword ± margin clips.

Near misses never get a follow-up segment, and wakes get none when segments are off; for them the tap keeps a
small ring per site (fed the same blocks as the detector, by absolute sample index) and, once the audio
``review.margin`` seconds past the keyword has arrived, hands the clip to the archive. It copies samples and
nothing else: no disk, no encoding on this thread.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import numpy as np

from kwsd.kws.detector import Detection
from kwsd.mqtt.messages import WakeEvent
from kwsd.review.archive import Archive

LONGEST_KEYWORD = 2.5
"""Seconds: the longest keyword a clip must hold besides the margins (``detector.keywords[].max_duration``)."""
DETECTOR_DELAY = 1.5
"""Seconds by which a near miss can be reported after its keyword ended (look-ahead, step, settling)."""


@dataclass(eq=False)
class _Pending:
    event: WakeEvent
    start: int
    stop: int
    near_miss: bool


class _Ring:
    """The newest ``capacity`` samples of one site, addressed by absolute sample index."""

    def __init__(self, capacity: int, end: int) -> None:
        self.buf = np.zeros(capacity, dtype=np.int16)
        self.start = self.end = end

    @property
    def begin(self) -> int:
        return max(self.start, self.end - len(self.buf))

    def write(self, samples: np.ndarray, first: int) -> None:
        if first != self.end:  # a gap (audio lost, stream restarted): what was held no longer lines up
            self.start = self.end = first
        block = np.asarray(samples).reshape(-1)
        if block.dtype != np.int16:  # capture gives int16; float audio (on the int16 scale) is clipped
            block = np.clip(block, -32768, 32767).astype(np.int16)
        cap = len(self.buf)
        if len(block) >= cap:
            block, first = block[-cap:], first + len(block) - cap
        pos = first % cap
        head = min(len(block), cap - pos)
        self.buf[pos:pos + head] = block[:head]
        self.buf[:len(block) - head] = block[head:]
        self.end = first + len(block)

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(start, self.begin), min(stop, self.end)
        if stop <= start:
            return np.zeros(0, dtype=np.int16)
        return self.buf[np.arange(start, stop) % len(self.buf)]


def energy_dbfs(samples: np.ndarray) -> float:
    """RMS level in dB relative to int16 full scale (-120 for silence)."""
    if samples.size == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(samples.astype(np.float64)))))
    return max(-120.0, 20.0 * math.log10(rms / 32768.0)) if rms > 0 else -120.0


class ReviewTap:
    """Cuts clips for the archive; call every method from the pipeline thread."""

    def __init__(self, archive: Archive, margin: float, segments: bool, sample_rate: int = 16000) -> None:
        self.archive = archive
        self.segments = segments
        self.rate = sample_rate
        self.margin = round(margin * sample_rate)
        self.capacity = round((2 * margin + LONGEST_KEYWORD + DETECTOR_DELAY) * sample_rate)
        self._rings: dict[str, _Ring] = {}
        self._pending: dict[str, list[_Pending]] = {}

    def feed(self, site: str, samples: np.ndarray, first: int) -> None:
        """The same audio the detector gets (absolute index ``first``); cuts the clips it completes."""
        ring = self._rings.get(site)
        if ring is None:
            ring = self._rings[site] = _Ring(self.capacity, first)
        ring.write(samples, first)
        pending = self._pending.get(site)
        if pending:
            self._cut(site, ring, [p for p in pending if p.stop <= ring.end])

    def wake(self, event: WakeEvent, start_sample: int, end_sample: int) -> None:
        """A wake: clipped here only when no follow-up segment will come (segments off)."""
        if not self.segments:
            self._want(event, start_sample, end_sample, near_miss=False)

    def near_miss(self, miss: Detection, device: str) -> None:
        """A candidate just below the threshold: archived like a wake, marked ``near_miss``."""
        ring = self._rings.get(miss.stream)
        keyword = ring.read(miss.start_sample, miss.end_sample) if ring is not None else np.zeros(0)
        event = WakeEvent(
            site_id=miss.stream, wakeword_id=miss.wakeword_id, keyword=miss.keyword, score=round(miss.score, 4),
            threshold=miss.threshold, start=round(miss.start, 3), end=round(miss.end, 3),
            session_id=uuid.uuid4().hex, device=device, energy=round(energy_dbfs(keyword), 1),
            latency=round((miss.decided_sample - miss.end_sample) * 1000 / self.rate, 1))
        self._want(event, miss.start_sample, miss.end_sample, near_miss=True)

    def drop(self, site: str) -> None:
        """The site is gone: hand over what its pending clips have, forget its audio."""
        ring = self._rings.pop(site, None)
        pending = self._pending.pop(site, [])
        if ring is not None and pending:
            self._cut(site, ring, pending)

    def flush(self) -> None:
        """Stopping: hand over every pending clip with the audio there is."""
        for site in list(self._rings):
            self.drop(site)

    def _want(self, event: WakeEvent, start: int, end: int, near_miss: bool) -> None:
        self._pending.setdefault(event.site_id, []).append(
            _Pending(event, max(0, start - self.margin), end + self.margin, near_miss))
        ring = self._rings.get(event.site_id)
        if ring is not None and end + self.margin <= ring.end:
            self._cut(event.site_id, ring, self._pending[event.site_id][-1:])

    def _cut(self, site: str, ring: _Ring, ready: list[_Pending]) -> None:
        if not ready:
            return
        left = [p for p in self._pending.get(site, []) if p not in ready]
        if left:
            self._pending[site] = left
        else:
            self._pending.pop(site, None)
        for p in ready:
            start = max(p.start, ring.begin)
            self.archive.put_clip(p.event, ring.read(start, p.stop), start, p.near_miss, self.rate)
