"""The nnet1 parser on the real weights, and the verified streaming ONNX export."""

from __future__ import annotations

import logging
import shutil
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from kwsd.audio.wavfile import read_wav
from kwsd.kws.contract import ModelContract
from kwsd.kws.features import FeatureStream, offline_features
from kwsd.kws.session import ModelError, ModelSession
from kwsd.model.export import ExportError, export_model, greedy_text
from kwsd.model.nnet1 import Nnet1Error, count_params, read_cmvn, read_nnet
from kwsd.model.reference import forward

LAYOUT = (
    ["AffineTransform", "AffineTransform", "RectifiedLinear"]
    + ["LinearTransform", "Fsmn", "AffineTransform", "RectifiedLinear"] * 4
    + ["AffineTransform", "AffineTransform", "Softmax"]
)


@pytest.fixture(scope="module")
def net(model_mirror: Path):
    return read_nnet(model_mirror / "kwsr.net")


@pytest.fixture(scope="module")
def cmvn(model_mirror: Path):
    return read_cmvn(model_mirror / "funasr/am.mvn.dim80_l2r2")


@pytest.fixture(scope="module")
def example(audio_dir: Path) -> np.ndarray:
    return read_wav(audio_dir / "positive/kws_xiaoyunxiaoyun.wav")


def test_parser_reads_the_real_network(net) -> None:
    assert [c.kind for c in net] == LAYOUT
    assert count_params(net) == 756_133
    dims = [(c.input_dim, c.output_dim) for c in net if c.kind in ("AffineTransform", "LinearTransform")]
    assert dims[:2] == [(400, 140), (140, 250)] and dims[-2:] == [(250, 140), (140, 2599)]
    fsmn = [c for c in net if c.kind == "Fsmn"]
    assert all(c.options["LOrder"] == 10 and c.options["ROrder"] == 2 for c in fsmn)
    assert all(c.params["l_filter"].shape == (10, 128) and c.params["r_filter"].shape == (2, 128) for c in fsmn)


def test_cmvn_files_agree(model_mirror: Path, cmvn) -> None:
    shift, scale = cmvn
    assert shift.shape == scale.shape == (400,)
    s2, c2 = read_cmvn(model_mirror / "kwsr.mvn")
    np.testing.assert_array_equal(shift, s2)
    np.testing.assert_array_equal(scale, c2)


def _copy_with(src: Path, dst: Path, data: bytes) -> Path:
    dst.write_bytes(data)
    return dst


@pytest.mark.parametrize("cut", [3, 100, 493_950, 1_500_000, 3_026_380])
def test_truncated_weights_are_an_error(model_mirror: Path, tmp_path: Path, cut: int) -> None:
    data = (model_mirror / "kwsr.net").read_bytes()[:cut]
    with pytest.raises(Nnet1Error, match=r"kwsr\.net: .*(truncated|expected)"):
        read_nnet(_copy_with(model_mirror / "kwsr.net", tmp_path / "kwsr.net", data))


def test_unknown_component_is_named(model_mirror: Path, tmp_path: Path) -> None:
    data = (model_mirror / "kwsr.net").read_bytes().replace(b"<Softmax>", b"<Sigmoid>")
    with pytest.raises(Nnet1Error, match=r"unknown component <Sigmoid>"):
        read_nnet(_copy_with(model_mirror / "kwsr.net", tmp_path / "kwsr.net", data))


def test_shape_mismatch_is_an_error(model_mirror: Path, tmp_path: Path) -> None:
    data = bytearray((model_mirror / "kwsr.net").read_bytes())
    # The second AffineTransform declares input dim 140; claim 141 and the chain check must object.
    pos = data.index(b"<AffineTransform>", 20) + len(b"<AffineTransform> ") + 5
    assert struct.unpack("<i", data[pos + 1 : pos + 5])[0] == 140
    data[pos + 1 : pos + 5] = struct.pack("<i", 141)
    with pytest.raises(Nnet1Error, match=r"weight has shape \(250, 140\), expected \(250, 141\)"):
        read_nnet(_copy_with(model_mirror / "kwsr.net", tmp_path / "kwsr.net", bytes(data)))


