"""``kwsd detect`` (detections in recordings, JSON lines) and ``kwsd eval`` (the DET table for choosing a threshold)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kwsd import settings as settings_mod
from kwsd.audio.wavfile import AudioFileError, read_wav
from kwsd.kws.decoder import KeywordError
from kwsd.kws.detector import Detector, build_keywords, detect_samples, new_decoder
from kwsd.kws.session import ModelError, ModelSession
from kwsd.settings import ConfigError, KeywordSettings, Settings

log = logging.getLogger(__name__)


def _load_settings(args: argparse.Namespace) -> Settings:
    base = settings_mod.load(args.config) if args.config else Settings()
    det = base.detector
    if args.keyword:
        template = det.keywords[0] if det.keywords else KeywordSettings()
        det = dataclasses.replace(det, keywords=tuple(
            dataclasses.replace(template, phrase=k, id="") for k in args.keyword))
    if args.threshold is not None:
        det = dataclasses.replace(det, keywords=tuple(
            dataclasses.replace(k, threshold=args.threshold) for k in det.keywords))
    if args.model is not None:
        model = dataclasses.replace(base.model, path=args.model)
    elif args.config is None:  # no config: the installed model or the checkout's, from any folder
        from kwsd.model.locate import default_model

        model = dataclasses.replace(base.model, path=default_model())
    else:
        model = base.model
    if args.provider:
        model = dataclasses.replace(model, providers=tuple(args.provider))
    return dataclasses.replace(base, detector=det, model=model)


def open_session(s: Settings) -> ModelSession:
    return ModelSession(s.model.path, s.model.providers, s.model.intra_op_threads, s.model.max_batch)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="config file for the model and keyword settings")
    p.add_argument("--model", type=Path, help="exported ONNX model (default: model.path of the config)")
    p.add_argument("--keyword", action="append", help="keyword phrase (repeatable; default: the config's)")
    p.add_argument("--threshold", type=float, help="threshold for every keyword (default: the config's)")
    p.add_argument("--provider", action="append", help="onnxruntime execution provider (repeatable)")


def _plot_file(value: str) -> Path:
    """``--plot FILE``, refused before any work when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise argparse.ArgumentTypeError("matplotlib is not installed: pip install 'kwsd[plot]'") from None
    return Path(value)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect", help="detect keywords in recordings; prints one JSON object per detection",
        description="Run the detector over recordings as a live stream would hear them and print one JSON "
        "object per detection (file, keyword, wakewordId, score, threshold, start, end in seconds). Without "
        "--model or --config the model is found in ./models, /etc/kwsd/config.yaml's model.path, /opt/kwsd/models "
        "or this checkout's models/. Exit status 1 when a file cannot be read.")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE",
                   help="recordings: WAV (any layout), FLAC, OGG, MP3; any rate and channel count")
    _common(p)
    p.add_argument("--channel", type=int, default=0, help="channel to listen to (default 0)")
    p.add_argument("--mix", action="store_true", help="listen to the mean of all channels instead")
    p.add_argument("--block", type=float, default=0.0,
                   help="feed the audio in blocks of this many seconds, as a live stream would (default: whole)")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser(
        "eval", help="DET table (recall vs false alarms per threshold) on labelled recordings",
        description="Score a folder of recordings that contain the keyword and one that does not, and print the "
        "recall, false alarms and false alarms per hour for thresholds from 0.05 to 0.95: choose the "
        "threshold from it. The model runs once per file.")
    _common(p)
    p.add_argument("--positive", type=Path, required=True, help="folder of WAVs that contain the keyword")
    p.add_argument("--negative", type=Path, required=True, help="folder of WAVs that do not")
    p.add_argument("--plot", type=_plot_file, help="write the DET curve to this PNG file (needs kwsd[plot])")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=cmd_eval)


