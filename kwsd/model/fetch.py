"""Fetch the manifest's upstream model files, verified, from ModelScope, an HTTP mirror or a folder.

Sources:
- ``None``: ModelScope over HTTPS (``https://www.modelscope.cn``; the ``MODELSCOPE_DOMAIN`` environment
  variable selects another domain, as the ModelScope SDK does).
- an ``http(s)://`` base URL of a server with the ModelScope API layout:
  ``<base>/api/v1/models/<owner>/<name>/repo?Revision=<revision>&FilePath=<path>``.
- a local folder laid out like the upstream repository (an air-gapped mirror), or a ``file://`` URL of one.

Every file is written to ``<name>.part`` beside its destination, checked against the manifest's size and
sha256, then renamed into place, so the destination only ever holds verified files. Files already present and
valid are left alone; when every required file is, the source is not contacted at all (a set-up that is in place
needs no network). Downloads use timeouts, retries with exponential backoff, and resume an interrupted transfer
with an HTTP Range request; a refused connection or an unknown host fails at once. Standard library only
(urllib).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from kwsd import __version__
from kwsd.model.manifest import Manifest, ManifestFile, load_manifest

log = logging.getLogger(__name__)

MODELSCOPE_DOMAIN = "www.modelscope.cn"
USER_AGENT = f"kwsd/{__version__} (model fetch)"
CHUNK = 256 * 1024
MAX_BACKOFF = 60.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class FetchError(RuntimeError):
    """A model file could not be obtained or failed its check; the message names the file and the source."""


class FileMissing(FetchError):
    """The source does not have the file at all (HTTP 404/410, or absent from the mirror folder)."""


class Unreachable(FetchError):
    """The server could not be reached (refused, unknown host) or kept failing after every retry."""


@dataclass(frozen=True)
class FetchedFile:
    path: str
    """Upstream path (``funasr/tokens_2599.txt``)."""
    local: Path
    """Where the verified file now is."""
    status: Literal["fetched", "present", "absent", "skipped"]
    """``fetched`` when it was downloaded or copied now, ``present`` when a valid copy was already there;
    for a file fetched only if the source has it, ``absent`` when the source lacks it and ``skipped`` when
    it was not asked for because every required file was already present."""
    size: int
    """Size in bytes."""


def modelscope_endpoint() -> str:
    """The ModelScope base URL (``MODELSCOPE_DOMAIN`` overrides the domain)."""
    return "https://" + (os.environ.get("MODELSCOPE_DOMAIN") or MODELSCOPE_DOMAIN)


def file_url(base: str, repository: str, revision: str, path: str) -> str:
    """Per-file download URL in ModelScope's layout (as ``modelscope.hub``'s ``get_file_download_url``)."""
    return (
        f"{base.rstrip('/')}/api/v1/models/{repository}/repo"
        f"?Revision={urllib.parse.quote_plus(revision)}&FilePath={urllib.parse.quote_plus(path)}"
    )


def fetch_model(dest: Path, source: str | None = None, **options: Any) -> dict[str, Path]:
    """Make ``dest`` hold every manifest file, verified; return upstream path -> local path.

    ``options`` are those of :func:`fetch_files`: ``include_checkpoints`` also fetches the optional PyTorch
    checkpoints; ``progress`` shows a progress bar on stderr (None: only when stderr is a terminal); ``retries``
    failed attempts per file are retried after ``backoff`` · 2^n seconds; ``timeout`` bounds every connect and
    read. Raises FetchError.
    """
    return {r.path: r.local for r in fetch_files(dest, source, **options) if r.status in ("fetched", "present")}


def fetch_files(
    dest: Path,
    source: str | None = None,
    *,
    include_checkpoints: bool = False,
    progress: bool | None = None,
    retries: int = 5,
    timeout: float = 30.0,
    backoff: float = 1.0,
    manifest: Manifest | None = None,
    on_file: Callable[[FetchedFile], None] | None = None,
) -> list[FetchedFile]:
    """Like ``fetch_model``, but say for each file what happened to it (``FetchedFile.status``).

    ``on_file`` is called as soon as each file is in place (the command line prints one line per file).
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    manifest = manifest if manifest is not None else load_manifest()
    dest = Path(dest)
    show = sys.stderr.isatty() if progress is None else progress
    obtain = _make_source(source, manifest, retries=retries, timeout=timeout, backoff=backoff)
    selected = manifest.select(include_optional=include_checkpoints)
    # Files fetched only if the source has them are not worth contacting the source for on their own.
    complete = all(_check_existing(dest / e.local_path, e) for e in selected if not e.if_present)
    results: list[FetchedFile] = []
    for entry in selected:
        target = dest / entry.local_path
        if entry.if_present and complete and not target.exists():
            result = FetchedFile(entry.path, target, "skipped", entry.size)
        else:
            try:
                result = _fetch_one(dest, entry, obtain, show)
            except FileMissing as exc:
                if not entry.if_present:
                    raise
                log.debug("%s", exc)
                result = FetchedFile(entry.path, target, "absent", entry.size)
        results.append(result)
        if on_file is not None:
            on_file(result)
    return results


