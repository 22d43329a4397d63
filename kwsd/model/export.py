"""Export the parsed nnet1 keyword spotter to a streaming ONNX, and refuse to install it unless it is verified.

Graph: ``feats [B, T, 400]`` (spliced, un-normalised fbank), per Fsmn layer ``cache<i> [B, 128, 11]``, and the
output layer's selection (``need``, ``columns``, ``log_floor``) in; ``rows``, ``starts`` and ``probs [M, 2599]``
(the posteriors of the frames the selection computed, see ``_head``) and ``cache_out<i>`` out. CMVN is folded into
the first affine layer. Each Fsmn
layer concatenates its cached past frames with the new ones and runs a depthwise filter (a grouped Conv) whose taps
are the left filter, the identity and the right filter; its output for a frame is therefore produced ROrder frames
later (8 frames over four layers: the model's look-ahead), and any chunking of the input with the caches carried
gives the same outputs.

Verification, before the file is moved into place: the ONNX must agree with the independent numpy forward pass
(``reference.py``) to 1e-4 on real features, chunks of 1, 7 and 50 frames must equal one call over the whole input,
and greedy CTC decoding of the model card's example recording must read 小云小云.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kwsd import __version__
from kwsd.audio.wavfile import AudioFileError, read_wav
from kwsd.kws.contract import (
    EXPORTER,
    INPUT_COLUMNS,
    INPUT_FEATS,
    INPUT_LOG_FLOOR,
    INPUT_NEED,
    OUTPUT_PROBS,
    OUTPUT_ROWS,
    OUTPUT_STARTS,
    ModelContract,
    cache_input,
    cache_inputs,
    cache_output,
    cache_outputs,
    full_head_inputs,
)
from kwsd.kws.decoder import KeywordError, load_tokens
from kwsd.kws.features import FeatureConfig, offline_features
from kwsd.model import example_hint
from kwsd.model.nnet1 import Component, read_cmvn, read_nnet
from kwsd.model.reference import forward

log = logging.getLogger(__name__)

NET_FILE = "kwsr.net"
CMVN_FILE = "funasr/am.mvn.dim80_l2r2"
TOKENS_FILE = "funasr/tokens_2599.txt"
EXAMPLE_FILE = "example/kws_xiaoyunxiaoyun.wav"
SOURCE_REPO = "iic/speech_charctc_kws_phone-xiaoyun"
EXPECTED_TEXT = "小云小云"
TOLERANCE = 1e-4
CHUNKS = (1, 7, 50)
OPSET = 17


class ExportError(RuntimeError):
    """The export failed or did not verify; no model file was installed."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    size_bytes: int
    params: int
    seconds: float
    max_abs_diff: float
    compared_frames: int
    chunk_max_diff: float
    greedy_text: str
    ms_per_frame_cpu: float


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Graph


def _fsmn_kernel(comp: Component) -> np.ndarray:
    """Depthwise taps [dim, 1, K] over the window ``t-(LOrder-1)*ls .. t+ROrder*rs``, identity included."""
    lo, ro = int(comp.options["LOrder"]), int(comp.options["ROrder"])
    ls, rs = int(comp.options["LStride"]), int(comp.options["RStride"])
    past, future = (lo - 1) * ls, ro * rs
    dim = comp.input_dim
    taps = np.zeros((past + future + 1, dim), dtype=np.float64)
    for i in range(lo):
        taps[past - i * ls] += comp.params["l_filter"][i]
    taps[past] += 1.0
    for j in range(1, ro + 1):
        taps[past + j * rs] += comp.params["r_filter"][j - 1]
    return taps.T[:, None, :].astype(np.float32)


def fsmn_context(comp: Component) -> tuple[int, int]:
    """(past frames, future frames) one Fsmn layer needs around each frame."""
    return (int(comp.options["LOrder"]) - 1) * int(comp.options["LStride"]), int(comp.options["ROrder"]) * int(
        comp.options["RStride"]
    )