def test_nan_weights_are_an_error(model_mirror: Path, tmp_path: Path) -> None:
    data = bytearray((model_mirror / "kwsr.net").read_bytes())
    pos = data.index(b"FM ") + 3 + 10
    data[pos : pos + 4] = struct.pack("<f", float("nan"))
    with pytest.raises(Nnet1Error, match="NaN"):
        read_nnet(_copy_with(model_mirror / "kwsr.net", tmp_path / "kwsr.net", bytes(data)))


def test_reference_forward_reads_the_keyword(net, cmvn, example, model_mirror: Path) -> None:
    tokens = (model_mirror / "funasr/tokens_2599.txt").read_text(encoding="utf-8").split("\n")
    probs = forward(net, offline_features(example), *cmvn)
    assert "小云小云" in greedy_text(probs, tuple(tokens))


def test_features_do_not_depend_on_chunking(example) -> None:
    whole = offline_features(example)
    assert whole.shape == (151, 400)
    for block in (1, 160, 479, 4000):
        stream = FeatureStream()
        parts = [stream.accept(example[i : i + block]) for i in range(0, example.size, block)]
        np.testing.assert_array_equal(np.concatenate([*parts, stream.flush()]), whole)


def _upstream_copy(model_mirror: Path, tmp_path: Path) -> Path:
    up = tmp_path / "upstream"
    for rel in ("kwsr.net", "funasr/am.mvn.dim80_l2r2", "funasr/tokens_2599.txt"):
        (up / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(model_mirror / rel, up / rel)
    return up


def test_export_verifies_and_states_its_contract(model_mirror: Path, audio_dir: Path, tmp_path: Path,
                                                net, cmvn, example) -> None:
    out = tmp_path / "m.onnx"
    report = export_model(_upstream_copy(model_mirror, tmp_path), out, audio_dir / "positive/kws_xiaoyunxiaoyun.wav")
    assert out.is_file() and not out.with_name("m.onnx.tmp").exists()
    assert report.max_abs_diff < 1e-4 and report.chunk_max_diff < 1e-5 and "小云小云" in report.greedy_text
    assert report.params == 756_133

    session = ModelSession(out, providers=["CPUExecutionProvider"])
    c = session.contract
    assert session.provider == "CPUExecutionProvider"
    assert c.cache_shape == (4, 128, 11) and c.delay_frames == 8 and len(c.tokens) == 2599
    assert c.tokens[1462] == "小" and c.tokens[976] == "云" and c.blank_id == 0

    # independent check on another real recording: streaming ONNX vs float64 numpy, aligned by the look-ahead
    feats = offline_features(read_wav(next((audio_dir / "positive").glob("*_sox_1.wav"))))
    probs, _ = session.run(feats[None], session.new_cache(1))
    ref = forward(net, feats, *cmvn)
    np.testing.assert_allclose(probs[0, 44 + 8 :], ref[44 : feats.shape[0] - 8], atol=1e-4)

    # batch of streams with different histories == each stream alone
    a, b = feats[:60], feats[60:120]
    both, cache = session.run(np.stack([a, b]), session.new_cache(2))
    alone_b, cache_b = session.run(b[None], session.new_cache(1))
    np.testing.assert_allclose(both[1], alone_b[0], atol=1e-5)
    np.testing.assert_allclose(cache[1], cache_b[0], atol=1e-5)


def test_export_refuses_weights_that_do_not_read_the_keyword(model_mirror: Path, audio_dir: Path,
                                                             tmp_path: Path) -> None:
    up = _upstream_copy(model_mirror, tmp_path)
    data = bytearray((up / "kwsr.net").read_bytes())
    # Swap the output rows of 云 and its neighbour: a well-formed file that no longer spots the keyword.
    start = data.index(b"<AffineTransform>", 1_560_000)
    pos = data.index(b"FM ", start) + 3 + 10
    w = np.frombuffer(bytes(data[pos : pos + 2599 * 140 * 4]), dtype="<f4").reshape(2599, 140).copy()
    w[[976, 977]] = w[[977, 976]]
    data[pos : pos + w.nbytes] = w.astype("<f4").tobytes()
    (up / "kwsr.net").write_bytes(bytes(data))
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="greedy decoding of the example recording reads"):
        export_model(up, out, audio_dir / "positive/kws_xiaoyunxiaoyun.wav")
    assert not out.exists() and not out.with_name("m.onnx.tmp").exists()


