"""``kwsd detect`` (detections in recordings, JSON lines) and ``kwsd eval`` (DET tables for choosing thresholds).

Both stream their recordings in blocks, so memory does not grow with a recording's length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the commands import what they use when they run: ``kwsd --help`` and other commands do not
    import numpy as np

    from kwsd.audio.wavfile import AudioFileError
    from kwsd.kws.detector import Detection, Detector
    from kwsd.kws.evaluation import Evaluation, Positives
    from kwsd.kws.session import ModelSession
    from kwsd.settings import Settings

log = logging.getLogger(__name__)


def _load_settings(args: argparse.Namespace) -> Settings:
    from kwsd import settings as settings_mod
    from kwsd.settings import KeywordSettings, Settings

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
    from kwsd.kws.session import ModelSession

    return ModelSession(s.model.path, s.model.providers, s.model.intra_op_threads, s.model.max_batch)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="config file for the model and keyword settings")
    p.add_argument("--model", type=Path, help="exported ONNX model (default: model.path of the config)")
    p.add_argument("--keyword", action="append", help="keyword phrase (repeatable; default: the config's)")
    p.add_argument("--threshold", type=float, help="threshold for every keyword (default: the config's)")
    p.add_argument("--provider", action="append", help="onnxruntime execution provider (repeatable)")


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return number


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
    p.add_argument("--jobs", type=_positive_int, metavar="N",
                   help="recordings decoded at once, each on its own thread (default: one per CPU core; the "
                        "output is the same, in the order of the files)")
    p.add_argument("--block", type=float, default=0.0,
                   help="feed the audio in blocks of this many seconds, as a live stream would (default: 10 s "
                        "blocks; detections do not depend on it)")
    p.set_defaults(func=cmd_detect, exit_at_once=True)

    p = sub.add_parser(
        "eval", help="DET table per keyword (recall vs false alarms per threshold) on labelled recordings",
        description="Score folders of recordings that contain a keyword and folders that do not, and print per "
        "keyword the recall, false alarms and false alarms per hour for thresholds from 0.05 to 0.95: choose the "
        "threshold from it. Positives are scored at every 10 ms offset of the model's 30 ms frames; the audio "
        "streams through the model, so hours of negatives fit in a few hundred MB.")
    _common(p)
    p.add_argument("--positive", action="append", required=True, metavar="[ID=]DIR",
                   help="folder of WAVs that say a keyword (repeatable); ID= names the keyword's wakewordId, "
                        "without it the folder counts for every keyword")
    p.add_argument("--negative", action="append", required=True, type=Path, metavar="DIR",
                   help="folder of WAVs that say no keyword (repeatable)")
    p.add_argument("--plot", type=_plot_file, help="write the DET curves to this PNG file (needs kwsd[plot])")
    p.add_argument("--json", action="store_true", help="print the tables, false alarms and misses as JSON")
    p.add_argument("--explain", action="store_true",
                   help="list every false alarm (file, time, score) and every missed positive (best score) at the "
                        "configured threshold")
    p.add_argument("--jobs", type=_positive_int, metavar="N",
                   help="recordings decoded at once, each on its own thread (default: one per CPU core; the "
                        "result is the same)")
    p.add_argument("--offsets", type=int, choices=(1, 2, 3), default=3,
                   help="evaluate every positive started 0, 10 and 20 ms later (3, default), or fewer")
    p.set_defaults(func=cmd_eval, exit_at_once=True)


def cmd_detect(args: argparse.Namespace) -> int:
    from kwsd.audio.wavfile import AudioFileError
    from kwsd.kws.decoder import KeywordError
    from kwsd.kws.detector import Detector
    from kwsd.kws.session import ModelError
    from kwsd.settings import ConfigError

    try:
        s = _load_settings(args)
        session = open_session(s)
        jobs = min(cpu_jobs(args.jobs), len(args.files))
        detectors = [Detector(session, s.detector, threads=1) for _ in range(jobs)]  # the jobs are the threads
    except (ConfigError, ModelError, KeywordError) as exc:
        log.error("%s", exc)
        return 2
    failed = 0
    for path, found in detect_files(detectors, args.files, None if args.mix else args.channel,
                                    args.block or 10.0):
        if isinstance(found, AudioFileError):
            log.error("%s", found)
            failed += 1
        else:
            _print_detections(path, found)
    return 1 if failed else 0


def cpu_jobs(jobs: int | None) -> int:
    """Recordings to decode at once: ``--jobs``, or one per CPU this process may use."""
    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, jobs)


_DONE = object()


def detect_files(detectors: Sequence[Detector], paths: Sequence[Path], channel: int | None,
                 block_seconds: float = 10.0) -> Iterator[tuple[Path, list[Detection] | AudioFileError]]:
    """Every recording of ``paths`` streamed through a detector, one recording per detector at a time, each on
    its own thread (the model and the numpy front end release the interpreter lock, so the recordings are decoded
    side by side on separate cores).

    Yields in the order of ``paths``: ``(path, detections)`` as they are found (a recording's may come in several
    parts, so a long recording's detections appear while it is decoded), then ``(path, AudioFileError)`` for a
    recording that cannot be read. Each recording runs alone on its stream, exactly as ``detect_samples`` would
    run it: the detections do not depend on the other recordings or on the number of detectors.
    """
    from kwsd.audio.wavfile import AudioFileError, read_wav_blocks

    results: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue() for _ in paths]
    order = iter(enumerate(paths))
    lock = threading.Lock()
    stop = threading.Event()

    def work(detector: Detector) -> None:
        while not stop.is_set():
            with lock:
                index, path = next(order, (-1, None))
            if path is None:
                return
            out = results[index]
            name = str(path)
            detector.add_stream(name)
            try:
                for block in read_wav_blocks(path, channel, detector.sample_rate, block_seconds):
                    detector.accept(name, block)
                    if hits := detector.step():
                        out.put(hits)
                    if stop.is_set():
                        return
                if hits := detector.finish(name):
                    out.put(hits)
                out.put(_DONE)
            except AudioFileError as exc:
                out.put(exc)
            except BaseException as exc:  # a fault of kwsd itself: raised in the caller's thread when it gets here
                out.put(exc)
            finally:
                detector.remove_stream(name)

    threads = [threading.Thread(target=work, args=(d,), name=f"kwsd-detect-{i}", daemon=True)
               for i, d in enumerate(detectors)]
    for t in threads:
        t.start()
    try:
        for path, out in zip(paths, results, strict=True):
            while True:
                item = out.get()
                if item is _DONE:
                    break
                if isinstance(item, AudioFileError):
                    yield path, item
                    break
                if isinstance(item, BaseException):
                    raise item
                yield path, item
    finally:
        stop.set()
        for t in threads:
            t.join()


def _print_detections(path: Path, hits: Sequence[Detection]) -> None:
    for d in hits:
        print(json.dumps({
            "file": str(path), "keyword": d.keyword, "wakewordId": d.wakeword_id, "score": round(d.score, 4),
            "threshold": d.threshold, "start": round(d.start, 3), "end": round(d.end, 3),
        }, ensure_ascii=False), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def posteriors(session: ModelSession, samples: np.ndarray, phase: int = 0) -> np.ndarray:
    """Token posteriors for every model frame of a whole recording at one LFR phase (look-ahead flushed)."""
    import numpy as np

    from kwsd.kws.features import offline_features

    feats = offline_features(samples, session.contract.features, phase)
    delay = session.contract.delay_frames
    feats = np.concatenate([feats, np.repeat(feats[-1:], delay, axis=0)])
    probs, _ = session.run(feats[None], session.new_cache(1))
    return probs[0, delay:]


def _positives(values: Sequence[str], known: set[str]) -> list[Positives]:
    from kwsd.kws.evaluation import Positives
    from kwsd.settings import ConfigError

    out = []
    for value in values:
        wid, sep, folder = value.partition("=")
        if not sep or Path(value).is_dir():
            wid, folder = "", value
        if wid and wid not in known:
            raise ConfigError(f"--positive {value}", f"{wid!r} is not a configured wakewordId ({sorted(known)})")
        out.append(Positives(Path(folder), wid))
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from kwsd.kws.decoder import KeywordError
    from kwsd.kws.detector import build_keywords
    from kwsd.kws.evaluation import SHIFTS, evaluate
    from kwsd.kws.session import ModelError
    from kwsd.settings import ConfigError

    try:
        s = _load_settings(args)
        session = open_session(s)
        fs = session.contract.features
        build_keywords(s.detector.keywords, session.contract.tokens, fs.model_frame_samples / fs.sample_rate)
        positives = _positives(args.positive, {k.wakeword_id for k in s.detector.keywords})
    except (ConfigError, ModelError, KeywordError) as exc:
        log.error("%s", exc)
        return 2
    for folder in [p.folder for p in positives] + list(args.negative):
        if not folder.is_dir() or not any(folder.glob("*.wav")):
            log.error("no WAV files in %s", folder)
            return 2
    thresholds = sorted({round(x, 2) for x in np.arange(0.05, 1.0, 0.05)} | {k.threshold for k in s.detector.keywords})
    t0 = time.perf_counter()
    result = evaluate(session, s.detector, positives, args.negative, thresholds, SHIFTS[: args.offsets],
                      jobs=cpu_jobs(args.jobs))
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=1, ensure_ascii=False))
    else:
        print_tables(result, args.explain)
    if result.negative_hours < 1.0:
        log.warning("the negatives total %.1f min: false alarms per hour measured on less than an hour of audio "
                    "say little; add hours of ordinary speech", result.negative_hours * 60)
    log.info("evaluated %d thresholds in %.1f s", len(thresholds), time.perf_counter() - t0)
    if args.plot:
        plot_det(result, args.plot)
    if result.unreadable:
        log.error("%d unreadable file(s) skipped: %s", len(result.unreadable),
                  ", ".join(u["file"] for u in result.unreadable))
        return 1
    return 0


def print_tables(result: Evaluation, explain: bool = False) -> None:
    for kw in result.keywords:
        shifts = "/".join(f"{s:g}" for s in kw.shifts_ms)
        print(f"\n{kw.keyword} (wakewordId {kw.wakeword_id}): {kw.positives} positive files at offsets {shifts} ms, "
              f"{result.negative_files} negative files ({result.negative_hours * 60:.1f} min)")
        print(f"{'threshold':>9} {'recall':>7} {'detected':>9}  {'recall per offset':<20} {'false alarms':>12} "
              f"{'FA/hour':>8}")
        for r in kw.rows:
            mark = "  <- configured" if r.threshold == kw.threshold else ""
            per = " ".join(f"{x:6.1%}" for x in r.recall_by_shift)
            print(f"{r.threshold:9.2f} {r.recall:7.1%} {r.detected:>4}/{r.positives:<4}  {per:<20} "
                  f"{r.false_alarms:12d} {r.false_alarms_per_hour:8.2f}{mark}")
        if explain:
            print(f"false alarms at {kw.threshold:.2f}: {len(kw.false_alarms)}")
            for fa in kw.false_alarms:
                print(f"  {fa['file']}  {fa['start']:.2f}-{fa['end']:.2f} s  score {fa['score']:.3f}")
            print(f"missed positives at {kw.threshold:.2f}: {len(kw.missed)}")
            for m in kw.missed:
                print(f"  {m['file']}  offset {m['shift_ms']:g} ms  best score {m['best_score']:.3f}")


def plot_det(result: Evaluation, path: Path) -> None:
    """DET curves, one panel per keyword: false alarms per hour (log scale; none at the left edge) against the
    miss rate, every point labelled with its thresholds, the configured threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = result.negative_hours
    n = len(result.keywords)
    fig, axes = plt.subplots(n, 1, figsize=(7.5, 5.0 * n), squeeze=False)
    zero = 0.3 / hours if hours else 0.01  # where "no false alarm" is drawn on the log axis
    cjk = _cjk_font()
    for kw_index, (ax, kw) in enumerate(zip(axes[:, 0], result.keywords, strict=True)):
        groups: dict[tuple[float, float], list[float]] = {}
        for r in kw.rows:
            x = r.false_alarms_per_hour if r.false_alarms else zero
            groups.setdefault((x, 100 * (1 - r.recall)), []).append(r.threshold)
        pts = list(groups)  # in threshold order: the curve runs from the lowest threshold to the highest
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="tab:blue", zorder=2)
        ax.set_xscale("log")
        conf = next(r for r in kw.rows if r.threshold == kw.threshold)
        cx = conf.false_alarms_per_hour if conf.false_alarms else zero
        cy = 100 * (1 - conf.recall)
        ax.plot([cx], [cy], marker="*", markersize=16, color="tab:red", zorder=3,
                label=f"configured threshold {kw.threshold:.2f}")
        labels = []
        for (x, y), ts in groups.items():
            text = f"{min(ts):.2f}" if len(ts) == 1 else f"{min(ts):.2f}-{max(ts):.2f}"
            labels.append((x, y, text))
        ax.set_xlim(zero / 2, max(max(p[0] for p in pts) * 3, zero * 30))
        ax.set_ylim(-3, max(max(p[1] for p in pts) * 1.15, 10))
        ax.axvline(zero, color="grey", lw=0.6, ls=":")
        ax.set_xticks([zero], labels=["none"], minor=True)  # the column of thresholds without false alarms
        ax.set_xlabel("false alarms per hour (log scale)")
        ax.set_ylabel("miss rate at the worst offset (%)")
        name = kw.keyword if cjk else f"detector.keywords[{kw_index}]"
        ax.set_title(f"{name}: {kw.positives} positives, {hours * 60:.1f} min of negatives; labels: thresholds")
        ax.grid(True, which="both", alpha=0.3)
        legend = ax.legend(loc="upper right", fontsize=8)
        obstacles = [legend]
        if hours < 1.0:
            obstacles.append(ax.text(0.98, 0.10, f"WARNING: only {hours * 60:.1f} min of negatives (< 1 h):\n"
                                     "false alarms per hour are not reliable", transform=ax.transAxes,
                                     color="tab:red", fontsize=9, ha="right", va="bottom"))
        _place_labels(fig, ax, labels, obstacles)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"DET curve written to {path}", file=sys.stderr)


