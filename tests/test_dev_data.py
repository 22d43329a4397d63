"""The scripts that make the operating-point data: reproducible noisy/quiet positives, a split that keeps every
recording's variants in one half."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from kwsd.audio.wavfile import read_wav
from tests.conftest import REPO


def _run(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_dev_positives_are_reproducible_and_at_the_stated_levels(audio_dir: Path, tmp_path: Path) -> None:
    for out in ("a", "b"):
        _run("scripts/make_dev_positives.py", "--audio", str(audio_dir), "--out", str(tmp_path / out))
    made = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.wav"))
    positives = sorted((audio_dir / "positive").glob("*.wav"))
    assert len(made) == 3 * len(positives)
    for rel in made:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    _run("scripts/make_dev_positives.py", "--audio", str(audio_dir), "--out", str(tmp_path / "c"), "--seed", "1")
    name = positives[0].stem
    assert (tmp_path / "c/noisy" / f"{name}+pink10.wav").read_bytes() != \
        (tmp_path / "a/noisy" / f"{name}+pink10.wav").read_bytes()
    clean = read_wav(positives[0])
    quiet = read_wav(tmp_path / "a/quiet" / f"{name}-20dB.wav")
    ratio = float(np.sqrt(np.mean(quiet.astype(np.float64) ** 2) / np.mean(clean.astype(np.float64) ** 2)))
    assert abs(20 * np.log10(ratio) + 20) < 0.1
    noisy = read_wav(tmp_path / "a/noisy" / f"{name}+pink10.wav")
    noise = noisy.astype(np.float64) - clean
    snr = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise ** 2))
    assert abs(snr - 10) < 0.5


def test_split_keeps_variants_with_their_recording(tmp_path: Path) -> None:
    src = tmp_path / "src" / "pos"
    src.mkdir(parents=True)
    stems = [f"rec{i}" for i in range(20)]
    for stem in stems:
        for suffix in ("", "+pink10", "+babble10", "-20dB", "+tail", "+0a7ece38"):
            (src / f"{stem}{suffix}.wav").write_bytes(b"")
    _run("scripts/make_dev_split.py", "--out", str(tmp_path / "split"), str(src))
    side = {}
    for half in ("tune", "held"):
        for link in (tmp_path / "split" / half / "src-pos").glob("*.wav"):
            assert link.is_symlink() and link.resolve() == (src / link.name).resolve()
            side[link.name] = half
    assert len(side) == 6 * len(stems)
    for stem in stems:
        assert {side[n] for n in side if n.split("+")[0].split("-")[0] == stem} == {side[f"{stem}.wav"]}
    assert 0 < sum(v == "held" for v in side.values()) < len(side)