def _head(node: Any, const: Any, hidden: str, last: tuple[str, str], weight: str, frames: str) -> str:
    """The output layer, run only on the frames that need it; returns its logits ``[M, tokens]``.

    The softmax of token k is at most ``exp(z_k - z_blank)`` (the normaliser is at least the blank's term), so the
    logits of the few ``columns`` (blank first, then the keywords' tokens) bound every keyword token's posterior
    exactly: in a frame whose every bound stays below ``exp(log_floor)`` no keyword token is above the floor, and in
    most frames (blank dominates even in speech) the 2599-wide product and its softmax are not computed at all.

    Row b is computed from its first frame whose bound reaches the floor to its last frame, or whole when
    ``need[b]`` is set. Before that frame its decoders' searches are collapsed (else ``need`` is set) and see no
    keyword token, so those frames change nothing; from it on a search may hold a prefix that a blank-only frame
    changes, and every frame is computed. Outputs: ``rows`` [N] the rows computed (ascending), ``starts`` [N] the
    first frame computed of each; the logits are those rows' frames ``starts .. T-1`` one after the other.
    """
    # The layer before the output layer is linear, so the bounds' logits come straight from ``hidden``, through
    # that layer's weights times the output weights of the few columns (a [dim, R] product per call): the layer
    # itself runs only on the frames computed.
    last_w, last_b = last
    columns = node("Gather", [weight, INPUT_COLUMNS], axis=1)  # [141, R]
    z = node("Add", [node("MatMul", [hidden, node("MatMul", [last_w, columns])]),
                     node("MatMul", [last_b, columns])])  # [B, T, R]
    one = const("one", np.array([1], dtype=np.int64))
    axis = const("axis", np.array([2], dtype=np.int64))
    blank = node("Slice", [z, const("zero", np.array([0], dtype=np.int64)), one, axis])
    tokens = node("Slice", [z, one, const("end", np.array([np.iinfo(np.int64).max], dtype=np.int64)), axis])
    bound = node("ReduceMax", [node("Sub", [tokens, blank])], axes=[2], keepdims=0)  # [B, T]
    reached = node("Cast", [node("GreaterOrEqual", [bound, INPUT_LOG_FLOOR])], to=TensorProto.INT32)
    since = node("Greater", [node("CumSum", [reached, const("time_axis", np.array(1, dtype=np.int32))]),
                             const("none", np.array(0, dtype=np.int32))])  # [B, T]: from the first frame on
    chosen = node("Or", [since, node("Unsqueeze", [INPUT_NEED, one])])  # [B, T]
    counts = node("ReduceSum", [node("Cast", [chosen], to=TensorProto.INT64), one], keepdims=0)  # [B]
    rows = node("Squeeze", [node("NonZero", [counts]), const("axis", np.array([0], dtype=np.int64))],
                output=OUTPUT_ROWS)
    node("Sub", [frames, node("Gather", [counts, rows], axis=0)], output=OUTPUT_STARTS)
    picked = node("Transpose", [node("NonZero", [chosen])], perm=[1, 0])  # [M, 2]: (row, frame), row-major
    x = node("Add", [node("MatMul", [node("GatherND", [hidden, picked]), last_w]), last_b])
    return node("MatMul", [x, weight])


