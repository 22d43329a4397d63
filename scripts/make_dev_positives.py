#!/usr/bin/env python3
"""Make harder copies of the dev positives: the same recordings with added noise, and 20 dB quieter.

A room is noisier and a speaker further away than in the recordings; these copies measure how recall holds up.
Reproducible: the noise of every clip comes from ``--seed`` and the clip's position in the sorted list.

    noisy/<name>+pink10.wav    pink noise added at 10 dB SNR (whole-clip RMS against noise RMS)
    noisy/<name>+babble10.wav  another dev negative (other speech, looped) added at 10 dB SNR
    quiet/<name>-20dB.wav      the recording scaled by -20 dB

    KWSD_TEST_AUDIO=../shared/audio/xiaoyun PYTHONPATH=. python scripts/make_dev_positives.py --out /tmp/pos-hard
    python -m kwsd eval --positive /tmp/pos-hard/noisy --negative ../shared/audio/xiaoyun/negative
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from kwsd.audio.wavfile import read_wav
from kwsd.mqtt.messages import to_wav

RATE = 16000


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS pink (1/f power) noise, shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spectrum.size, dtype=np.float64)
    f[0] = 1.0
    noise = np.fft.irfft(spectrum / np.sqrt(f), n)
    return noise / max(float(np.sqrt(np.mean(noise ** 2))), 1e-12)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)))


def at_snr(clip: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    scaled = noise * (rms(clip) / max(rms(noise), 1e-12) / 10 ** (snr_db / 20))
    return np.clip(clip + scaled, -32768, 32767)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audio", default=os.environ.get("KWSD_TEST_AUDIO"),
                    help="folder with positive/ and negative/ recordings (default: $KWSD_TEST_AUDIO)")
    ap.add_argument("--out", type=Path, required=True, help="folder to write the clips to")
    ap.add_argument("--snr", type=float, default=10.0, help="signal-to-noise ratio of the noisy copies, dB")
    ap.add_argument("--gain", type=float, default=-20.0, help="gain of the quiet copies, dB")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.audio:
        sys.exit("set --audio or KWSD_TEST_AUDIO to the folder of recordings")
    folder = Path(args.audio)
    positives = sorted((folder / "positive").glob("*.wav"))
    negatives = sorted((folder / "negative").glob("*.wav"))
    if not positives or not negatives:
        sys.exit(f"{folder}: needs positive/*.wav and negative/*.wav")
    for kind in ("noisy", "quiet"):
        (args.out / kind).mkdir(parents=True, exist_ok=True)
    snr = f"{args.snr:g}"
    written = 0
    for i, path in enumerate(positives):
        rng = np.random.default_rng([args.seed, i])
        clip = read_wav(path)
        other = read_wav(negatives[int(rng.integers(len(negatives)))])
        babble = np.resize(other, clip.shape[0])  # looped to the clip's length
        copies = {
            ("noisy", f"+pink{snr}"): at_snr(clip, pink(clip.shape[0], rng), args.snr),
            ("noisy", f"+babble{snr}"): at_snr(clip, babble, args.snr),
            ("quiet", f"{args.gain:+g}dB"): clip * 10 ** (args.gain / 20),
        }
        for (kind, suffix), audio in copies.items():
            (args.out / kind / f"{path.stem}{suffix}.wav").write_bytes(to_wav(np.rint(audio), RATE))
            written += 1
    print(f"wrote {written} clips to {args.out} (seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
