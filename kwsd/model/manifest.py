"""The upstream model manifest (``models/manifest.json``): which files kwsd needs, from where, their digests.

The manifest pins one upstream revision; every file fetched from anywhere (ModelScope, an HTTP mirror, a local
copy) is checked against its size and sha256 here, so a file that differs from the pinned revision never
reaches the exporter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.json"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class ManifestError(ValueError):
    """The manifest file is unreadable or invalid; the message names the file and the key."""


@dataclass(frozen=True)
class ManifestFile:
    path: str
    """Path inside the upstream repository, ``/``-separated (``funasr/tokens_2599.txt``)."""
    size: int
    """Exact size in bytes."""
    sha256: str
    """Lower-case hex sha256 of the content."""
    required: bool = True
    """Fetched by default; optional files (the PyTorch checkpoints) only on request."""
    if_present: bool = False
    """Fetched by default, but a source without it is no error (the example recording; mirrors may lack it)."""
    local: str = ""
    """Where the file is stored under the destination folder, ``/``-separated; empty: the upstream ``path``."""

    @property
    def local_path(self) -> str:
        """The path under the destination folder: ``local``, else the upstream ``path``."""
        return self.local or self.path


@dataclass(frozen=True)
class Manifest:
    repository: str
    """Upstream model id on ModelScope (``owner/name``)."""
    revision: str
    """Pinned upstream revision (commit id)."""
    files: tuple[ManifestFile, ...]
    """Every file kwsd may fetch, required ones first as listed."""
    license: str = ""
    """Licence of the upstream files (SPDX id)."""

    def select(self, include_optional: bool = False) -> tuple[ManifestFile, ...]:
        """The files to fetch: the required ones, plus the optional ones when asked."""
        return tuple(f for f in self.files if f.required or f.if_present or include_optional)

    def file(self, path: str) -> ManifestFile:
        """The entry for upstream ``path``; KeyError naming the path if it is not listed."""
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(f"{path} is not in the model manifest")


_TOP_KEYS = {"repository", "revision", "license", "files"}
_FILE_KEYS = {"path", "size", "sha256", "required", "if_present", "local"}


def load_manifest(path: str | Path | None = None) -> Manifest:
    """Read and validate a manifest (default ``models/manifest.json`` of this checkout)."""
    path = Path(path) if path is not None else DEFAULT_MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"cannot read model manifest {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"model manifest {path} is not valid JSON: {exc}") from exc
    return parse_manifest(data, source=str(path))


def parse_manifest(data: Any, source: str = "<manifest>") -> Manifest:
    """Validate plain JSON data as a manifest; errors name ``source`` and the key path."""

    def fail(key: str, problem: str) -> ManifestError:
        return ManifestError(f"{source}: {key}: {problem}")

    if not isinstance(data, dict):
        raise fail("(top)", "expected an object")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise fail(unknown[0], "unknown key")
    repository = data.get("repository")
    if not isinstance(repository, str) or not _REPO_ID.fullmatch(repository):
        raise fail("repository", f"expected 'owner/name', got {repository!r}")
    revision = data.get("revision")
    if not isinstance(revision, str) or not revision or revision != revision.strip():
        raise fail("revision", f"expected a non-empty revision, got {revision!r}")
    license_ = data.get("license", "")
    if not isinstance(license_, str):
        raise fail("license", f"expected a string, got {license_!r}")
    raw_files = data.get("files")
    if not isinstance(raw_files, list) or not raw_files:
        raise fail("files", "expected a non-empty list")

    files: list[ManifestFile] = []
    seen: set[str] = set()
    stored: set[str] = set()
    for i, item in enumerate(raw_files):
        key = f"files[{i}]"
        if not isinstance(item, dict):
            raise fail(key, "expected an object")
        unknown = sorted(set(item) - _FILE_KEYS)
        if unknown:
            raise fail(f"{key}.{unknown[0]}", "unknown key")
        rel = item.get("path")
        if not isinstance(rel, str) or not _safe_relative(rel):
            raise fail(f"{key}.path", f"expected a relative '/'-separated path, got {rel!r}")
        if rel in seen:
            raise fail(f"{key}.path", f"{rel} is listed twice")
        seen.add(rel)
        size = item.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise fail(f"{key}.size", f"expected a byte count, got {size!r}")
        digest = item.get("sha256")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise fail(f"{key}.sha256", f"expected 64 lower-case hex digits, got {digest!r}")
        required = item.get("required", True)
        if not isinstance(required, bool):
            raise fail(f"{key}.required", f"expected true or false, got {required!r}")
        if_present = item.get("if_present", False)
        if not isinstance(if_present, bool):
            raise fail(f"{key}.if_present", f"expected true or false, got {if_present!r}")
        local = item.get("local", "")
        if not isinstance(local, str) or (local and not _safe_relative(local)):
            raise fail(f"{key}.local", f"expected a relative '/'-separated path, got {local!r}")
        if (local or rel) in stored:
            raise fail(f"{key}.local", f"{local or rel} is stored twice")
        stored.add(local or rel)
        files.append(ManifestFile(path=rel, size=size, sha256=digest, required=required, if_present=if_present,
                                  local=local))
    return Manifest(repository=repository, revision=revision, files=tuple(files), license=license_)


def _safe_relative(rel: str) -> bool:
    """True for a plain relative path that cannot escape the destination folder."""
    if not rel or "\\" in rel or rel.startswith("/"):
        return False
    parts = PurePosixPath(rel).parts
    return all(p not in ("", ".", "..") for p in parts) and "/".join(parts) == rel
