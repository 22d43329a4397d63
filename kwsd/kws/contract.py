"""The contract an exported model states about itself in its ONNX metadata.

The exporter writes it; the session reads and checks it, so a model file never silently meets the wrong features,
token list or state layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kwsd.kws.features import FeatureConfig

FORMAT = "kwsd-fsmn-ctc-stream/4"
"""Version of the streaming interface (2: one cache input and output per Fsmn layer; 3: the output layer runs
on the rows that need it; 4: on the frames that need it, from each row's first such frame on)."""
GRAPH_REVISION = 8
"""Bumped whenever the exporter writes a different graph, so set-up re-exports models written before."""
EXPORTER = f"kwsd graph {GRAPH_REVISION}"
"""The ``kwsd.exporter`` metadata of a model this kwsd's exporter writes."""

INPUT_FEATS = "feats"
INPUT_CACHE = "cache"
"""Prefix of the per-layer cache inputs ``cache0``, ``cache1``, ..."""
INPUT_NEED = "need"
"""``[batch]`` bool: rows whose posteriors are wanted whatever their keyword tokens' bounds."""
INPUT_COLUMNS = "columns"
"""``[R]`` int64, R >= 2: the blank's token id, then the keywords' token ids."""
INPUT_LOG_FLOOR = "log_floor"
"""Scalar float: a row's posteriors are computed from its first frame where a keyword token's bound reaches
``exp(log_floor)``."""
OUTPUT_ROWS = "rows"
"""``[N]`` int64: the rows whose posteriors were computed, ascending."""
OUTPUT_STARTS = "starts"
"""``[N]`` int64: the first frame computed of each of those rows (every later frame of the row is computed)."""
OUTPUT_PROBS = "probs"
"""``[M, tokens]``: the posteriors of frames ``starts[i] .. T-1`` of ``rows[i]``, row after row."""
OUTPUT_CACHE = "cache_out"
"""Prefix of the per-layer cache outputs ``cache_out0``, ..."""


def full_head_inputs(batch: int) -> dict[str, np.ndarray]:
    """The selection inputs that ask for every row's posteriors."""
    return {INPUT_NEED: np.ones(batch, dtype=np.bool_), INPUT_COLUMNS: np.zeros(2, dtype=np.int64),
            INPUT_LOG_FLOOR: np.array(0.0, dtype=np.float32)}


def cache_input(layer: int) -> str:
    """The name of Fsmn layer ``layer``'s cache input."""
    return f"{INPUT_CACHE}{layer}"


def cache_output(layer: int) -> str:
    """The name of Fsmn layer ``layer``'s cache output."""
    return f"{OUTPUT_CACHE}{layer}"


def cache_inputs(layers: int) -> list[str]:
    """The names of the cache inputs of a model with ``layers`` Fsmn layers."""
    return [cache_input(i) for i in range(layers)]


def cache_outputs(layers: int) -> list[str]:
    """The names of the cache outputs of a model with ``layers`` Fsmn layers."""
    return [cache_output(i) for i in range(layers)]


class ContractError(ValueError):
    """The model file's metadata is missing, malformed or does not fit what kwsd needs."""


def tokens_digest(tokens: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ModelContract:
    features: FeatureConfig
    tokens: tuple[str, ...]
    blank_id: int
    cache_shape: tuple[int, ...]
    """Per-stream state shape (layers, channels, frames); cache input ``cache<i>`` of layer i is ``[batch, channels,
    frames]``, its output ``cache_out<i>`` the same."""
    delay_frames: int
    """Output frame ``t`` belongs to input frame ``t - delay_frames`` (the model's look-ahead)."""
    source: str
    source_sha256: str
    exporter: str

    @property
    def tokens_sha256(self) -> str:
        return tokens_digest(self.tokens)

    def to_metadata(self) -> dict[str, str]:
        return {
            "kwsd.format": FORMAT,
            "kwsd.features": json.dumps(asdict(self.features), sort_keys=True),
            "kwsd.tokens": json.dumps(list(self.tokens), ensure_ascii=False),
            "kwsd.tokens_sha256": self.tokens_sha256,
            "kwsd.blank_id": str(self.blank_id),
            "kwsd.cache_shape": json.dumps(list(self.cache_shape)),
            "kwsd.delay_frames": str(self.delay_frames),
            "kwsd.source": self.source,
            "kwsd.source_sha256": self.source_sha256,
            "kwsd.exporter": self.exporter,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], name: str = "model") -> ModelContract:
        def get(key: str) -> str:
            if key not in meta:
                raise ContractError(f"{name}: metadata key {key!r} is missing (not exported by kwsd model export?)")
            return meta[key]

        fmt = get("kwsd.format")
        if fmt != FORMAT:
            raise ContractError(f"{name}: model format {fmt!r} is not supported (expected {FORMAT!r}); export the "
                                "model anew: scripts/setup, or `kwsd model export`")
        try:
            features = FeatureConfig(**json.loads(get("kwsd.features")))
            tokens = tuple(json.loads(get("kwsd.tokens")))
            contract = cls(
                features=features,
                tokens=tokens,
                blank_id=int(get("kwsd.blank_id")),
                cache_shape=tuple(int(x) for x in json.loads(get("kwsd.cache_shape"))),
                delay_frames=int(get("kwsd.delay_frames")),
                source=get("kwsd.source"),
                source_sha256=get("kwsd.source_sha256"),
                exporter=get("kwsd.exporter"),
            )
        except (TypeError, ValueError) as exc:
            raise ContractError(f"{name}: malformed kwsd metadata: {exc}") from exc
        if contract.tokens_sha256 != get("kwsd.tokens_sha256"):
            raise ContractError(f"{name}: token list does not match its digest (file corrupted?)")
        if not 0 <= contract.blank_id < len(tokens):
            raise ContractError(f"{name}: blank id {contract.blank_id} outside the token list")
        return contract


Shape = Sequence[int | str | None]


def check_interface(contract: ModelContract, inputs: Mapping[str, Shape], outputs: Collection[str],
                    name: str = "model") -> None:
    """The graph's inputs and outputs are the streaming interface ``contract`` describes."""
    layers = contract.cache_shape[0] if contract.cache_shape else 0
    caches = cache_inputs(layers)
    wanted_in = {INPUT_FEATS, *caches, INPUT_NEED, INPUT_COLUMNS, INPUT_LOG_FLOOR}
    if set(inputs) != wanted_in or not {OUTPUT_ROWS, OUTPUT_STARTS, OUTPUT_PROBS, *cache_outputs(layers)} <= set(
            outputs):
        raise ContractError(f"{name}: inputs {sorted(inputs)} / outputs {sorted(outputs)} are not the streaming "
                            f"keyword-spotter interface")
    for cache_name in caches:
        cache = [layers, *inputs[cache_name][1:]]  # as [layers, channels, frames], the metadata's form
        if cache != list(contract.cache_shape):
            raise ContractError(f"{name}: cache input {cache} disagrees with its metadata {contract.cache_shape}")
    feats = list(inputs[INPUT_FEATS])
    if not feats or feats[-1] != contract.features.dim:
        raise ContractError(f"{name}: feature input {feats} disagrees with its metadata "
                            f"({contract.features.dim} dims)")


def read_contract(path: Path) -> ModelContract:
    """The contract of the ONNX file at ``path``, its interface checked, without creating an inference session."""
    import onnx
    import onnx.checker

    if not path.is_file():
        raise ContractError(f"model file {path} not found (run `kwsd model export`, or set model.path)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError for a file that is not an ONNX model
        raise ContractError(f"model file {path} is not an ONNX model ({type(exc).__name__})") from None
    name = f"model file {path}"
    contract = ModelContract.from_metadata({p.key: p.value for p in model.metadata_props}, name)
    try:  # what onnxruntime would refuse when it loads the graph: weights that do not fit their shapes, ...
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # onnx raises ValidationError, InferenceError and others
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ContractError(f"{name} is damaged: {first[:200]}") from None

    def dims(value: Any) -> list[int | str | None]:
        shape = value.type.tensor_type.shape
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]

    initializers = {t.name for t in model.graph.initializer}
    inputs = {i.name: dims(i) for i in model.graph.input if i.name not in initializers}
    check_interface(contract, inputs, [o.name for o in model.graph.output], name)
    return contract
