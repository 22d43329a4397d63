"""Execution providers: the provider in use is reported; a GPU host missing CUDA libraries is told which one; a
host without a GPU hears nothing about CUDA. The GPU itself is the one part faked, at ``gpu_count``."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kwsd.kws import session as session_module
from kwsd.kws.session import CPU, CUDA, ModelSession, cuda_load_error, describe_runtime, runtime_build
from kwsd.metrics import Metrics
from tests.conftest import REPO

MISSING_LIBRARY = re.compile(r"lib[\w.+-]+\.so[\d.]*: cannot open shared object file")


def test_host_without_gpu_runs_on_cpu_and_says_nothing(model_path: Path, caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    assert session_module.gpu_count() == 0  # this machine: no NVIDIA driver
    with caplog.at_level(logging.DEBUG, logger="kwsd"):
        session = ModelSession(model_path)  # default providers: CUDA, then CPU
    assert session.provider == CPU
    assert session.provider_note == "no NVIDIA GPU found"
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
    assert session.describe().startswith("CPUExecutionProvider (onnxruntime")


def test_detect_prints_only_results_on_a_host_without_gpu(model_path: Path, positives: list[Path]) -> None:
    r = subprocess.run([sys.executable, "-m", "kwsd", "detect", "--model", str(model_path), str(positives[0])],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert [json.loads(line)["keyword"] for line in r.stdout.splitlines()] == ["小云小云"]


def test_cuda_load_error_names_the_missing_library() -> None:
    """The real loader on this host: the CUDA provider cannot load (no CUDA runtime), and the reason names a file."""
    reason = cuda_load_error()
    assert reason is not None and MISSING_LIBRARY.search(reason), reason


def test_gpu_host_without_cuda_runtime_warns_and_falls_back(model_path: Path, caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "gpu_count", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="kwsd"):
        session = ModelSession(model_path, providers=[CUDA, CPU])
    assert session.provider == CPU
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    msg = warnings[0]
    assert "CUDA was requested (model.providers) and 2 GPU(s) are present" in msg
    assert re.search(r"running on CPU(ExecutionProvider)?$", msg), msg
    _, cuda_version = runtime_build()
    if cuda_version:  # onnxruntime-gpu: the library the provider lacks is named, and what brings it
        assert MISSING_LIBRARY.search(msg), msg
        assert "scripts/setup --gpu" in msg or ("libcuda.so" in msg and "install the NVIDIA driver" in msg), msg
    else:  # the CPU runtime on a GPU host
        assert "has no CUDA provider" in msg and "scripts/setup --gpu" in msg, msg
    assert session.provider_note and session.provider_note in msg
    assert session.provider_note in session.describe()


def test_both_runtimes_in_one_environment_are_named(model_path: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A second onnxruntime distribution on the path (as ``pip install onnxruntime`` into a GPU env leaves)."""
    _, cuda_version = runtime_build()
    other = "onnxruntime" if cuda_version else "onnxruntime-gpu"
    info = tmp_path / f"{other.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {other}\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert session_module.both_runtimes_installed()
    with caplog.at_level(logging.WARNING, logger="kwsd"):
        ModelSession(model_path)
    assert any("onnxruntime and onnxruntime-gpu are both installed" in r.getMessage() for r in caplog.records)


def test_provider_in_devices_line_and_metrics(model_path: Path, tmp_path: Path) -> None:
    assert describe_runtime(model_path, [CUDA, CPU]).startswith("CPUExecutionProvider (")
    missing = describe_runtime(tmp_path / "none.onnx", [CUDA, CPU])
    assert missing.startswith("unknown (model file") and "none.onnx" in missing and "0 NVIDIA GPU(s)" in missing
    metrics = Metrics()
    metrics.set_provider(CUDA)
    metrics.set_provider(CPU)  # a reload onto another provider replaces the series
    assert [(s.labels, s.value) for f in metrics.registry.collect() for s in f.samples
            if s.name == "kwsd_execution_provider"] == [({"provider": CPU}, 1.0)]
