"""Recordings in and out: one reader for every common audio file, one WAV writer.

Reading goes through libsndfile (python-soundfile, whose wheels bundle it): WAV in every layout (8-bit unsigned,
16/24/32-bit PCM, 32/64-bit float, A-law/µ-law, WAVE_FORMAT_EXTENSIBLE as ``sox -M`` and 24-bit tools write it),
RF64/W64, AIFF, FLAC, OGG (Vorbis, Opus) and MP3. Samples come out on the int16 scale the model expects. A file
that cannot be read is an ``AudioFileError`` naming it in one line; a truncated file is read as far as it goes,
with one warning. Writing makes plain 16-bit PCM WAV (44-byte header), what Hermes and Home Assistant expect.
"""

from __future__ import annotations

import io
import logging
import re
import wave
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np
import soundfile as sf

from kwsd.audio.resample import StreamResampler, resample_once

log = logging.getLogger(__name__)

# Extensions the folder-scanning commands pick up; the reader itself goes by the file's content.
AUDIO_SUFFIXES = (".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".w64", ".rf64")

_SHORT_DATA = re.compile(r"^data : (\d+) \(should be (\d+)\)", re.MULTILINE)


class AudioFileError(ValueError):
    """A recording cannot be read; the message names the file and what is wrong, in one line."""


def _problem(path: Path, exc: Exception) -> AudioFileError:
    """One line for a libsndfile failure, without the library's own ``Error opening '...':`` prefix."""
    text = getattr(exc, "error_string", "") or str(exc)
    text = text.rstrip(".").strip() or type(exc).__name__
    if text == "Format not recognised":
        text = "not an audio file libsndfile knows (WAV, FLAC, OGG, MP3, AIFF, ...)"
    return AudioFileError(f"{path}: cannot read audio: {text}")


class AudioReader:
    """An open recording, read block by block as interleaved int16 (the replay input uses this)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise AudioFileError(f"{self.path}: no such file")
        try:
            self._file = sf.SoundFile(str(self.path))
        except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as exc:
            raise _problem(self.path, exc) from exc
        self.rate: int = int(self._file.samplerate)
        """Sample rate of the file (Hz)."""
        self.channels: int = int(self._file.channels)
        """Channel count."""
        self.frames: int = int(self._file.frames)
        """Frames the file holds (for a truncated file: as far as it goes)."""
        self.description = f"{self._file.format_info} {self._file.subtype_info}"
        """What the file is, e.g. ``WAVE (Microsoft) Signed 24 bit PCM``."""
        self._check_truncation()

    def _check_truncation(self) -> None:
        match = _SHORT_DATA.search(self._file.extra_info or "")
        if match is None:
            return
        announced, held = int(match.group(1)), int(match.group(2))
        if held < announced:
            if self.frames == 0:
                self.close()
                raise AudioFileError(f"{self.path}: truncated: its header announces {announced} bytes of audio, "
                                     "the file holds none")
            log.warning("%s: truncated: its header announces %d bytes of audio, the file holds %d; reading those",
                        self.path, announced, held)

    def read_int16(self, frames: int) -> bytes:
        """Up to ``frames`` frames as interleaved little-endian int16 bytes; ``b""`` at the end."""
        # Into a buffer of our own: without one, every read first seeks to size its result.
        out = np.empty((max(0, frames), self.channels), dtype=np.int16)
        try:
            data = self._file.read(frames, dtype="int16", always_2d=True, out=out)
        except (sf.SoundFileError, RuntimeError) as exc:
            raise _problem(self.path, exc) from exc
        return data.astype("<i2", copy=False).tobytes()

    def read_block(self, frames: int) -> np.ndarray:
        """Up to ``frames`` frames as (frames, channels) float32 on the int16 scale; no rows at the end."""
        try:
            data = self._file.read(frames, dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError) as exc:
            raise _problem(self.path, exc) from exc
        return data * np.float32(32768.0)

    def read_all(self) -> np.ndarray:
        """The whole rest of the file as (frames, channels) float32 on the int16 scale."""
        try:
            data = self._file.read(dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError) as exc:
            raise _problem(self.path, exc) from exc
        return data * np.float32(32768.0)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> AudioReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def read_wav(path: Path, channel: int | None = 0, rate: int = 16000) -> np.ndarray:
    """A recording's samples as int16-scale float32 at ``rate``: one channel, or the mean of all (``None``).

    Any format ``AudioReader`` reads (the name is historical); AudioFileError names the file otherwise.
    """
    with AudioReader(path) as reader:
        data = reader.read_all()
        channels, file_rate = reader.channels, reader.rate
    if data.shape[0] == 0:
        raise AudioFileError(f"{path}: holds no audio")
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
    """Duration of a recording from its header (0.0 if it cannot be read: reading it reports why)."""
    try:
        with AudioReader(path) as reader:
            return reader.frames / reader.rate if reader.rate else 0.0
    except AudioFileError:
        return 0.0


def read_wav_blocks(path: Path, channel: int | None = 0, rate: int = 16000, block_seconds: float = 10.0
                    ) -> Iterator[np.ndarray]:
    """A recording as consecutive blocks of about ``block_seconds``, like :func:`read_wav` (int16-scale float32 at
    ``rate``, one channel or the mean of all), so that hours of audio never sit in memory at once."""
    with AudioReader(path) as reader:
        channels, file_rate = reader.channels, reader.rate
        if channel is not None and not 0 <= channel < channels:
            raise AudioFileError(f"{path}: has {channels} channel(s); channel {channel} does not exist")
        resampler = StreamResampler(file_rate, rate) if file_rate != rate else None
        frames = max(1, int(block_seconds * file_rate))
        while True:
            data = reader.read_block(frames)
            if data.shape[0] == 0:
                break
            mono = data.mean(axis=1) if channel is None else data[:, channel]
            if resampler is not None:
                mono = resampler.process(mono)
            yield np.ascontiguousarray(mono, dtype=np.float32)
        if resampler is not None:
            yield np.ascontiguousarray(resampler.flush(), dtype=np.float32)


def to_wav(samples: np.ndarray, sample_rate: int = 16000, channels: int = 1) -> bytes:
    """int16 samples (interleaved, or (frames, channels), when ``channels`` > 1) as 16-bit PCM WAV bytes."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wf:
        wf.setnchannels(channels)
        wf.setsampwidth(2)
        wf.setframerate(sample_rate)
        wf.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())
    return buf.getvalue()


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int = 16000, channels: int = 1) -> Path:
    """Write ``to_wav(samples, sample_rate, channels)`` to ``path``; return the path."""
    path = Path(path)
    path.write_bytes(to_wav(samples, sample_rate, channels))
    return path