def cmd_detect(args: argparse.Namespace) -> int:
    try:
        s = _load_settings(args)
        detector = Detector(open_session(s), s.detector)
    except (ConfigError, ModelError, KeywordError) as exc:
        log.error("%s", exc)
        return 2
    failed = 0
    for path in args.files:
        try:
            samples = read_wav(path, None if args.mix else args.channel)
        except AudioFileError as exc:
            log.error("%s", exc)
            failed += 1
            continue
        block = int(args.block * detector.sample_rate) or None
        for d in detect_samples(detector, str(path), samples, block):
            print(json.dumps({
                "file": str(path), "keyword": d.keyword, "wakewordId": d.wakeword_id, "score": round(d.score, 4),
                "threshold": d.threshold, "start": round(d.start, 3), "end": round(d.end, 3),
            }, ensure_ascii=False), flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class DetRow:
    threshold: float
    recall: float
    detected: int
    positives: int
    false_alarms: int
    false_alarms_per_hour: float
    negative_hours: float


def posteriors(session: ModelSession, samples: np.ndarray) -> np.ndarray:
    """Token posteriors for every model frame of a whole recording (look-ahead flushed)."""
    from kwsd.kws.features import offline_features

    feats = offline_features(samples, session.contract.features)
    delay = session.contract.delay_frames
    feats = np.concatenate([feats, np.repeat(feats[-1:], delay, axis=0)])
    probs, _ = session.run(feats[None], session.new_cache(1))
    return probs[0, delay:]


def det_table(session: ModelSession, s: Settings, positives: Sequence[Path], negatives: Sequence[Path],
              thresholds: Sequence[float]) -> list[DetRow]:
    """Run the model once per file, then decode the cached posteriors at every threshold."""
    fs = session.contract.features
    frame_seconds = fs.model_frame_samples / fs.sample_rate
    det = s.detector
    pos = [posteriors(session, read_wav(p)) for p in positives]
    neg_audio = [read_wav(p) for p in negatives]
    neg = [posteriors(session, a) for a in neg_audio]
    hours = sum(a.shape[0] for a in neg_audio) / fs.sample_rate / 3600
    rows = []
    for t in thresholds:
        kws = build_keywords([dataclasses.replace(k, threshold=t) for k in det.keywords], session.contract.tokens,
                             frame_seconds)

        def hits(p: np.ndarray, kws: Any = kws) -> int:
            return len(new_decoder(kws, det, frame_seconds).step(p, 0))

        detected = sum(1 for p in pos if hits(p) > 0)
        fa = sum(hits(p) for p in neg)
        rows.append(DetRow(t, detected / max(1, len(pos)), detected, len(pos), fa, fa / hours if hours else 0.0,
                           hours))
    return rows


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        s = _load_settings(args)
        session = open_session(s)
        build_keywords(s.detector.keywords, session.contract.tokens, 0.03)
    except (ConfigError, ModelError, KeywordError) as exc:
        log.error("%s", exc)
        return 2
    pos = sorted(args.positive.glob("*.wav"))
    neg = sorted(args.negative.glob("*.wav"))
    if not pos or not neg:
        log.error("no WAV files in %s", args.positive if not pos else args.negative)
        return 2
    thresholds = sorted({round(x, 2) for x in np.arange(0.05, 1.0, 0.05)} | {k.threshold for k in s.detector.keywords})
    t0 = time.perf_counter()
    try:
        rows = det_table(session, s, pos, neg, thresholds)
    except AudioFileError as exc:
        log.error("%s", exc)
        return 1
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    else:
        print(f"{len(pos)} positive files, {len(neg)} negative files ({rows[0].negative_hours * 60:.1f} min); "
              f"keywords: {', '.join(k.phrase for k in s.detector.keywords)}")
        print(f"{'threshold':>9} {'recall':>7} {'detected':>9} {'false alarms':>13} {'FA/hour':>8}")
        default = {k.threshold for k in s.detector.keywords}
        for r in rows:
            mark = "  <- configured" if r.threshold in default else ""
            print(f"{r.threshold:9.2f} {r.recall:7.1%} {r.detected:>4}/{r.positives:<4} {r.false_alarms:13d} "
                  f"{r.false_alarms_per_hour:8.2f}{mark}")
    log.info("evaluated %d thresholds in %.1f s", len(rows), time.perf_counter() - t0)
    if args.plot:
        plot_det(rows, args.plot)
    return 0


def plot_det(rows: Sequence[DetRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([r.false_alarms_per_hour for r in rows], [1 - r.recall for r in rows], marker="o")
    for r in rows[:: max(1, len(rows) // 8)]:
        ax.annotate(f"{r.threshold:.2f}", (r.false_alarms_per_hour, 1 - r.recall), fontsize=7)
    ax.set_xlabel("false alarms per hour")
    ax.set_ylabel("miss rate")
    ax.set_title("kwsd DET curve")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"DET curve written to {path}", file=sys.stderr)