def _check_existing(path: Path, entry: ManifestFile) -> bool:
    return path.is_file() and _check(path, entry) is None


# ------------------------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, name: str, total: int, enabled: bool) -> None:
        self.name = name
        self.total = total
        self.enabled = enabled
        self._last = 0.0
        self._drawn = False

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < self.total:
            return
        self._last = now
        frac = min(done / self.total, 1.0) if self.total else 1.0
        width = 24
        filled = int(frac * width)
        sys.stderr.write(
            f"\r{self.name}  [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}%  "
            f"{done / 1e6:.2f}/{self.total / 1e6:.2f} MB"
        )
        sys.stderr.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._drawn = False


# ------------------------------------------------------------------------------------------------------------
# One file


# Fills ``part`` with the file's bytes (possibly resuming what is there); returns True if any bytes in it came
# from an earlier, interrupted transfer (a resume), so a failed check is worth one clean retry.
_Obtain = Callable[[ManifestFile, Path, _Progress], bool]


@dataclass(frozen=True)
class _Source:
    description: str
    obtain: _Obtain


def _fetch_one(dest: Path, entry: ManifestFile, source: _Source, show: bool) -> FetchedFile:
    target = dest / entry.local_path
    if target.is_dir():
        raise FetchError(f"{entry.path}: {target} is a folder, expected the file")
    if target.exists():
        problem = _check(target, entry)
        if problem is None:
            log.debug("%s is present and valid", target)
            return FetchedFile(entry.path, target, "present", entry.size)
        log.warning("%s is damaged (%s); fetching it again", target, problem)
        target.unlink()

    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    bar = _Progress(entry.path, entry.size, show)
    try:
        for attempt in (1, 2):
            resumed = source.obtain(entry, part, bar)
            problem = _check(part, entry)
            if problem is None:
                break
            part.unlink(missing_ok=True)
            if not resumed or attempt == 2:
                raise FetchError(f"{entry.path} from {source.description}: {problem}")
            log.warning(
                "%s: %s after a resumed download; downloading it again from the start", entry.path, problem
            )
        _fsync(part)
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    log.debug("%s verified and stored as %s", entry.path, target)
    return FetchedFile(entry.path, target, "fetched", entry.size)


def _check(path: Path, entry: ManifestFile) -> str | None:
    """None if ``path`` matches the manifest entry, else what is wrong with it."""
    size = path.stat().st_size
    if size != entry.size:
        kind = "truncated" if size < entry.size else "too large"
        return f"{kind}: {size} bytes, expected {entry.size}"
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != entry.sha256:
        return f"sha256 mismatch: got {digest.hexdigest()}, expected {entry.sha256}"
    return None


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------------------------------
# Sources


def _make_source(
    source: str | None, manifest: Manifest, *, retries: int, timeout: float, backoff: float
) -> _Source:
    if source is None or source.startswith(("http://", "https://")):
        base = modelscope_endpoint() if source is None else source

        def obtain_http(entry: ManifestFile, part: Path, bar: _Progress) -> bool:
            url = file_url(base, manifest.repository, manifest.revision, entry.path)
            return _download(url, entry, part, bar, retries=retries, timeout=timeout, backoff=backoff)

        return _Source(base, obtain_http)

    if source.startswith("file://"):
        root = Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path))
    else:
        root = Path(source).expanduser()
    if not root.is_dir():
        raise FetchError(f"model source {source} is neither an http(s) URL nor an existing folder")

    def obtain_local(entry: ManifestFile, part: Path, bar: _Progress) -> bool:
        _copy(root, entry, part, bar)
        return False

    return _Source(str(root), obtain_local)


def _copy(root: Path, entry: ManifestFile, part: Path, bar: _Progress) -> None:
    src = root / entry.path
    if not src.is_file():
        raise FileMissing(f"{entry.path}: not found in the model mirror {root}")
    size = src.stat().st_size
    if size != entry.size:
        raise FetchError(f"{entry.path} in the model mirror {root}: {size} bytes, expected {entry.size}")
    done = 0
    with open(src, "rb") as fin, open(part, "wb") as fout:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            done += len(chunk)
            bar.update(done)