def test_export_names_a_missing_file(model_mirror: Path, audio_dir: Path, tmp_path: Path) -> None:
    up = _upstream_copy(model_mirror, tmp_path)
    (up / "funasr/tokens_2599.txt").unlink()
    with pytest.raises(ExportError, match=r"tokens_2599\.txt"):
        export_model(up, tmp_path / "m.onnx", audio_dir / "positive/kws_xiaoyunxiaoyun.wav")


def test_session_rejects_a_model_without_contract(tmp_path: Path, model_path: Path) -> None:
    import onnx

    m = onnx.load(str(model_path))
    del m.metadata_props[:]
    onnx.save(m, str(tmp_path / "bare.onnx"))
    with pytest.raises(ModelError, match=r"kwsd\.format"):
        ModelSession(tmp_path / "bare.onnx", providers=["CPUExecutionProvider"])
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r"junk\.onnx"):
        ModelSession(tmp_path / "junk.onnx", providers=["CPUExecutionProvider"])


def test_cuda_requested_without_gpu_falls_back_to_cpu(model_path: Path) -> None:
    session = ModelSession(model_path)  # default: CUDA, then CPU
    assert session.provider == "CPUExecutionProvider"
    assert isinstance(ModelContract.from_metadata(
        ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        .get_modelmeta().custom_metadata_map), ModelContract)


def test_export_without_the_example_says_what_to_do(
    model_mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kwsd.__main__ import main

    up = _upstream_copy(model_mirror, tmp_path)
    out = tmp_path / "m.onnx"
    assert main(["model", "export", "--upstream", str(up), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"kwsd model export: error: {up} lacks example/kws_xiaoyunxiaoyun.wav (its source had none): the export "
        "plays the model card's example recording example/kws_xiaoyunxiaoyun.wav through the model to verify "
        "it; give it with --example FILE (scripts/setup: KWSD_MODEL_EXAMPLE=/path/to/kws_xiaoyunxiaoyun.wav)\n"
    )
    assert main(["model", "export", "--upstream", str(up), "--output", str(out), "--example", "nowhere.wav"]) == 1
    assert capsys.readouterr().err.startswith("kwsd model export: error: nowhere.wav does not exist: the export")
    assert not out.exists()


def test_export_if_outdated_redoes_a_model_of_an_older_graph_or_other_weights(
    model_mirror: Path, audio_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import onnx

    from kwsd.__main__ import main

    up = _upstream_copy(model_mirror, tmp_path)
    out = tmp_path / "m.onnx"
    args = ["model", "export", "--if-outdated", "--upstream", str(up), "--output", str(out),
            "--example", str(audio_dir / "positive/kws_xiaoyunxiaoyun.wav")]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith(f"exporting: {out} does not exist\nexported {out}:")
    written = out.stat().st_mtime_ns
    assert main(args) == 0
    assert capsys.readouterr().out == f"{out} is up to date\n"
    assert out.stat().st_mtime_ns == written

    # A model an earlier kwsd wrote (its exporter metadata names another graph) is exported anew.
    m = onnx.load(str(out))
    for prop in m.metadata_props:
        if prop.key == "kwsd.exporter":
            prop.value = "kwsd 0.1.0"
    onnx.save(m, str(out))
    with caplog.at_level(logging.WARNING, logger="kwsd"):
        ModelSession(out, providers=["CPUExecutionProvider"])  # still runs, and says how to renew it
    assert any("was exported by 'kwsd 0.1.0', not by this kwsd's exporter" in r.getMessage()
               and "scripts/setup" in r.getMessage() for r in caplog.records)
    assert main(args) == 0
    assert "was written by 'kwsd 0.1.0'; this kwsd writes 'kwsd graph" in capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out.endswith("is up to date\n")

    # Other weights in the upstream folder: exported anew; a damaged file likewise.
    with open(up / "kwsr.net", "ab") as f:
        f.write(b"\0")
    assert "exported from other weights than" in _outdated_reason(up, out)
    out.write_bytes(b"not a model")
    assert "cannot be read as a kwsd model" in _outdated_reason(up, out)


def _outdated_reason(up: Path, out: Path) -> str:
    from kwsd.model.export import outdated

    reason = outdated(up, out)
    assert reason is not None
    return reason
