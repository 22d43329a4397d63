"""The command line as a new user meets it: help texts, -v anywhere, the model found from any folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kwsd.__main__ import build_parser, subcommands
from kwsd.kws.session import gpu_present
from kwsd.model.locate import MODEL_NAME, default_model, model_candidates
from tests.conftest import REPO

EXAMPLE = "positive/kws_xiaoyunxiaoyun.wav"


def kwsd(*args: str, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """``kwsd ARGS`` as the installed entry point runs it, from ``cwd``, without this test run's variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KWSD_")}
    entry = Path(sys.prefix) / "bin" / "kwsd"
    return subprocess.run([str(entry), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**clean, **env})


def test_every_subcommand_help_has_a_description() -> None:
    parser = build_parser()
    names = []
    for command in subcommands(parser):
        names.append(command.prog)
        assert command.description and len(command.description) > 40, f"{command.prog} --help has no description"
        assert "-v, --verbose" in command.format_help(), command.prog
    assert {"kwsd run", "kwsd check-config", "kwsd detect", "kwsd eval", "kwsd devices", "kwsd model",
            "kwsd model fetch", "kwsd model export"} <= set(names)


@pytest.mark.parametrize(("argv", "verbose"), [
    (["run"], False), (["-v", "run"], True), (["run", "-v"], True), (["run", "--verbose", "--config", "x"], True),
    (["-v", "model", "fetch"], True), (["model", "fetch", "-v"], True), (["detect", "a.wav", "-v"], True),
])
def test_verbose_before_or_after_the_command(argv: list[str], verbose: bool) -> None:
    assert build_parser().parse_args(argv).verbose is verbose