class _Retry(Exception):
    """A transfer attempt failed in a way that another attempt may fix."""


def _download(
    url: str, entry: ManifestFile, part: Path, bar: _Progress, *, retries: int, timeout: float, backoff: float
) -> bool:
    """Download ``url`` into ``part`` until it holds ``entry.size`` bytes; True if a transfer was resumed."""
    failures = 0
    resumed = False
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > entry.size:
            part.unlink()
            have = 0
        if have == entry.size:
            return resumed
        resumed = resumed or have > 0
        try:
            _get_once(url, entry, part, have, bar, timeout)
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise FileMissing(f"{entry.path}: not found at {url} (HTTP {exc.code})") from exc
            if exc.code == 416:  # our Range no longer fits the file: start over
                part.unlink(missing_ok=True)
                reason = "HTTP 416 for a resumed download"
            elif exc.code in (408, 429) or exc.code >= 500:
                reason = f"HTTP {exc.code} {exc.reason}"
            else:
                raise FetchError(f"{entry.path}: HTTP {exc.code} {exc.reason} from {url}") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError | socket.gaierror):
                host = urllib.parse.urlsplit(url).netloc
                raise Unreachable(f"{entry.path}: cannot connect to {host}: {_reason(exc.reason)}") from exc
            reason = str(exc.reason)
        except (_Retry, http.client.HTTPException, OSError) as exc:  # timeouts, resets, short bodies
            reason = str(exc) or type(exc).__name__
        else:
            now = part.stat().st_size if part.exists() else 0
            if now < entry.size:
                # the server sent everything it has: the file there is short, retrying will not help
                raise FetchError(f"{entry.path} from {url}: truncated: {now} bytes, expected {entry.size}")
            continue

        now = part.stat().st_size if part.exists() else 0
        failures = 0 if now > have else failures + 1  # an attempt that made progress is not a failure
        if failures > retries:
            raise Unreachable(f"{entry.path}: download from {url} failed after {retries} retries: {reason}")
        if failures:
            delay = min(backoff * 2 ** (failures - 1), MAX_BACKOFF)
            log.warning(
                "%s: %s; retry %d of %d in %.2f s (have %d of %d bytes)",
                entry.path,
                reason,
                failures,
                retries,
                delay,
                now,
                entry.size,
            )
            time.sleep(delay)
        else:
            log.warning("%s: %s; resuming at byte %d of %d", entry.path, reason, now, entry.size)


def _reason(exc: OSError) -> str:
    """``Connection refused`` rather than ``[Errno 111] Connection refused``."""
    return exc.strerror or str(exc) or type(exc).__name__


def _get_once(url: str, entry: ManifestFile, part: Path, have: int, bar: _Progress, timeout: float) -> None:
    """One GET, writing to ``part`` from byte ``have``; returns when the server has sent its whole body."""
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        length_header = resp.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if resp.status == 206:
            content_range = (resp.headers.get("Content-Range") or "").strip()
            match = _CONTENT_RANGE.fullmatch(content_range)
            if match is None or int(match.group(1)) != have:
                raise _Retry(f"unexpected Content-Range {content_range!r} for byte {have}")
            total = match.group(3)
            if total != "*" and int(total) != entry.size:
                raise FetchError(f"{entry.path} at {url}: {total} bytes there, expected {entry.size}")
            start = have
        else:
            if have:
                log.debug("%s: server ignored the Range request; downloading from the start", entry.path)
            start = 0
            if length is not None and length != entry.size:
                kind = "truncated" if length < entry.size else "too large"
                raise FetchError(
                    f"{entry.path} at {url}: {kind}: {length} bytes there, expected {entry.size}"
                )
        with open(part, "r+b" if start else "wb") as fh:
            fh.seek(start)
            fh.truncate()
            received = _copy_body(resp, fh, entry.size - start, start, bar)
        if received > entry.size - start:
            raise FetchError(f"{entry.path} at {url}: too large: more than {entry.size} bytes")
        if length is not None and received < length:
            raise _Retry(f"connection closed after {received} of {length} bytes")


def _copy_body(resp: IO[bytes], fh: IO[bytes], limit: int, offset: int, bar: _Progress) -> int:
    """Copy at most ``limit`` + 1 bytes of the body (one more reveals an oversized file); return the count."""
    received = 0
    while received <= limit:
        chunk = resp.read(min(CHUNK, limit + 1 - received))
        if not chunk:
            break
        fh.write(chunk)
        received += len(chunk)
        bar.update(offset + received)
    return received