def build_model(components: list[Component], shift: np.ndarray, scale: np.ndarray, contract: ModelContract
                ) -> onnx.ModelProto:
    fsmn = [c for c in components if c.kind == "Fsmn"]
    if not fsmn:
        raise ExportError("the network has no Fsmn layer: not the FSMN-CTC keyword spotter")
    contexts = {fsmn_context(c) for c in fsmn}
    dims = {c.input_dim for c in fsmn}
    if len(contexts) != 1 or len(dims) != 1:
        raise ExportError("Fsmn layers differ in width or context; one cache tensor cannot hold them")
    (past, future), dim = contexts.pop(), dims.pop()
    cache_frames = past + future
    if components[0].kind != "AffineTransform" or components[0].input_dim != shift.size:
        raise ExportError(f"CMVN has {shift.size} dims but the network starts with <{components[0].kind}> "
                          f"of input {components[0].input_dim}")
    if components[-1].kind != "Softmax":
        raise ExportError("the network does not end in <Softmax>")
    head = len(components) - 2  # the output layer: run on the frames that need it, its bias an input column
    if head < 1 or components[head].kind != "AffineTransform" or components[head - 1].kind != "AffineTransform":
        raise ExportError("the network does not end in two affine layers and a softmax: no output layer to run "
                          "on the rows that need it")

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    counter = iter(range(10_000))

    def name(prefix: str) -> str:
        return f"{prefix}_{next(counter)}"

    def const(prefix: str, value: np.ndarray) -> str:
        n = name(prefix)
        inits.append(numpy_helper.from_array(np.array(value, order="C"), n))
        return n

    def node(op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        out = output or name(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def _slice(t: str, start: int, end: int | None, axis: int = 1, output: str | None = None) -> str:
        """``t[..., start:end]`` along ``axis``."""
        stop = np.iinfo(np.int64).max if end is None else end
        return node("Slice", [t, const("start", np.array([start], dtype=np.int64)),
                              const("end", np.array([stop], dtype=np.int64)),
                              const("axis", np.array([axis], dtype=np.int64))], output)

    def _shape(*dims: int) -> str:
        """``[B, T, *dims]``, with the batch and time of this call's features."""
        return node("Concat", [batch_time, const("dims", np.array(dims, dtype=np.int64))], axis=0)

    # The affine layers see every frame of the batch as one row of a 2-D matrix: onnxruntime then fuses each
    # MatMul with its bias Add (and a following Relu) into one Gemm, where [B, T, dim] inputs keep them apart
    # (a pass over the layer's output per operator). The Fsmn filters and the output layer see [B, T, dim].
    batch_time = _slice(node("Shape", [INPUT_FEATS]), 0, 2, axis=0)
    x = node("Reshape", [INPUT_FEATS, const("rows", np.array([-1, components[0].input_dim], dtype=np.int64))])
    layer = 0
    last: tuple[str, str] = ("", "")  # the weights and bias of the layer before the output layer
    for i, comp in enumerate(components):
        if comp.kind == "AffineTransform":
            w = comp.params["weight"].astype(np.float64)
            b = comp.params["bias"].astype(np.float64)
            if i == 0:  # fold (x + shift) * scale into the first affine layer
                b = b + w @ (shift.astype(np.float64) * scale)
                w = w * scale.astype(np.float64)[None, :]
            if i == head - 1:
                # The output layer (the widest) takes its bias as one more input column: this layer's output gets
                # a constant 1 (a zero weight row, a bias of 1), the output weights the bias as their last column.
                # It spares an addition pass over every frame's 2599 outputs.
                w = np.concatenate([w, np.zeros((1, w.shape[1]))])
                b = np.concatenate([b, [1.0]])
                last = (const("w", w.T.astype(np.float32)), const("b", b[None].astype(np.float32)))
                continue  # run inside the output layer's selection, on the frames computed
            elif i == head:
                w = np.concatenate([w, b[:, None]], axis=1)
                x = _head(node, const, node("Reshape", [x, _shape(components[i - 1].input_dim)]), last,
                          const("w", w.T.astype(np.float32)), _slice(batch_time, 1, 2, axis=0))
                continue
            x = node("MatMul", [x, const("w", w.T.astype(np.float32))])
            x = node("Add", [x, const("b", b.astype(np.float32))])
        elif comp.kind == "LinearTransform":
            x = node("MatMul", [x, const("w", comp.params["weight"].T.copy())])
        elif comp.kind == "RectifiedLinear":
            x = node("Relu", [x])
        elif comp.kind == "Fsmn":
            taps = _fsmn_kernel(comp)  # [dim, 1, K]
            cache = cache_input(layer)  # [B, dim, cache]
            x = node("Reshape", [x, _shape(dim)])
            y = node("Concat", [cache, node("Transpose", [x], perm=[0, 2, 1])], axis=2)  # [B, dim, cache + T]
            # The layer's new cache is a graph output of its own (one tensor for all layers cost a split of the
            # input and a concatenation of the outputs: two more copies of every stream's whole cache per call).
            _slice(y, -cache_frames, None, axis=2, output=cache_output(layer))
            # The depthwise filter as a 2-D grouped Conv over [B, dim, 1, cache + T]: onnxruntime runs 2-D
            # depthwise convolutions in its blocked (NCHWc) kernels, where a 1-D grouped Conv runs one tiny
            # matrix product per stream and channel and per-tap multiply-adds cost more in per-node overhead.
            image = node("Unsqueeze", [y, const("axis", np.array([2], dtype=np.int64))])
            conv = node("Conv", [image, const("taps", taps[:, :, None, :].copy())], group=int(taps.shape[0]),
                        kernel_shape=[1, int(taps.shape[2])])
            x = node("Transpose", [node("Squeeze", [conv, const("axis", np.array([2], dtype=np.int64))])],
                     perm=[0, 2, 1])
            x = node("Reshape", [x, const("rows", np.array([-1, dim], dtype=np.int64))])
            layer += 1
        elif comp.kind == "Softmax":
            x = node("Softmax", [x], axis=-1)
        else:
            raise ExportError(f"component <{comp.kind}> has no ONNX mapping")
    nodes.append(helper.make_node("Identity", [x], [OUTPUT_PROBS], name="probs"))

    n_tokens = components[-1].output_dim
    graph = helper.make_graph(
        nodes,
        "kwsd_fsmn_ctc_stream",
        inputs=[
            helper.make_tensor_value_info(INPUT_FEATS, TensorProto.FLOAT, ["batch", "time", components[0].input_dim]),
            *(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", dim, cache_frames])
              for n in cache_inputs(layer)),
            helper.make_tensor_value_info(INPUT_NEED, TensorProto.BOOL, ["batch"]),
            helper.make_tensor_value_info(INPUT_COLUMNS, TensorProto.INT64, ["columns"]),
            helper.make_tensor_value_info(INPUT_LOG_FLOOR, TensorProto.FLOAT, []),
        ],
        outputs=[
            helper.make_tensor_value_info(OUTPUT_ROWS, TensorProto.INT64, ["rows"]),
            helper.make_tensor_value_info(OUTPUT_STARTS, TensorProto.INT64, ["rows"]),
            helper.make_tensor_value_info(OUTPUT_PROBS, TensorProto.FLOAT, ["frames", n_tokens]),
            *(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", dim, cache_frames])
              for n in cache_outputs(layer)),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="kwsd",
                              producer_version=__version__)
    model.ir_version = 8
    model.doc_string = (f"FSMN-CTC keyword spotter {contract.source}, streaming: feats [B,T,400] + cache -> "
                        f"token posteriors [B,T,{n_tokens}] delayed by {contract.delay_frames} frames + cache")
    helper.set_model_props(model, contract.to_metadata())
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Verification


def _run_stream(session: Any, feats: np.ndarray, cache_shape: tuple[int, ...], chunk: int | None) -> np.ndarray:
    layers = cache_shape[0]
    caches = [np.zeros((1, *cache_shape[1:]), dtype=np.float32) for _ in range(layers)]
    step = chunk or feats.shape[0]
    outs = []
    for start in range(0, feats.shape[0], step):
        feed = {INPUT_FEATS: feats[None, start : start + step], **dict(zip(cache_inputs(layers), caches, strict=True)),
                **full_head_inputs(1)}
        probs, *caches = session.run([OUTPUT_PROBS, *cache_outputs(layers)], feed)
        outs.append(probs)  # one row, every frame: [T, tokens]
    return np.concatenate(outs)


def greedy_text(probs: np.ndarray, tokens: tuple[str, ...], blank: int = 0) -> str:
    best = probs.argmax(axis=1)
    keep = [int(k) for i, k in enumerate(best) if k != blank and (i == 0 or best[i - 1] != k)]
    return "".join(tokens[k] for k in keep)


def verify(path: Path, components: list[Component], shift: np.ndarray, scale: np.ndarray,
           contract: ModelContract, example: np.ndarray) -> tuple[float, int, float, str, float]:
    """Check the ONNX file; returns (max diff vs numpy, frames compared, chunk diff, greedy text, ms/frame)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feats = offline_features(example, contract.features)
    whole = _run_stream(session, feats, contract.cache_shape, None)

    # Streaming output t is reference frame t - delay. The first frames after a cold start differ slightly
    # (deeper layers see the look-ahead outputs of earlier layers where the offline pass sees padding), so the
    # comparison starts once every layer's window lies inside the utterance.
    ref = forward(components, feats, shift, scale)
    delay = contract.delay_frames
    warmup = sum(fsmn_context(c)[0] + fsmn_context(c)[1] for c in components if c.kind == "Fsmn")
    lo, hi = warmup, feats.shape[0] - delay
    if hi - lo < 50:
        raise ExportError(f"the example recording is too short to verify ({feats.shape[0]} frames)")
    diff = float(np.abs(whole[lo + delay : hi + delay] - ref[lo:hi]).max())
    if not diff <= TOLERANCE:
        raise ExportError(f"ONNX and numpy forward passes differ by {diff:.3g} (> {TOLERANCE})")

    chunk_diff = 0.0
    for chunk in CHUNKS:
        part = _run_stream(session, feats, contract.cache_shape, chunk)
        chunk_diff = max(chunk_diff, float(np.abs(part - whole).max()))
    if not chunk_diff <= 1e-5:
        raise ExportError(f"chunked inference differs from one call by {chunk_diff:.3g}")

    # Append the look-ahead (last frame repeated) so the final frames are decoded too.
    padded = np.concatenate([feats, np.repeat(feats[-1:], delay, axis=0)])
    text = greedy_text(_run_stream(session, padded, contract.cache_shape, None)[delay:], contract.tokens,
                       contract.blank_id)
    if EXPECTED_TEXT not in text:
        raise ExportError(f"greedy decoding of the example recording reads {text!r}, not {EXPECTED_TEXT!r}")

    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        _run_stream(session, feats, contract.cache_shape, 3)
    ms_per_frame = (time.perf_counter() - t0) * 1000 / (reps * feats.shape[0])
    return diff, hi - lo, chunk_diff, text, ms_per_frame


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def outdated(upstream: Path, output: Path) -> str | None:
    """Why ``output`` needs a new export from ``upstream`` (missing, other weights, older graph), or None."""
    if not output.is_file():
        return f"{output} does not exist"
    try:
        meta = {p.key: p.value for p in onnx.load(str(output), load_external_data=False).metadata_props}
        contract = ModelContract.from_metadata(meta, str(output))
    except Exception as exc:  # a damaged file raises protobuf's own decode error, a foreign one ContractError
        return f"{output} cannot be read as a kwsd model ({exc})"
    net = Path(upstream) / NET_FILE
    if net.is_file() and contract.source_sha256 != _sha256(net):
        return f"{output} was exported from other weights than {net}"
    if contract.exporter != EXPORTER:
        return f"{output} was written by {contract.exporter!r}; this kwsd writes {EXPORTER!r}"
    return None


def export_model(upstream: Path, output: Path, example: Path | None = None) -> ExportReport:
    """Parse ``upstream``'s weights, write ``output`` only if the ONNX verifies; raise ExportError otherwise."""
    t0 = time.perf_counter()
    upstream = Path(upstream)
    paths = {rel: upstream / rel for rel in (NET_FILE, CMVN_FILE, TOKENS_FILE)}
    for rel, p in paths.items():
        if not p.is_file():
            raise ExportError(f"{p}: missing upstream file {rel} (run `kwsd model fetch` first)")
    given = example is not None
    example = example or upstream / EXAMPLE_FILE
    if not example.is_file():
        where = f"{example} does not exist" if given else f"{upstream} lacks {EXAMPLE_FILE} (its source had none)"
        raise ExportError(f"{where}: {example_hint(EXAMPLE_FILE)}")
    from kwsd.model.nnet1 import Nnet1Error

    try:
        components = read_nnet(paths[NET_FILE])
        shift, scale = read_cmvn(paths[CMVN_FILE])
    except Nnet1Error as exc:
        raise ExportError(str(exc)) from exc
    try:
        tokens = load_tokens(paths[TOKENS_FILE])
        samples = read_wav(example)
    except (KeywordError, AudioFileError) as exc:
        raise ExportError(str(exc)) from exc
    if len(set(tokens)) != len(tokens):
        raise ExportError(f"{paths[TOKENS_FILE]}: the token list has duplicate entries")
    if components[-1].output_dim != len(tokens):
        raise ExportError(f"the network outputs {components[-1].output_dim} tokens but "
                          f"{paths[TOKENS_FILE]} lists {len(tokens)}")
    fsmn = [c for c in components if c.kind == "Fsmn"]
    past, future = fsmn_context(fsmn[0]) if fsmn else (0, 0)
    features = FeatureConfig()
    if features.dim != components[0].input_dim:
        raise ExportError(f"features have {features.dim} dims but the network expects {components[0].input_dim}")
    contract = ModelContract(
        features=features,
        tokens=tokens,
        blank_id=tokens.index("<blank>") if "<blank>" in tokens else 0,
        cache_shape=(len(fsmn), fsmn[0].input_dim if fsmn else 0, past + future),
        delay_frames=sum(fsmn_context(c)[1] for c in fsmn),
        source=SOURCE_REPO,
        source_sha256=_sha256(paths[NET_FILE]),
        exporter=EXPORTER,
    )
    model = build_model(components, shift, scale, contract)

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    try:
        onnx.save(model, str(tmp))
        diff, frames, chunk_diff, text, ms = verify(tmp, components, shift, scale, contract, samples)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    report = ExportReport(
        path=output,
        size_bytes=output.stat().st_size,
        params=sum(c.num_params for c in components),
        seconds=time.perf_counter() - t0,
        max_abs_diff=diff,
        compared_frames=frames,
        chunk_max_diff=chunk_diff,
        greedy_text=text,
        ms_per_frame_cpu=ms,
    )
    log.debug("exported %s (%d bytes, %d parameters) in %.1f s; max |ONNX - numpy| = %.2g over %d frames; "
             "chunks 1/7/50 differ by %.2g; example reads %r; %.3f ms per frame on CPU",
             output, report.size_bytes, report.params, report.seconds, diff, frames, chunk_diff, text, ms)
    return report