def test_run_v_logs_at_debug(model_path: Path, audio_dir: Path, tmp_path: Path) -> None:
    """``kwsd run -v``: the daemon's own DEBUG lines appear (a replay input, a broker that is not there)."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(model_path)},
        "inputs": [{"device": str(audio_dir / EXAMPLE), "sites": {0: "desk"}}],
        "mqtt": {"host": "127.0.0.1", "port": 9, "reconnect_min": 0.2},
        "service": {"state_dir": str(tmp_path / "state")},
    }))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KWSD_", "NOTIFY_SOCKET", "JOURNAL"))}
    log = tmp_path / "log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(Path(sys.prefix) / "bin" / "kwsd"), "run", "-v", "--config", str(config)],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path, env=clean)
        try:
            deadline = time.monotonic() + 60
            while "heard 小云小云" not in log.read_text(errors="replace") and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert " DEBUG   kwsd.mqtt." in text
    assert " DEBUG   kwsd.kws.decoder: keyword 小云小云 hit" in text


def test_detect_from_another_folder(audio_dir: Path, tmp_path: Path) -> None:
    """No --model, no config, not in the checkout: the checkout's model is found; a relative file works."""
    shutil.copy(audio_dir / EXAMPLE, tmp_path / "x.wav")
    r = kwsd("detect", "x.wav", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('{"file": "x.wav", "keyword": "小云小云"')
    if not gpu_present():
        assert "CUDA" not in r.stderr  # a host with no GPU at all expects to run on the CPU
    assert r.stderr == ""


def test_model_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    installed, checkout = tmp_path / "opt", tmp_path / "checkout"
    config = tmp_path / "etc" / "config.yaml"
    config.parent.mkdir()
    config.write_text("model:\n  path: models/site.onnx\n")
    places = {"system_config": config, "installed": installed, "checkout": checkout}
    assert model_candidates(**places) == [tmp_path / "models" / MODEL_NAME, config.parent / "models/site.onnx",
                                          installed / MODEL_NAME, checkout / MODEL_NAME]
    assert default_model(**places) == checkout / MODEL_NAME  # none exists: the checkout's, named in the error
    for path in reversed(model_candidates(**places)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"onnx")
        assert default_model(**places) == path  # each earlier place wins over the later ones
    config.write_text("model: [not, a, mapping]\n")  # an installed config that does not load is passed over
    assert default_model(**places) == tmp_path / "models" / MODEL_NAME
    (tmp_path / "models" / MODEL_NAME).unlink()
    assert default_model(**places) == installed / MODEL_NAME


def test_plot_without_matplotlib_fails_before_the_model_pass(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['matplotlib'] = None; from kwsd.__main__ import main; "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run(
        [sys.executable, "-c", code, "eval", "--model", str(tmp_path / "none.onnx"), "--positive", str(tmp_path),
         "--negative", str(tmp_path), "--plot", str(tmp_path / "det.png")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == (
        "kwsd eval: error: argument --plot: matplotlib is not installed: pip install 'kwsd[plot]'")


def _detect_lines(*args: str, cwd: Path) -> tuple[int, list[str], str]:
    r = kwsd("detect", *args, cwd=cwd)
    return r.returncode, r.stdout.splitlines(), r.stderr


def test_detect_on_many_files_is_each_file_alone(positives: list[Path], negatives: list[Path],
                                                 model_path: Path, tmp_path: Path) -> None:
    """Recordings decoded side by side give, file by file and in the order given, what each gives alone."""
    # Long and short recordings mixed, so the threads finish them out of order.
    files = [*positives[:6], *negatives[:4], *positives[-3:]]
    alone = []
    for f in files:
        code, lines, err = _detect_lines("--model", str(model_path), "--jobs", "1", str(f), cwd=tmp_path)
        assert code == 0 and err == "", err
        assert all(json.loads(line)["file"] == str(f) for line in lines)
        alone.extend(lines)
    assert sum(json.loads(line)["keyword"] == "小云小云" for line in alone) >= 8  # the positives are heard
    for jobs in ("2", "3", "13"):
        code, lines, err = _detect_lines("--model", str(model_path), "--jobs", jobs, *map(str, files), cwd=tmp_path)
        assert code == 0 and err == "", err
        assert lines == alone, f"--jobs {jobs}"
    code, lines, err = _detect_lines("--model", str(model_path), *map(str, files), cwd=tmp_path)  # default jobs
    assert (code, lines, err) == (0, alone, "")


def test_detect_skips_a_bad_file_among_good_ones(positives: list[Path], model_path: Path, tmp_path: Path) -> None:
    """An unreadable file is named in one line and skipped; the others' detections come as before; status 1."""
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio\n" * 50)
    missing = tmp_path / "gone.wav"
    good = positives[:3]
    _, expected, _ = _detect_lines("--model", str(model_path), *map(str, good), cwd=tmp_path)
    assert len(expected) >= 3
    files = [good[0], bad, good[1], missing, good[2]]
    code, lines, err = _detect_lines("--model", str(model_path), "--jobs", "2", *map(str, files), cwd=tmp_path)
    assert code == 1
    assert lines == expected
    assert "Traceback" not in err
    assert err.splitlines() == [
        f"ERROR kwsd.kws.cli: {bad}: cannot read audio: not an audio file libsndfile knows (WAV, FLAC, OGG, MP3, "
        "AIFF, ...)",
        f"ERROR kwsd.kws.cli: {missing}: no such file",
    ]


def test_detect_jobs_must_be_a_positive_number(tmp_path: Path) -> None:
    r = kwsd("detect", "--jobs", "0", "x.wav", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == "kwsd detect: error: argument --jobs: '0' is not a whole number of at least 1"


def test_detect_into_a_closed_pipe_ends_quietly(positives: list[Path], model_path: Path, tmp_path: Path) -> None:
    """``kwsd detect ... | head -1``: the reader leaves after one line; kwsd ends without a traceback."""
    entry = Path(sys.prefix) / "bin" / "kwsd"
    cmd = f"{entry} detect --model {model_path} {' '.join(map(str, positives))} | head -1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.stdout.count("\n") == 1 and '"keyword": "小云小云"' in r.stdout
    assert r.stderr == ""
    assert r.returncode == 1


def test_an_internal_fault_is_one_line_not_a_traceback(positives: list[Path], model_path: Path,
                                                        tmp_path: Path) -> None:
    """A fault of kwsd itself (here a detector step that raises) ends the command with status 70 and one line naming
    the command and the error; -v adds the traceback."""
    script = ("import sys; import kwsd.kws.detector as d; d.Detector.step = lambda self: 1 / 0; "
              "from kwsd.__main__ import entry; sys.argv = ['kwsd', *sys.argv[1:]]; entry()")
    base = [sys.executable, "-c", script, "detect", "--model", str(model_path), str(positives[0])]
    r = subprocess.run(base, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 70, r.stderr
    assert "Traceback" not in r.stderr
    assert "detect: internal error: ZeroDivisionError: division by zero" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    verbose = subprocess.run([*base[:3], "-v", *base[3:]], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert verbose.returncode == 70 and "Traceback" in verbose.stderr


def test_eval_result_does_not_depend_on_jobs(positives: list[Path], negatives: list[Path], model_path: Path,
                                             tmp_path: Path) -> None:
    """``kwsd eval`` decodes recordings side by side: the tables, the misses and the unreadable files (in order)
    are those of one recording at a time."""
    pos, neg = tmp_path / "pos", tmp_path / "neg"
    pos.mkdir()
    neg.mkdir()
    for p in positives[:5]:
        (pos / p.name).write_bytes(p.read_bytes())
    for p in negatives[:6]:
        (neg / p.name).write_bytes(p.read_bytes())
    (pos / "0-broken.wav").write_bytes(b"RIFF....WAVEjunk")
    (neg / "zz-empty.wav").write_bytes(b"")
    runs = {}
    for jobs in ("1", "3"):
        r = kwsd("eval", "--model", str(model_path), "--json", "--jobs", jobs, "--positive", str(pos),
                 "--negative", str(neg), cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
        runs[jobs] = r.stdout
    assert runs["1"] == runs["3"]
    out = json.loads(runs["1"])
    assert [u["file"] for u in out["unreadable"]] == [str(pos / "0-broken.wav"), str(neg / "zz-empty.wav")]
    assert out["negative_files"] == 6 and out["keywords"][0]["positives"] == 5


def test_detect_ctrl_c_ends_quietly(positives: list[Path], negatives: list[Path], model_path: Path,
                                    tmp_path: Path) -> None:
    """Ctrl-C while recordings are decoded on several threads: the threads stop, status 130, no traceback."""
    files = [*positives, *negatives] * 6
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KWSD_")}
    proc = subprocess.Popen([str(Path(sys.prefix) / "bin" / "kwsd"), "detect", "--model", str(model_path),
                             "--jobs", "2", *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=clean)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # decoding has begun
    assert '"keyword": "小云小云"' in first
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert len(rest.splitlines()) < 25 * 6 // 2  # it stopped early: the files hold 25 detections, 6 times
    assert err == ""


def _imported(*argv: str, cwd: Path) -> set[str]:
    """The modules ``kwsd ARGV`` imports (``-X importtime``), after checking that it succeeded."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KWSD_")}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "kwsd", *argv], capture_output=True, text=True,
                       timeout=120, cwd=cwd, env=clean)
    assert r.returncode == 0, r.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}


def test_start_up_imports_only_what_the_command_uses(positives: list[Path], model_path: Path,
                                                    tmp_path: Path) -> None:
    """``kwsd --help`` loads no numerics; ``kwsd detect`` none of what only other commands need (YAML, TLS,
    the onnx package and its ml_dtypes, scipy, package metadata, the evaluation engine)."""
    assert not {"numpy", "onnxruntime", "soundfile", "yaml", "ssl"} & _imported("--help", cwd=tmp_path)
    detect = _imported("detect", "--model", str(model_path), str(positives[0]), cwd=tmp_path)
    assert {"numpy", "onnxruntime", "soundfile", "kwsd.kws.detector"} <= detect
    unused = {"yaml", "ssl", "socket", "onnx", "ml_dtypes", "scipy", "importlib.metadata", "kwsd.kws.evaluation",
              "matplotlib", "paho", "kwsd.supervisor"}
    assert not unused & detect
