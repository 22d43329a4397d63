"""Reading recordings (WAV files of any rate, sample width and channel count, as 16 kHz int16-scale audio) and
writing int16 audio as WAV bytes."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np

from kwsd.audio.resample import resample_once


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


def to_wav(samples: np.ndarray, sample_rate: int = 16000, channels: int = 1) -> bytes:
    """int16 samples (interleaved when ``channels`` > 1) as the bytes of a 16-bit PCM WAV file."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wf:
        wf.setnchannels(channels)
        wf.setsampwidth(2)
        wf.setframerate(sample_rate)
        wf.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())
    return buf.getvalue()
