"""Reading recordings: WAV files of any rate, sample width and channel count, as 16 kHz int16-scale audio."""

from __future__ import annotations

import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kwsd.audio.resample import StreamResampler, resample_once


class AudioFileError(ValueError):
    """A recording cannot be read; the message names the file."""


def read_wav(path: Path, channel: int | None = 0, rate: int = 16000) -> np.ndarray:
    """A WAV file's samples as int16-scale float32 at ``rate``: one channel, or the mean of all (``None``)."""
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, file_rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (OSError, wave.Error, EOFError) as exc:
        raise AudioFileError(f"{path}: cannot read WAV: {exc}") from exc
    if width == 2:
        data = np.frombuffer(raw, dtype="<i2").astype(np.float32)
    elif width == 4:
        data = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 65536.0
    elif width == 1:
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) * 256.0
    else:
        raise AudioFileError(f"{path}: {8 * width}-bit samples are not supported (use 8, 16 or 32-bit PCM)")
    data = data.reshape(-1, channels)
    if channel is None:
        mono = data.mean(axis=1)
    elif not 0 <= channel < channels:
        raise AudioFileError(f"{path}: has {channels} channel(s); channel {channel} does not exist")
    else:
        mono = data[:, channel]
    if file_rate != rate:
        mono = resample_once(mono, file_rate, rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def wav_seconds(path: Path) -> float:
    """Duration of a WAV file from its header (0.0 if it cannot be read: reading it reports why)."""
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes() / w.getframerate()
    except (OSError, wave.Error, EOFError, ZeroDivisionError):
        return 0.0


def read_wav_blocks(path: Path, channel: int | None = 0, rate: int = 16000, block_seconds: float = 10.0
                    ) -> Iterator[np.ndarray]:
    """A WAV file as consecutive blocks of about ``block_seconds``, like :func:`read_wav` (int16-scale float32 at
    ``rate``, one channel or the mean of all), so that hours of audio never sit in memory at once."""
    try:
        w = wave.open(str(path), "rb")
    except (OSError, wave.Error, EOFError) as exc:
        raise AudioFileError(f"{path}: cannot read WAV: {exc}") from exc
    with w:
        width, channels, file_rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
        if width not in (1, 2, 4):
            raise AudioFileError(f"{path}: {8 * width}-bit samples are not supported (use 8, 16 or 32-bit PCM)")
        if channel is not None and not 0 <= channel < channels:
            raise AudioFileError(f"{path}: has {channels} channel(s); channel {channel} does not exist")
        resampler = StreamResampler(file_rate, rate) if file_rate != rate else None
        frames = max(1, int(block_seconds * file_rate))
        while True:
            try:
                raw = w.readframes(frames)
            except (OSError, wave.Error, EOFError) as exc:
                raise AudioFileError(f"{path}: cannot read WAV: {exc}") from exc
            if not raw:
                break
            if width == 2:
                data = np.frombuffer(raw, dtype="<i2").astype(np.float32)
            elif width == 4:
                data = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 65536.0
            else:
                data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) * 256.0
            data = data[: data.size - data.size % channels].reshape(-1, channels)
            mono = data.mean(axis=1) if channel is None else data[:, channel]
            if resampler is not None:
                mono = resampler.process(mono)
            yield np.ascontiguousarray(mono, dtype=np.float32)
        if resampler is not None:
            yield np.ascontiguousarray(resampler.flush(), dtype=np.float32)
