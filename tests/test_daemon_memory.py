"""The daemon's resident memory: the start-up check of the model file runs in a forked child, so the ``onnx``
package it needs (about 20 MiB once imported) never stays in ``kwsd run``; the check's answers are unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

CODE = """
import sys
from pathlib import Path
from kwsd.settings import ConfigError, DetectorSettings, KeywordSettings, ModelSettings, check_model
model = ModelSettings(path=Path(sys.argv[1]))
check_model(model, DetectorSettings())
print("fine", "onnx" in sys.modules)
for detector, path in ((DetectorSettings(keywords=(KeywordSettings(phrase="\\u00e9\\u00e9"),)), model.path),
                       (DetectorSettings(), Path(sys.argv[2]))):
    try:
        check_model(ModelSettings(path=path), detector)
    except ConfigError as exc:
        print("refused", exc.key, "onnx" in sys.modules)
"""


def test_the_model_check_answers_without_onnx_in_the_process(model_path: Path, tmp_path: Path) -> None:
    not_onnx = tmp_path / "config.yaml"
    not_onnx.write_text("not a model\n")
    out = subprocess.run([sys.executable, "-c", CODE, str(model_path), str(not_onnx)], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == [
        "fine False", "refused detector.keywords[0].phrase False", "refused model.path False"]


def test_with_other_threads_the_check_runs_in_process(model_path: Path) -> None:
    code = ("import sys, threading; from pathlib import Path; from kwsd.settings import *\n"
            "e = threading.Event(); t = threading.Thread(target=e.wait); t.start()\n"
            "check_model(ModelSettings(path=Path(sys.argv[1])), DetectorSettings()); e.set()\n"
            "print('onnx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(model_path)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert (out.returncode, out.stdout.strip()) == (0, "True"), out.stderr
