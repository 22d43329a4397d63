"""``kwsd review``: list the archived wakes, mark verdicts, export clips for ``kwsd eval``, show the figures."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kwsd import settings as settings_mod
from kwsd.review.store import (
    KINDS,
    VERDICTS,
    Entry,
    Figures,
    ReviewError,
    ensure_dir,
    figures,
    find,
    parse_time,
    scan,
    set_verdict,
)

DEFAULT_CONFIG = Path("/etc/kwsd/config.yaml")


class _Usage(Exception):
    """A problem to print (naming the file, session or option) with exit status 1."""


def _archive(args: argparse.Namespace) -> tuple[Path, settings_mod.Settings]:
    if args.config is not None or DEFAULT_CONFIG.is_file():
        path = args.config or DEFAULT_CONFIG
        try:
            s = settings_mod.load(path)
        except settings_mod.ConfigError as exc:
            raise _Usage(f"{path}: {exc}") from exc
    else:
        s = settings_mod.Settings()
    root = args.dir or s.service.state_path() / "review"
    if not root.is_dir():
        raise _Usage(f"no review archive at {root} (review.enabled, service.state_dir; or give --dir)")
    return root, s


def _pad(text: str, width: int) -> str:
    """``text`` left-aligned in ``width`` terminal columns (CJK characters take two)."""
    used = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(0, width - used)


def _date(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a date or ISO-8601 time: {text!r}") from exc


def _until(text: str) -> datetime:
    """The end of a ``--until``: a bare date includes that whole day."""
    t = _date(text)
    return t + timedelta(days=1) if len(text.strip()) <= 10 else t


def _selected(args: argparse.Namespace, root: Path) -> list[Entry]:
    kinds = KINDS if args.kind == "all" else (args.kind,)
    out = []
    until = args.until
    for e in scan(root, kinds):
        if args.site and e.site not in args.site:
            continue
        if args.verdict and (e.verdict or "none") not in args.verdict:
            continue
        score = e.score
        if args.min_score is not None and (score is None or score < args.min_score):
            continue
        if args.max_score is not None and (score is None or score > args.max_score):
            continue
        if args.since is not None and e.time < args.since:
            continue
        if until is not None and e.time >= until:
            continue
        out.append(e)
    return out


def cmd_list(args: argparse.Namespace) -> int:
    root, _ = _archive(args)
    entries = _selected(args, root)
    if args.json:
        print(json.dumps([dict(e.data, file=str(e.audio) if e.audio else None) for e in entries],
                         ensure_ascii=False, indent=1))
        return 0
    print(f"{'time (UTC)':<19}  {'kind':<9} {'site':<12} {'score':>6} {'thresh':>6}  {'verdict':<10} "
          f"{'session':<32}  file")
    for e in entries:
        score = "-" if e.kind == "report" or e.score is None else f"{e.score:.3f}"
        threshold = e.data.get("threshold")
        thr = f"{threshold:.3f}" if isinstance(threshold, int | float) and e.kind != "report" else "-"
        audio = e.audio.name if e.audio is not None else "-"
        print(f"{e.time.strftime('%Y-%m-%d %H:%M:%S'):<19}  {e.kind:<9} {_pad(e.site, 12)} {score:>6} {thr:>6}  "
              f"{e.verdict or '-':<10} {e.session_id:<32}  {audio}")
    print(f"{len(entries)} entries in {root}")
    return 0


def cmd_mark(args: argparse.Namespace) -> int:
    root, _ = _archive(args)
    entry = find(root, args.session)
    if entry is None:
        raise _Usage(f"session {args.session}: not in the review archive {root}")
    try:
        entry = set_verdict(entry, args.verdict, "cli")
    except ReviewError as exc:
        raise _Usage(str(exc)) from exc
    except OSError as exc:
        raise _Usage(f"cannot write {entry.path}: {exc.strerror or exc}") from exc
    print(f"{entry.session_id}: {entry.kind.replace('_', ' ')} on site {entry.site} marked {entry.verdict}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    root, _ = _archive(args)
    out: Path = args.out
    try:
        folders = {True: ensure_dir(out / "positive"), False: ensure_dir(out / "negative")}
    except OSError as exc:
        raise _Usage(f"cannot create {out}: {exc.strerror or exc}") from exc
    counts = {True: 0, False: 0}
    unreviewed = missing = 0
    for e in _selected(args, root):
        if e.positive is None:
            unreviewed += 1
            continue
        if e.audio is None or not e.audio.is_file():
            missing += 1
            continue
        try:
            shutil.copyfile(e.audio, folders[e.positive] / e.audio.name)
        except OSError as exc:
            raise _Usage(f"cannot copy {e.audio} to {folders[e.positive]}: {exc.strerror or exc}") from exc
        counts[e.positive] += 1
    print(f"exported {counts[True]} positive and {counts[False]} negative clips to {out} "
          f"({unreviewed} unreviewed and {missing} without audio left out)")
    if counts[True] and counts[False]:
        print(f"next: kwsd eval --positive {out / 'positive'} --negative {out / 'negative'}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    root, s = _archive(args)
    days = args.days if args.days is not None else s.review.window_days
    since = datetime.now(UTC) - timedelta(days=days)
    entries = [e for e in scan(root) if not args.site or e.site in args.site]
    daily = figures(entries, since, by_day=True)
    window = figures(entries, since)
    if args.json:
        print(json.dumps({
            "window_days": days,
            "window": [{"site": k[0], "keyword": k[1], **f.to_dict()} for k, f in sorted(window.items())],
            "days": [{"site": k[0], "keyword": k[1], "day": k[2], **f.to_dict()} for k, f in sorted(daily.items())],
        }, ensure_ascii=False, indent=1))
        return 0
    header = (f"{'site':<12} {'keyword':<10} {'day':<10} {'wakes':>5} {'false':>5} {'confirmed':>9} {'missed':>6} "
              f"{'unreviewed':>10} {'near misses':>11} {'effective':>9}")
    print(header)

    def row(site: str, keyword: str, day: str, f: Figures) -> str:
        rate = f.effective_wake_rate
        return (f"{_pad(site, 12)} {_pad(keyword, 10)} {day:<10} {f.wakes:>5} {f.false_wakes:>5} "
                f"{f.confirmed_wakes:>9} {f.missed_wakes:>6} {f.unreviewed:>10} {f.near_misses:>11} "
                f"{'-' if rate is None else f'{rate:.1%}':>9}")

    for (site, keyword, day), f in sorted(daily.items()):
        print(row(site, keyword, day, f))
    for (site, keyword, _), f in sorted(window.items()):
        print(row(site, keyword, f"{days:g} days", f))
    print("effective = (wakes - false) / (wakes - false + missed); missed = near misses marked missed + reports")
    return 0


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", action="append", help="only this site (repeatable)")
    p.add_argument("--since", type=_date, help="from this date or UTC time (YYYY-MM-DD or ISO-8601)")
    p.add_argument("--until", type=_until, help="up to this date (inclusive) or UTC time")
    p.add_argument("--verdict", action="append", choices=[*VERDICTS, "none"], help="only this verdict (repeatable)")
    p.add_argument("--kind", choices=[*KINDS, "all"], default="all", help="wakes, near misses or reports")
    p.add_argument("--min-score", type=float, help="lowest score")
    p.add_argument("--max-score", type=float, help="highest score")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help=f"config file naming the state folder (default: {DEFAULT_CONFIG})")
    p.add_argument("--dir", type=Path, help="the archive folder itself (default: <state folder>/review)")


def register(sub: argparse._SubParsersAction) -> None:
    review = sub.add_parser("review", help="review archived wakes: list, mark, export for kwsd eval, stats",
                            description="The wake archive under <state folder>/review: what woke each site, with "
                            "its audio; mark false wakes and misses, export them for kwsd eval, see the "
                            "effective wake rate.")
    rsub = review.add_subparsers(dest="review_command", metavar="ACTION", required=True)
    p = rsub.add_parser("list", help="list wakes and near misses (time, site, score, verdict, file)",
                        description="List what the archive kept, oldest first: UTC time, kind, site, score and "
                        "threshold, verdict, sessionId and the WAV file; filter by site, verdict, kind, score and "
                        "date.")
    _common(p)
    _filters(p)
    p.add_argument("--json", action="store_true", help="print the sidecars as JSON")
    p.set_defaults(func=_run(cmd_list))
    p = rsub.add_parser("mark", help="record a verdict on a session",
                        description="Record a verdict in a wake's or near miss's sidecar, as the MQTT feedback "
                        "topic does: false_wake or wake on a wake, missed on a near miss that was the keyword.")
    _common(p)
    p.add_argument("session", metavar="SESSION", help="sessionId of the wake or near miss")
    p.add_argument("verdict", choices=VERDICTS, help="false_wake, wake (confirmed) or missed (a near miss was "
                   "the keyword)")
    p.set_defaults(func=_run(cmd_mark))
    p = rsub.add_parser("export", help="copy reviewed clips into OUT/positive and OUT/negative for kwsd eval",
                        description="Copy the reviewed clips by verdict: confirmed wakes and missed near misses "
                        "into OUT/positive, false wakes into OUT/negative, ready for kwsd eval --positive "
                        "OUT/positive --negative OUT/negative.")
    _common(p)
    _filters(p)
    p.add_argument("out", type=Path, metavar="OUT", help="folder to create positive/ and negative/ in")
    p.set_defaults(func=_run(cmd_export))
    p = rsub.add_parser("stats", help="wakes, false, confirmed, missed and the effective wake rate per site and day",
                        description="Per site, keyword and day, and over the window: wakes, false, confirmed and "
                        "missed wakes, unreviewed wakes, near misses and the effective wake rate (the metrics' "
                        "figures).")
    _common(p)
    p.add_argument("--site", action="append", help="only this site (repeatable)")
    p.add_argument("--days", type=float, help="days back (default: review.window_days)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=_run(cmd_stats))


def _run(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``func`` with its problems printed as one line naming the action (exit status 1), never a traceback."""
    def call(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except _Usage as exc:
            print(f"kwsd review {args.review_command}: {exc}", file=sys.stderr)
            return 1
    return call
