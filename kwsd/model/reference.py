"""An independent numpy forward pass of a parsed nnet1 network over a whole utterance.

This is the yardstick the exported ONNX is checked against. It follows nnet1's offline semantics: CMVN applied to
the input, every component in order, and the Fsmn memory
``out[t] = x[t] + sum_i L[i]*x[t-i*ls] + sum_j R[j-1]*x[t+j*rs]``, frames outside the utterance being zero.
"""

from __future__ import annotations

import numpy as np

from kwsd.model.nnet1 import Component


def fsmn_memory(x: np.ndarray, comp: Component) -> np.ndarray:
    """The Fsmn component over ``x`` [T, D], zero outside the utterance."""
    lo, ro = int(comp.options["LOrder"]), int(comp.options["ROrder"])
    ls, rs = int(comp.options["LStride"]), int(comp.options["RStride"])
    left, right = comp.params["l_filter"], comp.params["r_filter"]
    t = x.shape[0]
    out = x.astype(np.float64).copy()
    for i in range(lo):
        shift = i * ls
        if shift < t:
            out[shift:] += left[i] * x[: t - shift]
    for j in range(1, ro + 1):
        shift = j * rs
        if shift < t:
            out[: t - shift] += right[j - 1] * x[shift:]
    return out


def forward(components: list[Component], feats: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Posteriors [T, tokens] for spliced, un-normalised features [T, dim], computed in float64."""
    x = (feats.astype(np.float64) + shift) * scale
    for comp in components:
        if comp.kind == "AffineTransform":
            x = x @ comp.params["weight"].T.astype(np.float64) + comp.params["bias"]
        elif comp.kind == "LinearTransform":
            x = x @ comp.params["weight"].T.astype(np.float64)
        elif comp.kind == "RectifiedLinear":
            x = np.maximum(x, 0.0)
        elif comp.kind == "Fsmn":
            x = fsmn_memory(x, comp)
        elif comp.kind == "Softmax":
            x = np.exp(x - x.max(axis=-1, keepdims=True))
            x /= x.sum(axis=-1, keepdims=True)
        else:  # read_nnet admits no other kind
            raise ValueError(f"unsupported component <{comp.kind}>")
    return x
