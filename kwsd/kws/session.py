"""The shared ONNX session: providers negotiated and reported, contract read from the model, batched calls."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from kwsd.kws.contract import (
    INPUT_CACHE,
    INPUT_FEATS,
    OUTPUT_CACHE,
    OUTPUT_PROBS,
    ContractError,
    ModelContract,
    check_interface,
)

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
_SPLIT_MIN = 16
"""Fewest streams per thread worth a concurrent call of their own."""


class ModelError(RuntimeError):
    """The model file cannot be used; the message names the file and the problem."""


def gpu_present() -> bool:
    """Whether the host has an NVIDIA GPU at all (the driver's control device or its /proc entry)."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def _create_session(path: str, options: Any, providers: list[str]) -> Any:
    """The seam where the runtime session is created (tests substitute a GPU-less stand-in here)."""
    import onnxruntime as ort

    return ort.InferenceSession(path, options, providers=providers)


class ModelSession:
    """One model shared by every stream. ``run`` takes a batch of streams, each with its own cache row."""

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] = ("CUDAExecutionProvider", CPU),
        intra_op_threads: int = 1,
        max_batch: int = 4096,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file {self.path} not found (run `kwsd model export`, or set model.path)")
        # CUDA libraries missing on a CPU-only host is expected; the fallback is logged below instead.
        ort.set_default_logger_severity(4)
        available = set(ort.get_available_providers())
        wanted = [p for p in providers if p != CPU]
        unknown = [p for p in wanted if p not in available]
        if unknown:
            log.info("execution providers %s are not available in this onnxruntime; using the rest", unknown)
        chosen = [p for p in wanted if p in available] + [CPU]
        self.threads = max(1, intra_op_threads)
        opts = ort.SessionOptions()
        # On the CPU a batch is split across ``threads`` concurrent calls (each releases the interpreter lock):
        # whole streams per thread scale better than onnxruntime's own split of this model's many small operators.
        cpu_only = chosen == [CPU]
        opts.intra_op_num_threads = 1 if cpu_only else self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads sleep instead of spinning: a step lasts milliseconds every 100 ms, and spinning
        # threads would take the cores the feature extraction and other processes need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = _create_session(str(self.path), opts, chosen)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
            raise ModelError(f"model file {self.path} cannot be loaded: {exc}") from exc
        self.provider: str = self._session.get_providers()[0]
        if chosen[0] != self.provider:
            # Expected on a host without a GPU; on one with a GPU it means the GPU goes unused.
            level = logging.WARNING if gpu_present() else logging.DEBUG
            log.log(level, "%s could not be initialised; running on %s", chosen[0], self.provider)
        try:
            meta = self._session.get_modelmeta().custom_metadata_map
            self.contract = ModelContract.from_metadata(meta, str(self.path))
        except ContractError as exc:
            raise ModelError(str(exc)) from exc
        self._check_io()
        self.max_batch = max(1, max_batch)
        self.io_binding = self.provider != CPU
        self._pool: ThreadPoolExecutor | None = None
        self._split = self.threads if cpu_only else 1
        """Run through an I/O binding (on a GPU: inputs copied once, outputs copied back once per call); the CPU
        provider reads and writes the numpy arrays directly either way."""

    def _check_io(self) -> None:
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        try:
            check_interface(self.contract, inputs, outputs, f"model file {self.path}")
        except ContractError as exc:
            raise ModelError(str(exc)) from exc

    def new_cache(self, batch: int = 1) -> np.ndarray:
        return np.zeros((batch, *self.contract.cache_shape), dtype=np.float32)

    def run(self, feats: np.ndarray, cache: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posteriors ``[B, T, tokens]`` and the new cache for ``feats [B, T, dim]`` and ``cache [B, ...]``."""
        batch = feats.shape[0]
        if batch <= self.max_batch:
            if self._split > 1 and batch >= _SPLIT_MIN * self._split:
                return self._run_split(feats, cache)
            if self.io_binding:
                return self._run_bound(feats, cache)
            return self._call(feats, cache)
        parts = [self.run(feats[i : i + self.max_batch], cache[i : i + self.max_batch])
                 for i in range(0, feats.shape[0], self.max_batch)]
        return np.concatenate([p for p, _ in parts]), np.concatenate([c for _, c in parts])

    def _run_split(self, feats: np.ndarray, cache: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One batch as ``threads`` concurrent calls on consecutive slices of streams."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._split - 1, thread_name_prefix="kwsd-model")
        edges = np.linspace(0, feats.shape[0], self._split + 1).astype(int)
        futures = [self._pool.submit(self._call, feats[a:b], cache[a:b]) for a, b in pairwise(edges[1:])]
        parts = [self._call(feats[: edges[1]], cache[: edges[1]])] + [f.result() for f in futures]
        return np.concatenate([p for p, _ in parts]), np.concatenate([c for _, c in parts])

    def _call(self, feats: np.ndarray, cache: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, new_cache = self._session.run([OUTPUT_PROBS, OUTPUT_CACHE], {INPUT_FEATS: feats, INPUT_CACHE: cache})
        return probs, new_cache

    def close(self) -> None:
        """Stop the helper threads of split batches (the session itself stays usable, single-threaded)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._split = 1

    def _run_bound(self, feats: np.ndarray, cache: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One call through an I/O binding: both inputs from host memory, both outputs back to host memory."""
        binding = self._session.io_binding()
        binding.bind_cpu_input(INPUT_FEATS, np.ascontiguousarray(feats, dtype=np.float32))
        binding.bind_cpu_input(INPUT_CACHE, np.ascontiguousarray(cache, dtype=np.float32))
        binding.bind_output(OUTPUT_PROBS, "cpu")
        binding.bind_output(OUTPUT_CACHE, "cpu")
        binding.synchronize_inputs()
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        probs, new_cache = binding.copy_outputs_to_cpu()
        return probs, new_cache

    def warm_up(self, batch: int = 1, frames: int = 3) -> float:
        """One call on silence-like input so the first real step is not slow; returns its seconds."""
        t0 = time.perf_counter()
        self.run(np.zeros((batch, frames, self.contract.features.dim), dtype=np.float32), self.new_cache(batch))
        return time.perf_counter() - t0
