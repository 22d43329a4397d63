"""kwsd model fetch: the real download code against a local ModelScope-like server and the real mirror."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kwsd.__main__ import main
from kwsd.model.fetch import FetchError, Unreachable, fetch_files, fetch_model, file_url
from kwsd.model.manifest import Manifest, ManifestError, load_manifest, parse_manifest
from tests.fixtures_fetch import STALL_S, ModelServer, build_mirror, closed_port
from tests.recordings import MANIFEST as RECORDINGS_MANIFEST
from tests.recordings import fetch_recordings
from tests.recordings import main as recordings_main

MANIFEST = load_manifest()
EXAMPLE = "example/kws_xiaoyunxiaoyun.wav"
RECORDINGS = load_manifest(RECORDINGS_MANIFEST)
REQUIRED = sorted(f.path for f in MANIFEST.files if f.required)
FAST: dict[str, Any] = {"backoff": 0.01, "timeout": 5.0}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_only_verified(dest: Path, manifest: Manifest = MANIFEST) -> list[str]:
    """Every file under ``dest`` is a manifest file with the right size and digest; return their paths."""
    found = []
    for path in sorted(p for p in dest.rglob("*") if p.is_file()):
        rel = path.relative_to(dest).as_posix()
        listed = {f.path: f for f in manifest.files}
        assert rel in listed, f"unexpected file left under dest: {rel}"
        assert path.stat().st_size == listed[rel].size, rel
        assert sha256(path) == listed[rel].sha256, rel
        found.append(rel)
    return found


# --- manifest -----------------------------------------------------------------------------------------------


def test_manifest_pins_upstream_and_matches_the_mirror(model_mirror: Path) -> None:
    assert MANIFEST.repository == "iic/speech_charctc_kws_phone-xiaoyun"
    assert MANIFEST.revision == "3336a553f221e4de6976a3905a1b39da440085ff"
    optional = sorted(f.path for f in MANIFEST.files if not f.required and not f.if_present)
    assert [f.path for f in MANIFEST.files if f.if_present] == ["example/kws_xiaoyunxiaoyun.wav"]
    assert optional == [
        "finetune_avg_10.pt",
        "funasr/basetrain_fsmn_4e_l10r2_250_128_fdim80_t2599.pt",
        "funasr/finetune_fsmn_4e_l10r2_250_128_fdim80_t2599_xiaoyun_xiaoyun.pt",
    ]
    assert len(REQUIRED) == 10 and "kwsr.net" in REQUIRED and "funasr/tokens_2599.txt" in REQUIRED
    for entry in MANIFEST.select():
        path = model_mirror / entry.path
        if entry.if_present and not path.exists():
            continue  # scripts/setup used a source without the example recording
        assert (path.stat().st_size, sha256(path)) == (entry.size, entry.sha256), entry.path


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d.update(extra=1), "extra: unknown key"),
        (lambda d: d["files"][1].update(sha256="ABC"), "files[1].sha256"),
        (lambda d: d["files"][2].update(path="../etc/passwd"), "files[2].path"),
        (lambda d: d["files"][3].update(path="/abs"), "files[3].path"),
        (lambda d: d["files"][4].update(path=d["files"][0]["path"]), "files[4].path"),
        (lambda d: d["files"][0].update(size=-1), "files[0].size"),
        (lambda d: d["files"][0].update(required="yes"), "files[0].required"),
        (lambda d: d.update(repository="noslash"), "repository"),
        (lambda d: d["files"][0].update(local="../x"), "files[0].local"),
        (lambda d: d["files"][1].update(local=d["files"][0]["path"]), "files[1].local: README.md is stored twice"),
    ],
)
def test_invalid_manifest_names_the_key(change: Callable[[dict[str, Any]], None], key: str) -> None:
    data = json.loads((Path(__file__).parent.parent / "models" / "manifest.json").read_text())
    change(data)
    with pytest.raises(ManifestError, match=r"test\.json: " + re.escape(key)):
        parse_manifest(data, source="test.json")


def test_download_url_has_modelscope_layout() -> None:
    url = file_url("https://www.modelscope.cn/", "iic/x", "v1.0", "funasr/a b.txt")
    assert url == "https://www.modelscope.cn/api/v1/models/iic/x/repo?Revision=v1.0&FilePath=funasr%2Fa+b.txt"


# --- sources ------------------------------------------------------------------------------------------------


def test_http_fetch_gets_every_required_file(
    model_server: ModelServer, bare_mirror: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "upstream"
    result = fetch_model(dest, model_server.url, **FAST)
    assert sorted(result) == REQUIRED
    for rel, local in result.items():
        assert local == dest / rel
        assert local.read_bytes() == (bare_mirror / rel).read_bytes()
    assert assert_only_verified(dest) == REQUIRED
    # one plain GET per file, in ModelScope's URL layout with the pinned revision
    # the example recording is asked for too; this server lacks it (404), which is no error
    served = [r for r in model_server.requests if r.file_path != "example/kws_xiaoyunxiaoyun.wav"]
    assert sorted(r.file_path for r in served) == REQUIRED
    assert all(r.status == 200 and r.range is None for r in served)
    assert [r.status for r in model_server.requests_for("example/kws_xiaoyunxiaoyun.wav")] == [404]
    tokens = model_server.requests_for("funasr/tokens_2599.txt")[0]
    assert tokens.raw_path == (
        f"/api/v1/models/iic/speech_charctc_kws_phone-xiaoyun/repo?Revision={MANIFEST.revision}"
        "&FilePath=funasr%2Ftokens_2599.txt"
    )


@pytest.mark.parametrize("as_url", [False, True])
def test_local_folder_source(bare_mirror: Path, tmp_path: Path, as_url: bool) -> None:
    source = bare_mirror.as_uri() if as_url else str(bare_mirror)
    result = fetch_model(tmp_path / "up", source)
    assert sorted(result) == REQUIRED
    assert assert_only_verified(tmp_path / "up") == REQUIRED


def test_source_that_is_neither_url_nor_folder(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="nowhere"):
        fetch_model(tmp_path / "up", str(tmp_path / "nowhere"))


def test_checkpoints_only_on_request(bare_mirror: Path, tmp_path: Path) -> None:
    dest = tmp_path / "up"
    fetch_model(dest, str(bare_mirror))  # the mirror has no checkpoints: fine unless asked for
    with pytest.raises(FetchError, match=r"finetune_avg_10\.pt: not found in the model mirror"):
        fetch_model(dest, str(bare_mirror), include_checkpoints=True)
    assert assert_only_verified(dest) == REQUIRED


# --- idempotence --------------------------------------------------------------------------------------------


def test_present_files_are_not_downloaded_again(model_server: ModelServer, tmp_path: Path) -> None:
    dest = tmp_path / "up"
    fetch_model(dest, model_server.url, **FAST)
    stamps = {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()}
    model_server.requests.clear()

    again = fetch_files(dest, model_server.url, **FAST)
    assert {r.path: r.status for r in again} == {**dict.fromkeys(REQUIRED, "present"), EXAMPLE: "skipped"}
    # every required file is in place: the source is not contacted, not even for the example it lacks
    assert model_server.requests == []
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()} == stamps

    # a damaged copy is replaced, and only that one is fetched; the source is asked for the example again
    (dest / "kwsr.mvn").write_bytes(b"garbage")
    third = fetch_files(dest, model_server.url, **FAST)
    assert [r.path for r in third if r.status == "fetched"] == ["kwsr.mvn"]
    assert [r.status for r in third if r.path == EXAMPLE] == ["absent"]
    assert [r.file_path for r in model_server.requests] == ["kwsr.mvn", "example/kws_xiaoyunxiaoyun.wav"]
    assert assert_only_verified(dest) == REQUIRED


# --- failures leave nothing unverified ----------------------------------------------------------------------


def test_digest_mismatch(model_server: ModelServer, tmp_path: Path) -> None:
    model_server.faults["kwsr.cfg"] = "corrupt"
    with pytest.raises(FetchError, match=r"kwsr\.cfg from http://127\.0\.0\.1:\d+: sha256 mismatch"):
        fetch_model(tmp_path / "up", model_server.url, **FAST)
    found = assert_only_verified(tmp_path / "up")
    assert "kwsr.cfg" not in found and "README.md" in found  # files before it stay, verified


def test_short_file(model_server: ModelServer, tmp_path: Path) -> None:
    model_server.faults["kwsr.net"] = "short"
    expected = r"kwsr\.net at http://\S+: truncated: 1513192 bytes there, expected 3026385"
    with pytest.raises(FetchError, match=expected):
        fetch_model(tmp_path / "up", model_server.url, **FAST)
    assert "kwsr.net" not in assert_only_verified(tmp_path / "up")
    assert len(model_server.requests_for("kwsr.net")) == 1  # a short file is not retried


def test_connection_cut_every_time(model_server: ModelServer, tmp_path: Path) -> None:
    """Fewer bytes than Content-Length, on every attempt: retried with backoff, then a FetchError."""
    model_server.faults["kwsr.net"] = "cut"
    expected = r"kwsr\.net: download from \S+ failed after 2 retries: connection closed"
    with pytest.raises(FetchError, match=expected):
        fetch_model(tmp_path / "up", model_server.url, retries=2, **FAST)
    assert "kwsr.net" not in assert_only_verified(tmp_path / "up")
    # first attempt made progress (not a failure); three more without progress exhaust 2 retries
    assert len(model_server.requests_for("kwsr.net")) == 4


def test_missing_file(model_server: ModelServer, tmp_path: Path) -> None:
    model_server.faults["keywords.json"] = "missing"
    with pytest.raises(FetchError, match=r"keywords\.json: not found at \S+ \(HTTP 404\)"):
        fetch_model(tmp_path / "up", model_server.url, **FAST)
    assert "keywords.json" not in assert_only_verified(tmp_path / "up")
    assert len(model_server.requests_for("keywords.json")) == 1  # a 404 is final


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("missing", r"kwsr\.net: not found in the model mirror \S+mirror"),
        ("short", r"kwsr\.net in the model mirror \S+mirror: 1000 bytes, expected 3026385"),
    ],
)
def test_missing_or_short_in_mirror_folder(
    model_mirror: Path, tmp_path: Path, damage: str, expected: str
) -> None:
    partial = tmp_path / "mirror"
    for entry in MANIFEST.select():
        if entry.if_present:
            continue
        (partial / entry.path).parent.mkdir(parents=True, exist_ok=True)
        data = (model_mirror / entry.path).read_bytes()
        if entry.path != "kwsr.net":
            (partial / entry.path).write_bytes(data)
        elif damage == "short":
            (partial / entry.path).write_bytes(data[:1000])
    with pytest.raises(FetchError, match=expected):
        fetch_model(tmp_path / "up", str(partial))
    assert "kwsr.net" not in assert_only_verified(tmp_path / "up")


def test_stalled_server_times_out(model_server: ModelServer, tmp_path: Path) -> None:
    model_server.faults["config.yaml"] = "stall"
    start = time.monotonic()
    expected = r"config\.yaml: download from \S+ failed after 1 retries: .*timed out"
    with pytest.raises(FetchError, match=expected):
        fetch_model(tmp_path / "up", model_server.url, retries=1, backoff=0.01, timeout=0.2)
    assert time.monotonic() - start < 2 * STALL_S
    assert "config.yaml" not in assert_only_verified(tmp_path / "up")


def test_failure_of_an_existing_damaged_file_removes_it(model_server: ModelServer, tmp_path: Path) -> None:
    dest = tmp_path / "up"
    fetch_model(dest, model_server.url, **FAST)
    (dest / "kwsr.cfg").write_bytes(b"edited")
    model_server.faults["kwsr.cfg"] = "corrupt"
    with pytest.raises(FetchError, match=r"kwsr\.cfg"):
        fetch_model(dest, model_server.url, **FAST)
    assert "kwsr.cfg" not in assert_only_verified(dest)


# --- recovery -----------------------------------------------------------------------------------------------


def test_dropped_connection_resumes_with_range(model_server: ModelServer, tmp_path: Path) -> None:
    model_server.faults["kwsr.net"] = "drop_once"
    fetch_model(tmp_path / "up", model_server.url, **FAST)
    assert assert_only_verified(tmp_path / "up") == REQUIRED
    first, second = model_server.requests_for("kwsr.net")
    sent = 3026385 * 2 // 5
    assert (first.range, first.status) == (None, 200)
    assert (second.range, second.status) == (f"bytes={sent}-", 206)


def test_server_ignoring_range_restarts_the_file(model_server: ModelServer, tmp_path: Path) -> None:
    model_server.faults["kwsr.net"] = "drop_once_no_range"
    fetch_model(tmp_path / "up", model_server.url, **FAST)
    assert assert_only_verified(tmp_path / "up") == REQUIRED
    first, second = model_server.requests_for("kwsr.net")
    assert first.range is None and second.range is not None and second.status == 200


def test_server_error_is_retried(model_server: ModelServer, tmp_path: Path) -> None:
    model_server.faults["configuration.json"] = "error_once"
    fetch_model(tmp_path / "up", model_server.url, **FAST)
    assert [r.status for r in model_server.requests_for("configuration.json")] == [503, 200]
    assert assert_only_verified(tmp_path / "up") == REQUIRED


def test_stale_part_file_is_resumed_and_redone_if_bad(model_server: ModelServer, tmp_path: Path) -> None:
    """A .part left by a killed run is resumed; when the result fails its check, it is fetched afresh."""
    dest = tmp_path / "up"
    dest.mkdir()
    (dest / "kwsr.net.part").write_bytes(b"\0" * 1000)
    fetch_model(dest, model_server.url, **FAST)
    assert assert_only_verified(dest) == REQUIRED
    assert [r.range for r in model_server.requests_for("kwsr.net")] == ["bytes=1000-", None]


# --- progress and command line ------------------------------------------------------------------------------


def test_progress_bar_only_on_request_or_terminal(
    model_server: ModelServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fetch_model(tmp_path / "a", model_server.url, progress=True, **FAST)
    err = capsys.readouterr().err
    assert "kwsr.net" in err and "100.0%" in err
    fetch_model(tmp_path / "b", model_server.url, **FAST)  # auto: captured stderr is not a terminal
    assert capsys.readouterr().err == ""


def test_cli_fetch_twice(bare_mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a terminal: one line per file on stdout, nothing on stderr; the example's line says what it is for."""
    dest = tmp_path / "up"
    argv = ["model", "fetch", "--source", str(bare_mirror), "--dest", str(dest)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 11 and all(line.startswith("fetched ") for line in lines[:10]) and err == ""
    assert any(line.split()[1] == "kwsr.net" for line in lines)
    assert lines[10] == (f"not in source    {EXAMPLE} (optional; only a new export needs it: KWSD_MODEL_EXAMPLE)")
    assert main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 11 and all(line.startswith("already present ") for line in lines[:10]) and err == ""
    assert lines[10] == f"not fetched      {EXAMPLE} (optional; every required file is present)"


def test_cli_fetch_with_the_example(full_mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "fetch", "--source", str(full_mirror), "--dest", str(tmp_path / "up")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 11 and all(line.startswith("fetched ") for line in lines)
    assert lines[-1] == f"fetched          {EXAMPLE} (144968 bytes)"


def test_refused_connection_fails_at_once(tmp_path: Path) -> None:
    """Default retries and backoff (31 s of retrying) do not apply to a connection that is refused."""
    port = closed_port()
    start = time.monotonic()
    with pytest.raises(Unreachable, match=rf"README\.md: cannot connect to 127\.0\.0\.1:{port}: Connection refused"):
        fetch_model(tmp_path / "up", f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 2.0
    assert not (tmp_path / "up").exists() or assert_only_verified(tmp_path / "up") == []


def test_cli_failed_download_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default source (ModelScope, here a domain that refuses) fails in two lines naming the fix."""
    monkeypatch.delenv("KWSD_MODEL_SOURCE", raising=False)
    port = closed_port()
    monkeypatch.setenv("MODELSCOPE_DOMAIN", f"127.0.0.1:{port}")
    start = time.monotonic()
    assert main(["model", "fetch", "--dest", str(tmp_path / "up")]) == 1
    assert time.monotonic() - start < 2.0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"kwsd model fetch: error: README.md: cannot connect to 127.0.0.1:{port}: Connection refused",
        "kwsd model fetch: hosts without access to it: set KWSD_MODEL_SOURCE=/path/to/mirror (a copy of the "
        "upstream model repository, same relative paths) or pass --source",
    ]


def test_cli_retries_exhausted_say_what_to_do(
    model_server: ModelServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_server.faults["kwsr.cfg"] = "stall"
    argv = ["model", "fetch", "--source", model_server.url, "--dest", str(tmp_path / "up"),
            "--retries", "1", "--timeout", "0.2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "kwsd model fetch: error: kwsr.cfg: download from http://127.0.0.1:" in err
    assert "failed after 1 retries" in err and "set KWSD_MODEL_SOURCE=/path/to/mirror" in err


def test_cli_source_from_env_and_failure_exit(
    model_server: ModelServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KWSD_MODEL_SOURCE", model_server.url)
    model_server.faults["kwsr.mvn"] = "missing"
    assert main(["model", "fetch", "--dest", str(tmp_path / "up")]) == 1
    captured = capsys.readouterr()
    assert "kwsd model fetch: error: kwsr.mvn: not found at http://127.0.0.1:" in captured.err
    assert "kwsr.mvn" not in captured.out
    assert model_server.requests  # the environment's source was used
    assert "kwsr.mvn" not in assert_only_verified(tmp_path / "up")


def test_if_present_file_fetched_when_the_source_has_it(
    bare_mirror: Path, full_mirror: Path, model_mirror: Path, tmp_path: Path
) -> None:
    """The example recording is fetched and verified when the mirror has it, skipped when it does not."""
    assert "example/kws_xiaoyunxiaoyun.wav" not in fetch_model(tmp_path / "a", str(bare_mirror))
    got = fetch_model(tmp_path / "b", str(full_mirror))
    assert sorted(got) == sorted([*REQUIRED, "example/kws_xiaoyunxiaoyun.wav"])
    assert assert_only_verified(tmp_path / "b") == sorted(got)
    damaged = build_mirror(tmp_path / "damaged", model_mirror, full_mirror / "example/kws_xiaoyunxiaoyun.wav")
    (damaged / "example/kws_xiaoyunxiaoyun.wav").write_bytes(b"RIFF" + bytes(144964))
    with pytest.raises(FetchError, match=r"example/kws_xiaoyunxiaoyun\.wav"):
        fetch_model(tmp_path / "c", str(damaged))


# --- the test recordings ------------------------------------------------------------------------------------


def recordings_mirror(root: Path, audio_dir: Path, model_mirror: Path) -> Path:
    """A mirror laid out like the upstream repository, with its test recordings (taken from ``audio_dir``)."""
    build_mirror(root, model_mirror)
    for entry in RECORDINGS.files:
        (root / entry.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(audio_dir / entry.local_path, root / entry.path)
    return root


def test_recordings_manifest_lists_the_test_recordings(audio_dir: Path) -> None:
    """Every recording the tests use is pinned, and the pins match the folder the tests read."""
    assert RECORDINGS.repository == MANIFEST.repository and RECORDINGS.revision == MANIFEST.revision
    listed = {f.local_path: f for f in RECORDINGS.files}
    on_disk = sorted(p.relative_to(audio_dir).as_posix() for p in audio_dir.glob("*/*.wav"))
    assert sorted(listed) == on_disk
    for rel, entry in listed.items():
        assert ((audio_dir / rel).stat().st_size, sha256(audio_dir / rel)) == (entry.size, entry.sha256), rel
        folder = "example/" if rel == "positive/kws_xiaoyunxiaoyun.wav" else "unittest/example_kws/wav/"
        assert entry.path == folder + rel.split("/")[1]


def test_recordings_fetched_over_http_and_laid_out_for_the_tests(
    model_server: ModelServer, audio_dir: Path, model_mirror: Path, tmp_path: Path
) -> None:
    model_server.root = recordings_mirror(tmp_path / "upstream", audio_dir, model_mirror)
    dest = tmp_path / "recordings"
    files = fetch_recordings(dest, model_server.url, **FAST)
    assert len(files) == len(RECORDINGS.files) == 59
    for entry in RECORDINGS.files:
        assert (dest / entry.local_path).read_bytes() == (audio_dir / entry.local_path).read_bytes()
    assert {r.status for r in model_server.requests} == {200}
    with open(dest / "index.tsv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert len(rows) == 59
    assert all(r["label"] == r["path"].split("/")[0] for r in rows)
    assert {r["transcript"] for r in rows if r["label"] == "positive"} == {"小云小云"}
    # the second run verifies what is there and downloads nothing
    model_server.requests.clear()
    fetch_recordings(dest, model_server.url, **FAST)
    assert model_server.requests == []


def test_recordings_missing_from_the_source_say_what_to_do(
    full_mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror of the model files only (no unittest/ folder): one message naming the file and KWSD_TEST_AUDIO."""
    monkeypatch.setenv("KWSD_MODEL_SOURCE", str(full_mirror))
    assert recordings_main([str(tmp_path / "rec")]) == 1
    err = capsys.readouterr().err
    assert f"cannot fetch the test recordings from {full_mirror}: unittest/example_kws/wav/" in err
    assert "not found in the model mirror" in err and "set KWSD_TEST_AUDIO" in err
    assert "Traceback" not in err
