"""Any audio file: every common WAV layout and FLAC/OGG/MP3 through the one reader, ``kwsd detect`` and replay."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kwsd.audio.hub import AudioHub
from kwsd.audio.wavfile import AudioFileError, AudioReader, read_wav, to_wav, write_wav
from kwsd.settings import InputSettings
from tests.test_audio_replay import drain

EXAMPLE = "positive/kws_xiaoyunxiaoyun.wav"


def sox(*args: str | Path) -> None:
    subprocess.run(["sox", *map(str, args)], check=True, capture_output=True, timeout=60)


def wav_format_tag(path: Path) -> int:
    """The fmt chunk's format tag: 1 PCM, 3 IEEE float, 0xFFFE WAVE_FORMAT_EXTENSIBLE."""
    return int.from_bytes(path.read_bytes()[20:22], "little")


@pytest.fixture(scope="module")
def variants(audio_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model card's example in every layout a user may have, made by sox (and libsndfile for MP3)."""
    src = audio_dir / EXAMPLE
    d = tmp_path_factory.mktemp("variants")
    out = {name: d / name for name in ("ext3.wav", "s24.wav", "f32.wav", "u8.wav", "p.flac", "p.ogg", "p.mp3",
                                       "p44k.wav")}
    sox("-M", src, src, src, out["ext3.wav"])  # 3 channels: sox writes WAVE_FORMAT_EXTENSIBLE
    sox(src, "-b", "24", out["s24.wav"])
    sox(src, "-e", "floating-point", "-b", "32", out["f32.wav"])
    sox("-D", src, "-b", "8", out["u8.wav"])  # no dither: 8-bit samples are the 16-bit ones cut short
    sox(src, out["p.flac"])
    sox(src, out["p.ogg"])
    sox(src, "-r", "44100", out["p44k.wav"])
    data, rate = sf.read(str(src), dtype="int16")
    sf.write(str(out["p.mp3"]), data, rate, format="MP3")
    return out


def test_every_layout_reads_as_the_original(variants: dict[str, Path], audio_dir: Path) -> None:
    ref = read_wav(audio_dir / EXAMPLE)
    assert wav_format_tag(variants["ext3.wav"]) == 0xFFFE and wav_format_tag(variants["s24.wav"]) == 0xFFFE
    assert wav_format_tag(variants["f32.wav"]) == 3 and wav_format_tag(variants["u8.wav"]) == 1
    for name in ("ext3.wav", "s24.wav", "f32.wav", "p.flac"):  # lossless, 16 bits or more: the same samples
        np.testing.assert_array_equal(read_wav(variants[name]), ref, err_msg=name)
    np.testing.assert_array_equal(read_wav(variants["ext3.wav"], channel=2), ref)
    np.testing.assert_array_equal(read_wav(variants["ext3.wav"], channel=None), ref)
    assert np.max(np.abs(read_wav(variants["u8.wav"]) - ref)) <= 256  # 8-bit: one quantisation step
    for name in ("p.ogg", "p.mp3", "p44k.wav"):  # lossy or resampled: same signal, same length within a frame
        got = read_wav(variants[name])
        n = min(got.size, ref.size)
        lag = int(np.argmax(np.correlate(got[:16000], ref[4000:12000], "valid"))) - 4000 if name == "p.mp3" else 0
        a, b = got[max(lag, 0):][: n - abs(lag)], ref[: n - abs(lag)]
        assert np.corrcoef(a, b)[0, 1] > 0.95, name
        assert abs(got.size - ref.size) < 2400, name


def test_detect_reads_extensible_24_bit_and_flac(variants: dict[str, Path], model_path: Path) -> None:
    files = [variants["ext3.wav"], variants["s24.wav"], variants["p.flac"], variants["p.mp3"]]
    cmd = [sys.executable, "-m", "kwsd", "detect", "--model", str(model_path), *map(str, files)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    hits = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(h["file"], h["keyword"]) for h in hits] == [(str(f), "小云小云") for f in files]
    assert len({round(h["score"], 3) for h in hits[:3]}) == 1  # the same samples give the same score


def damaged(audio_dir: Path, tmp_path: Path) -> dict[str, Path]:
    data = (audio_dir / EXAMPLE).read_bytes()
    files = {
        "odd.wav": data[:-1],  # odd byte count: half a sample at the end
        "half.wav": data[: len(data) // 2 + 1],  # the data chunk announces twice what is there
        "header-only.wav": data[:44],
        "bad-fmt.wav": data[:20] + b"\xff" * 20 + data[40:],  # corrupt fmt chunk
        "text.wav": b"this is not audio\n" * 20,
        "empty.flac": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return {name: tmp_path / name for name in files}


def test_truncated_and_corrupt_files_are_one_clear_line(
    audio_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = damaged(audio_dir, tmp_path)
    ref = read_wav(audio_dir / EXAMPLE)
    np.testing.assert_array_equal(read_wav(files["odd.wav"]), ref[:-1])
    assert "odd.wav: truncated: its header announces 144924 bytes of audio, the file holds 144923" in caplog.text
    np.testing.assert_array_equal(read_wav(files["half.wav"]), ref[: 72441 // 2])
    expected = {
        "header-only.wav": "header-only.wav: truncated: its header announces 144924 bytes of audio, the file "
                           "holds none",
        "bad-fmt.wav": "bad-fmt.wav: cannot read audio: Error in WAV/W64/RF64 file. Malformed 'fmt ' chunk",
        "text.wav": "text.wav: cannot read audio: not an audio file libsndfile knows (WAV, FLAC, OGG, MP3, AIFF, ...)",
        "empty.flac": "empty.flac: cannot read audio: not an audio file libsndfile knows",
    }
    for name, message in expected.items():
        with pytest.raises(AudioFileError) as info:
            read_wav(files[name])
        assert str(info.value).startswith(f"{files[name].parent}/{message}"), str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(AudioFileError, match=r"missing\.wav: no such file"):
        read_wav(tmp_path / "missing.wav")


def test_detect_on_damaged_files_prints_one_line_each(audio_dir: Path, model_path: Path, tmp_path: Path) -> None:
    files = damaged(audio_dir, tmp_path)
    cmd = [sys.executable, "-m", "kwsd", "detect", "--model", str(model_path), *map(str, files.values())]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    problems = [line for line in r.stderr.splitlines() if line.startswith(("ERROR", "WARNING"))]
    assert len(problems) == len(r.stderr.splitlines()) == 6, r.stderr
    # the two files that are only cut short still decode to the keyword where enough of it is left
    assert [json.loads(line)["file"] for line in r.stdout.splitlines()] == [str(files["odd.wav"])]


def test_replay_input_reads_24_bit_extensible_and_flac(variants: dict[str, Path], audio_dir: Path) -> None:
    ref = np.rint(read_wav(audio_dir / EXAMPLE)).astype(np.int16)
    for name, channel in (("s24.wav", 0), ("ext3.wav", 2), ("p.flac", 0)):
        stop = threading.Event()
        settings = InputSettings(device=str(variants[name]), realtime=False, sites={channel: "s"})
        hub = AudioHub([settings], stop)
        hub.start()
        try:
            got = drain(hub, 20.0)["s"]
        finally:
            hub.stop()
        np.testing.assert_array_equal(got, ref, err_msg=name)


def test_replay_input_names_a_corrupt_file(audio_dir: Path, tmp_path: Path) -> None:
    from kwsd.audio.capture import DeviceError, _ReplaySource

    bad = damaged(audio_dir, tmp_path)["bad-fmt.wav"]
    with pytest.raises(DeviceError, match=r"cannot replay \S+bad-fmt\.wav: cannot read audio: Error in WAV"):
        _ReplaySource(InputSettings(device=str(bad)), "file", lambda: 0.0, threading.Event(), lambda: None)


def test_one_writer_makes_plain_16_bit_wav(tmp_path: Path) -> None:
    stereo = (np.arange(3200, dtype=np.int16).reshape(-1, 2) - 1600) * 7
    path = write_wav(tmp_path / "w.wav", stereo, 48000, channels=2)
    assert path.read_bytes() == to_wav(stereo, 48000, 2) and len(path.read_bytes()) == 44 + stereo.nbytes
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (2, 2, 48000, 1600)
    with AudioReader(path) as r:
        assert (r.rate, r.channels, r.frames) == (48000, 2, 1600)
        assert np.frombuffer(r.read_int16(5000), "<i2").reshape(-1, 2).tolist() == stereo.tolist()