def _cjk_font() -> bool:
    """Whether a font that draws Chinese is installed (then it is used); otherwise titles name keywords by number."""
    from matplotlib import font_manager, rcParams

    for font in font_manager.fontManager.ttflist:
        if any(tag in font.name for tag in ("CJK", "WenQuanYi", "Hei", "Song", "Ming", "Droid Sans Fallback")):
            rcParams["font.sans-serif"] = [font.name, *rcParams["font.sans-serif"]]
            return True
    return False


def _place_labels(fig: Any, ax: Any, labels: list[tuple[float, float, str]], obstacles: Sequence[Any]) -> None:
    """Label every point, each label moved around its point until it overlaps no other label, no point and no
    other text."""
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken: list[Any] = [o.get_window_extent(renderer) for o in obstacles]
    points = [ax.transData.transform((x, y)) for x, y, _ in labels]
    for (x, y, text), _ in zip(labels, points, strict=True):
        placed = None
        for radius in (8, 16, 26, 38, 52, 70):
            for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)):
                ann = ax.annotate(text, (x, y), xytext=(dx * radius, dy * radius), textcoords="offset points",
                                  fontsize=7, ha="left" if dx >= 0 else "right",
                                  va="bottom" if dy >= 0 else "top",
                                  arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"})
                box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
                clash = any(box.overlaps(b) for b in taken) or any(box.contains(px, py) for px, py in points)
                if not clash:
                    placed = (ann, box)
                    break
                ann.remove()
            if placed:
                break
        if placed is None:  # crowded: the last resort is the farthest position
            ann = ax.annotate(text, (x, y), xytext=(60, 60), textcoords="offset points", fontsize=7,
                              arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"})
            placed = (ann, ann.get_window_extent(renderer))
        taken.append(placed[1])
