"""A preallocated, bounded ring of audio frames addressed by absolute sample index.

One writer (the capture callback) and any number of readers. The writer never blocks and never allocates: it copies
the block in and advances ``end``. Readers ask for data from an absolute index; if the writer has already
overwritten it, they get what is still there, ``actual_start`` tells them where it begins, and the loss is counted.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class Ring:
    """Bounded ring buffer of ``channels``-wide frames with an absolute frame index.

    ``end`` is the absolute index after the newest frame; the oldest frame still held is ``max(0, end -
    capacity)``.
    ``overruns`` counts reads that asked for frames already overwritten, ``lost`` the frames they missed.
    """

    def __init__(self, capacity: int, channels: int = 1, dtype: npt.DTypeLike = np.int16) -> None:
        if capacity <= 0:
            raise ValueError(f"ring capacity must be positive, got {capacity}")
        if channels <= 0:
            raise ValueError(f"ring channels must be positive, got {channels}")
        self.capacity = int(capacity)
        self.channels = int(channels)
        self._buf = np.zeros((self.capacity, self.channels), dtype=dtype)
        self.end = 0
        self.overruns = 0
        self.lost = 0
        self.dropped = 0
        """Frames of single oversized blocks that never fitted into the ring (writer side)."""

    @property
    def dtype(self) -> np.dtype:
        return self._buf.dtype

    @property
    def start(self) -> int:
        """Absolute index of the oldest frame still held."""
        return max(0, self.end - self.capacity)

    def write(self, block: np.ndarray) -> None:
        """Append ``block`` (frames x channels, or 1-D for one channel). Copies only; never blocks."""
        n = block.shape[0]
        if n == 0:
            return
        if block.ndim == 1:
            block = block.reshape(n, 1)
        end = self.end
        if n > self.capacity:
            self.dropped += n - self.capacity
            end += n - self.capacity
            block = block[n - self.capacity :]
            n = self.capacity
        pos = end % self.capacity
        first = min(n, self.capacity - pos)
        self._buf[pos : pos + first] = block[:first]
        if first < n:
            self._buf[: n - first] = block[first:]
        # Publishing the new end after the copy is what makes the data visible to readers.
        self.end = end + n

    def read(self, start: int, max_frames: int | None = None) -> tuple[np.ndarray, int]:
        """Frames from absolute index ``start`` up to ``end`` (at most ``max_frames``), as a copy.

        Returns ``(data, actual_start)``; ``actual_start > start`` when the frames at ``start`` were already
        overwritten (counted in ``overruns``/``lost``). ``data`` has shape (frames, channels).
        """
        end = self.end
        begin = max(start, end - self.capacity, 0)
        stop = end if max_frames is None else min(end, begin + max(0, max_frames))
        if stop <= begin:
            self._count_loss(start, begin)
            return self._buf[:0].copy(), max(begin, start)
        out = self._take(begin, stop)
        # The writer may have lapped us while copying: drop what it overwrote meanwhile.
        oldest = self.end - self.capacity
        if oldest > begin:
            skip = min(oldest - begin, stop - begin)
            out = out[skip:]
            begin += skip
        self._count_loss(start, begin)
        return out, begin

    def _take(self, begin: int, stop: int) -> np.ndarray:
        n = stop - begin
        pos = begin % self.capacity
        first = min(n, self.capacity - pos)
        if first == n:
            return self._buf[pos : pos + n].copy()
        return np.concatenate((self._buf[pos:], self._buf[: n - first]))

    def _count_loss(self, start: int, begin: int) -> None:
        if begin > start:
            self.overruns += 1
            self.lost += begin - start


def rings_reached(rings: dict[str, Ring], cursors: dict[str, int], targets: dict[str, int], extra: int = 0) -> bool:
    """Whether a site's ring (with ``extra`` samples still to come into every ring) holds audio up to the site's
    target, absolute index (a site without one: any unread audio past its cursor)."""
    for site, ring in rings.items():
        target = targets.get(site)
        if ring.end + extra >= (cursors[site] + 1 if target is None else target):
            return True
    return False
