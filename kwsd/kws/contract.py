"""The contract an exported model states about itself in its ONNX metadata.

The exporter writes it; the session reads and checks it, so a model file never silently meets the wrong features,
token list or state layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from kwsd.kws.features import FeatureConfig

FORMAT = "kwsd-fsmn-ctc-stream/1"

INPUT_FEATS = "feats"
INPUT_CACHE = "cache"
OUTPUT_PROBS = "probs"
OUTPUT_CACHE = "cache_out"


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
    """Per-stream state shape (layers, channels, frames); the ONNX cache input is ``[batch, *cache_shape]``."""
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
            raise ContractError(f"{name}: model format {fmt!r} is not supported (expected {FORMAT!r})")
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
