"""Ring buffer: absolute indices, wrap-around, overrun counting."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kwsd.audio.ring import Ring


def test_read_by_absolute_index_across_wrap() -> None:
    ring = Ring(10, channels=2)
    data = np.arange(2 * 25, dtype=np.int16).reshape(25, 2)
    for i in range(0, 25, 3):
        ring.write(data[i : i + 3])
    assert ring.end == 25
    got, start = ring.read(17)
    assert start == 17 and np.array_equal(got, data[17:25])
    got, start = ring.read(20, max_frames=2)
    assert start == 20 and np.array_equal(got, data[20:22])
    assert ring.overruns == 0


def test_overrun_is_counted_and_reader_skips_ahead() -> None:
    ring = Ring(8)
    ring.write(np.arange(20, dtype=np.int16))
    got, start = ring.read(5)
    assert start == 12 and np.array_equal(got[:, 0], np.arange(12, 20))
    assert ring.overruns == 1 and ring.lost == 7
    got, start = ring.read(20)
    assert got.shape == (0, 1) and start == 20 and ring.overruns == 1


def test_oversized_block_keeps_newest_frames() -> None:
    ring = Ring(4)
    ring.write(np.arange(10, dtype=np.int16))
    assert ring.end == 10 and ring.dropped == 6
    got, start = ring.read(6)
    assert start == 6 and np.array_equal(got[:, 0], np.arange(6, 10))


def test_concurrent_writer_never_hands_out_torn_data() -> None:
    ring = Ring(64)
    stop = threading.Event()
    total = 200_000

    def writer() -> None:
        for i in range(0, total, 16):
            ring.write((np.arange(i, i + 16) % 30000).astype(np.int16))
        stop.set()

    t = threading.Thread(target=writer)
    t.start()
    pos = 0
    checked = 0
    while not stop.is_set() or pos < ring.end:
        got, start = ring.read(pos)
        expect = (np.arange(start, start + got.shape[0]) % 30000).astype(np.int16)
        assert np.array_equal(got[:, 0], expect)
        checked += got.shape[0]
        pos = start + got.shape[0]
    t.join()
    assert pos == total and checked + ring.lost == total


def test_bad_capacity_is_rejected() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Ring(0)
