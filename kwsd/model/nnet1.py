"""A small reader for Kaldi nnet1 networks (binary ``kwsr.net``) and nnet1 text CMVN files (``am.mvn``).

Only the components the FSMN-CTC keyword spotter uses are accepted; anything else, a truncated file or a shape that
does not chain is a ``Nnet1Error`` naming the file, the component and the byte offset, never a silently wrong model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np


class Nnet1Error(ValueError):
    """The file is not a network this parser understands; the message says where and why."""


@dataclass
class Component:
    """One nnet1 component: its type, dimensions, scalar options and parameter arrays."""

    kind: str
    output_dim: int
    input_dim: int
    options: dict[str, float] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(int(p.size) for p in self.params.values())


# Per component: the scalar options that may precede its parameters, and its parameters in file order.
_COMPONENTS: dict[str, tuple[frozenset[str], tuple[tuple[str, str], ...]]] = {
    "AffineTransform": (
        frozenset({"LearnRateCoef", "BiasLearnRateCoef", "MaxNorm"}),
        (("weight", "matrix"), ("bias", "vector")),
    ),
    "LinearTransform": (frozenset({"LearnRateCoef"}), (("weight", "matrix"),)),
    "Fsmn": (
        frozenset({"LearnRateCoef", "LOrder", "ROrder", "LStride", "RStride", "MaxNorm"}),
        (("l_filter", "matrix"), ("r_filter", "matrix")),
    ),
    "RectifiedLinear": (frozenset(), ()),
    "Softmax": (frozenset(), ()),
}
_INT_OPTIONS = frozenset({"LOrder", "ROrder", "LStride", "RStride"})


class _Reader:
    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.pos = 0
        self.name = name

    def fail(self, what: str) -> Nnet1Error:
        return Nnet1Error(f"{self.name}: {what} (at byte {self.pos})")

    def need(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"file is truncated while reading {what}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def token(self) -> str:
        while self.pos < len(self.data) and self.data[self.pos : self.pos + 1].isspace():
            self.pos += 1
        end = self.data.find(b" ", self.pos)
        if end < 0 or end - self.pos > 64:
            raise self.fail("file is truncated or corrupt: expected a token")
        tok = self.data[self.pos : end].decode("ascii", errors="replace")
        self.pos = end + 1
        return tok

    def peek_token(self) -> str:
        pos = self.pos
        try:
            return self.token()
        finally:
            self.pos = pos

    def int32(self, what: str) -> int:
        size = self.need(1, what)[0]
        if size != 4:
            raise self.fail(f"expected a 4-byte integer for {what}, found size {size}")
        return int(struct.unpack("<i", self.need(4, what))[0])

    def float32(self, what: str) -> float:
        size = self.need(1, what)[0]
        if size != 4:
            raise self.fail(f"expected a 4-byte float for {what}, found size {size}")
        return float(struct.unpack("<f", self.need(4, what))[0])

    def matrix(self, what: str) -> np.ndarray:
        tok = self.token()
        if tok != "FM":
            raise self.fail(f"expected a float matrix (FM) for {what}, found {tok!r}")
        rows, cols = self.int32(what), self.int32(what)
        if rows < 0 or cols < 0:
            raise self.fail(f"negative matrix size {rows}x{cols} for {what}")
        raw = self.need(4 * rows * cols, what)
        return np.frombuffer(raw, dtype="<f4").reshape(rows, cols).astype(np.float32)

    def vector(self, what: str) -> np.ndarray:
        tok = self.token()
        if tok != "FV":
            raise self.fail(f"expected a float vector (FV) for {what}, found {tok!r}")
        dim = self.int32(what)
        if dim < 0:
            raise self.fail(f"negative vector size {dim} for {what}")
        return np.frombuffer(self.need(4 * dim, what), dtype="<f4").astype(np.float32)


def read_nnet(path: str | Path) -> list[Component]:
    """Parse a binary nnet1 network into its components, checking every shape."""
    path = Path(path)
    data = path.read_bytes()
    r = _Reader(data, str(path))
    if r.need(2, "the binary header") != b"\0B":
        raise r.fail("not a Kaldi binary file (missing the \\0B header)")
    if r.token() != "<Nnet>":
        raise r.fail("expected <Nnet>")
    components: list[Component] = []
    while True:
        tok = r.token()
        if tok == "</Nnet>":
            break
        if tok == "<!EndOfComponent>":
            continue
        if not (tok.startswith("<") and tok.endswith(">")):
            raise r.fail(f"expected a component, found {tok!r}")
        kind = tok[1:-1]
        if kind not in _COMPONENTS:
            raise r.fail(f"unknown component <{kind}> (supported: {', '.join(sorted(_COMPONENTS))})")
        comp = Component(kind, r.int32(f"<{kind}> output dim"), r.int32(f"<{kind}> input dim"))
        allowed, params = _COMPONENTS[kind]
        while True:
            nxt = r.peek_token()
            if not (nxt.startswith("<") and nxt.endswith(">") and nxt[1:-1] in allowed):
                break
            r.token()
            opt = nxt[1:-1]
            comp.options[opt] = r.int32(opt) if opt in _INT_OPTIONS else r.float32(opt)
        for name, kind_of in params:
            what = f"<{kind}> {name}"
            comp.params[name] = r.matrix(what) if kind_of == "matrix" else r.vector(what)
        _check_component(comp, len(components), r)
        components.append(comp)
    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} unexpected bytes after </Nnet>")
    _check_chain(components, str(path))
    return components


def _check_component(c: Component, index: int, r: _Reader) -> None:
    where = f"component {index} <{c.kind}>"
    expect: dict[str, tuple[int, ...]] = {}
    if c.kind == "AffineTransform":
        expect = {"weight": (c.output_dim, c.input_dim), "bias": (c.output_dim,)}
    elif c.kind == "LinearTransform":
        expect = {"weight": (c.output_dim, c.input_dim)}
    elif c.kind == "Fsmn":
        for key in ("LOrder", "ROrder", "LStride", "RStride"):
            if key not in c.options:
                raise r.fail(f"{where}: missing <{key}>")
        lo, ro = int(c.options["LOrder"]), int(c.options["ROrder"])
        if lo < 1 or ro < 0 or c.options["LStride"] < 1 or c.options["RStride"] < 1:
            raise r.fail(f"{where}: invalid orders/strides {c.options}")
        if c.input_dim != c.output_dim:
            raise r.fail(f"{where}: input dim {c.input_dim} != output dim {c.output_dim}")
        expect = {"l_filter": (lo, c.input_dim), "r_filter": (ro, c.input_dim)}
    elif c.input_dim != c.output_dim:
        raise r.fail(f"{where}: input dim {c.input_dim} != output dim {c.output_dim}")
    for name, shape in expect.items():
        if c.params[name].shape != shape:
            raise r.fail(f"{where}: {name} has shape {c.params[name].shape}, expected {shape}")
        if not np.all(np.isfinite(c.params[name])):
            raise r.fail(f"{where}: {name} holds NaN or infinite values")


def _check_chain(components: list[Component], name: str) -> None:
    if not components:
        raise Nnet1Error(f"{name}: the network has no components")
    for i, (a, b) in enumerate(pairwise(components)):
        if a.output_dim != b.input_dim:
            raise Nnet1Error(
                f"{name}: component {i} <{a.kind}> outputs {a.output_dim} values but component {i + 1} "
                f"<{b.kind}> expects {b.input_dim}"
            )


def read_cmvn(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a text nnet1 CMVN network (``<AddShift>`` then ``<Rescale>``); returns (shift, scale)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as exc:
        raise Nnet1Error(f"{path}: not a text nnet1 CMVN file") from exc
    vectors: dict[str, np.ndarray] = {}
    for kind in ("AddShift", "Rescale"):
        start = text.find(f"<{kind}>")
        if start < 0:
            raise Nnet1Error(f"{path}: no <{kind}> component")
        open_, close = text.find("[", start), text.find("]", start)
        if open_ < 0 or close < open_:
            raise Nnet1Error(f"{path}: <{kind}> has no [ ... ] values (truncated?)")
        try:
            vectors[kind] = np.array(text[open_ + 1 : close].split(), dtype=np.float32)
        except ValueError as exc:
            raise Nnet1Error(f"{path}: <{kind}> holds a value that is not a number") from exc
        dims = text[start:open_].split()[1:3]
        if len(dims) == 2 and dims[0].isdigit() and int(dims[0]) != vectors[kind].size:
            raise Nnet1Error(f"{path}: <{kind}> declares {dims[0]} values but holds {vectors[kind].size}")
    shift, scale = vectors["AddShift"], vectors["Rescale"]
    if shift.shape != scale.shape:
        raise Nnet1Error(f"{path}: <AddShift> has {shift.size} values but <Rescale> has {scale.size}")
    if not (np.all(np.isfinite(shift)) and np.all(np.isfinite(scale))):
        raise Nnet1Error(f"{path}: CMVN holds NaN or infinite values")
    return shift, scale


def count_params(components: list[Component]) -> int:
    return sum(c.num_params for c in components)
