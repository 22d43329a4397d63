"""The shared ONNX session: providers negotiated and reported, contract read from the model, batched calls."""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from kwsd.kws.contract import (
    EXPORTER,
    INPUT_COLUMNS,
    INPUT_FEATS,
    INPUT_LOG_FLOOR,
    INPUT_NEED,
    OUTPUT_PROBS,
    OUTPUT_ROWS,
    OUTPUT_STARTS,
    ContractError,
    ModelContract,
    cache_inputs,
    cache_outputs,
    check_interface,
    full_head_inputs,
)

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
GPU_HINT = "install the GPU runtime with `scripts/setup --gpu` (pip extra `kwsd[gpu]`)"
_SPLIT_MIN = 16
"""Fewest streams per thread worth a concurrent call of their own."""


_SELECTED = (OUTPUT_ROWS, OUTPUT_STARTS, OUTPUT_PROBS)
"""The output layer's outputs, bound in this order."""
T = TypeVar("T")


class Posteriors(NamedTuple):
    """What one :meth:`ModelSession.update` computed of the output layer."""

    rows: np.ndarray
    """``[N]`` int64: the batch rows computed, ascending."""
    starts: np.ndarray
    """``[N]`` int64: the first frame computed of each (the row's later frames are all computed)."""
    probs: np.ndarray
    """``[M, tokens]``: the posteriors of frames ``starts[i] ..`` of ``rows[i]``, row after row."""


class ModelError(RuntimeError):
    """The model file cannot be used; the message names the file and the problem."""


def gpu_present() -> bool:
    """Whether the host has an NVIDIA GPU at all (the driver's control device or its /proc entry)."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def _create_session(path: str, options: Any, providers: list[str]) -> Any:
    """The seam where the runtime session is created (tests substitute a GPU-less stand-in here)."""
    import onnxruntime as ort

    return ort.InferenceSession(path, options, providers=providers)


def gpu_count() -> int:
    """NVIDIA GPUs the driver reports; 0 where there is no driver (the seam tests use to play a GPU host)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def runtime_build() -> tuple[str, str]:
    """The installed onnxruntime's package (``onnxruntime`` or ``onnxruntime-gpu``) and the CUDA version it was
    built for (empty for a CPU build)."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return "onnxruntime", ""
    return str(getattr(info, "package_name", "onnxruntime")), str(getattr(info, "cuda_version", "") or "")


def both_runtimes_installed() -> bool:
    """``onnxruntime`` and ``onnxruntime-gpu`` in one environment overwrite each other's files.

    Read from the ``*.dist-info`` folders on ``sys.path``: ``importlib.metadata`` costs every start-up 20 ms of
    imports for the same answer.
    """
    found: set[str] = set()
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(".dist-info"):
                dist = name.split("-", 1)[0].lower().replace(".", "_")
                if dist in ("onnxruntime", "onnxruntime_gpu"):
                    found.add(dist)
    return len(found) == 2


def cuda_load_error() -> str | None:
    """Why onnxruntime's CUDA provider library cannot be loaded (the loader names the missing library), or None
    when it loads."""
    import onnxruntime as ort

    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    try:
        ctypes.CDLL(os.path.join(capi, "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(os.path.join(capi, "libonnxruntime_providers_cuda.so"))
    except OSError as exc:
        return str(exc)
    return None


def preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the ``nvidia-*`` wheels (the ``gpu`` extra) before the CUDA provider
    needs them. onnxruntime prints what fails on stdout; that is logged here instead (stdout carries results)."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            preload(cuda=True, cudnn=True)
    except Exception as exc:  # a broken CUDA install must not stop a CPU fallback
        log.debug("preloading the CUDA libraries failed: %s", exc)
    for line in out.getvalue().splitlines():
        if line.strip():
            log.debug("onnxruntime.preload_dlls: %s", line.strip())


class ModelSession:
    """One model shared by every stream. ``run`` takes a batch of streams, each with its own cache row."""

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] = ("CUDAExecutionProvider", CPU),
        intra_op_threads: int = 1,
        max_batch: int = 4096,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError("onnxruntime is not installed: install kwsd with its `cpu` or `gpu` extra "
                             "(`scripts/setup`, or `scripts/setup --gpu` on an NVIDIA GPU host)") from exc

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file {self.path} not found (run `kwsd model export`, or set model.path)")
        # CUDA libraries missing on a CPU-only host is expected; the fallback is logged below instead.
        ort.set_default_logger_severity(4)
        available = set(ort.get_available_providers())
        wanted = [p for p in providers if p != CPU]
        self.provider_note = ""
        """Why a requested GPU provider is not the one in use (empty when it is, or none was requested)."""
        if CUDA in wanted:
            wanted = self._negotiate_cuda(wanted, available)
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
        """The execution provider actually running the model (onnxruntime falls back silently)."""
        if chosen[0] == CUDA and self.provider != CUDA:
            reason = cuda_load_error()
            if reason is None:
                self.provider_note = "the CUDA provider loads but could not start on the GPU (driver or device)"
            elif "libcuda.so" in reason:
                self.provider_note = f"the CUDA provider cannot load: {reason}; install the NVIDIA driver"
            else:
                self.provider_note = f"the CUDA provider cannot load: {reason}; {GPU_HINT}"
            log.warning("CUDA was requested (model.providers) and %d GPU(s) are present, but %s; running on %s",
                        gpu_count(), self.provider_note, self.provider)
        elif chosen[0] != self.provider:
            log.info("%s could not be initialised; running on %s", chosen[0], self.provider)
        try:
            meta = self._session.get_modelmeta().custom_metadata_map
            self.contract = ModelContract.from_metadata(meta, str(self.path))
        except ContractError as exc:
            raise ModelError(str(exc)) from exc
        if self.contract.exporter != EXPORTER:
            log.warning("model file %s was exported by %r, not by this kwsd's exporter (%r): it works, but run "
                        "scripts/setup to export it anew (`kwsd model export --if-outdated`)",
                        self.path, self.contract.exporter, EXPORTER)
        self._check_io()
        self._cache_in = cache_inputs(self.contract.cache_shape[0])
        self._cache_out = cache_outputs(self.contract.cache_shape[0])
        self.max_batch = max(1, max_batch)
        self.io_binding = self.provider != CPU
        self._pool: ThreadPoolExecutor | None = None
        self._split = self.threads if cpu_only else 1
        """Run through an I/O binding (on a GPU: inputs copied once, outputs copied back once per call); the CPU
        provider reads and writes the numpy arrays directly either way."""

    def _negotiate_cuda(self, wanted: list[str], available: set[str]) -> list[str]:
        """Keep CUDA in ``wanted`` only where it can work; say why not where a GPU is present.

        Hosts without an NVIDIA GPU drop it quietly: the default providers name CUDA first for GPU hosts.
        """
        if both_runtimes_installed():
            log.warning("onnxruntime and onnxruntime-gpu are both installed in this environment and overwrite each "
                        "other's files: keep one (`scripts/setup` or `scripts/setup --gpu` reinstalls the right one)")
        gpus = gpu_count()
        package, cuda_version = runtime_build()
        if gpus == 0 and not gpu_present():
            self.provider_note = "no NVIDIA GPU found"
            log.debug("no NVIDIA GPU (libcuda.so.1 absent or no device): not trying %s", CUDA)
            return [p for p in wanted if p != CUDA]
        if CUDA not in available or not cuda_version:
            self.provider_note = f"this onnxruntime ({package}) has no CUDA provider; {GPU_HINT}"
            log.warning("CUDA was requested (model.providers) and %d GPU(s) are present, but %s; running on CPU",
                        gpus, self.provider_note)
            return [p for p in wanted if p != CUDA]
        preload_cuda_libraries()
        return wanted

    def describe(self) -> str:
        """One line for ``kwsd devices`` and logs: the provider in use, the runtime, and why not the GPU."""
        import onnxruntime as ort

        package, cuda_version = runtime_build()
        build = f"{package} {ort.__version__}" + (f", CUDA {cuda_version} build" if cuda_version else "")
        note = f"; {self.provider_note}" if self.provider_note else ""
        return f"{self.provider} ({build}{note})"

    def _check_io(self) -> None:
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        try:
            check_interface(self.contract, inputs, outputs, f"model file {self.path}")
        except ContractError as exc:
            raise ModelError(str(exc)) from exc

    def new_cache(self, batch: int = 1) -> np.ndarray:
        """A zero cache ``[batch, layers, channels, frames]`` for :meth:`run`."""
        return np.zeros((batch, *self.contract.cache_shape), dtype=np.float32)

    def new_layer_cache(self, batch: int = 1) -> np.ndarray:
        """A zero cache ``[layers, batch, channels, frames]`` (one block per layer) for :meth:`update`."""
        layers, *rest = self.contract.cache_shape
        return np.zeros((layers, batch, *rest), dtype=np.float32)

    def run(self, feats: np.ndarray, cache: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posteriors ``[B, T, tokens]`` and the new cache for ``feats [B, T, dim]`` and ``cache [B, layers, ...]``
        (left as it was); :meth:`update` is the in-place call the detector makes."""
        layered = np.swapaxes(cache, 0, 1).astype(np.float32, order="C", copy=True)
        out = self.update(feats, layered)
        return out.probs.reshape(feats.shape[0], feats.shape[1], -1), np.swapaxes(layered, 0, 1)

    def update(self, feats: np.ndarray, cache: np.ndarray, need: np.ndarray | None = None,
               columns: Sequence[int] = (), log_floor: float = 0.0, split: bool = True) -> Posteriors:
        """Run ``feats [B, T, dim]``; the new cache is written over ``cache``; returns the posteriors computed.

        ``cache`` is float32 ``[layers, B, channels, frames]`` whose every layer ``cache[i]`` is C-contiguous
        (e.g. a slice of consecutive streams of a layer-major cache array). On the CPU the model writes the new
        cache in place: each layer reads its cache input before it writes its cache output, so no new cache is
        allocated and nothing is copied back.

        Without ``need`` every frame of every row is computed (``probs`` is then ``[B * T, tokens]``, row after
        row). With it (``[B]`` bool) a row is computed whole when ``need`` says so; otherwise from its first frame
        where one of ``columns`` (the blank's id first, then keyword token ids) may reach ``exp(log_floor)`` (see
        the exporter's ``_head``) to its end: the frames left out have no such token above that floor.

        ``split``: on the CPU, a big batch may run as concurrent calls on the session's threads; False when the
        caller already runs on one of several threads of its own.
        """
        batch = feats.shape[0]
        if cache.dtype != np.float32 or not all(layer.flags.c_contiguous for layer in cache):
            raise ValueError("the cache to update must be float32 with every layer C-contiguous")
        if need is None:
            selection = full_head_inputs(batch)
        else:
            cols = list(columns)
            if len(cols) < 2:
                raise ValueError("columns must name the blank and at least one keyword token")
            selection = {INPUT_NEED: np.ascontiguousarray(need, dtype=np.bool_),
                         INPUT_COLUMNS: np.asarray(cols, dtype=np.int64),
                         INPUT_LOG_FLOOR: np.array(log_floor, dtype=np.float32)}
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        parts: list[Posteriors] = []
        for a in range(0, batch, self.max_batch):
            b = min(batch, a + self.max_batch)
            part = _rows_of(selection, a, b)
            if self.io_binding:  # a GPU: the outputs come back through the binding, then into place
                parts.append(self._run_bound(feats[a:b], cache[:, a:b], part, a))
            elif split and self._split > 1 and b - a >= _SPLIT_MIN * self._split:
                parts.append(self._call_split(feats[a:b], cache[:, a:b], part, a))
            else:
                parts.append(self._call_into(feats[a:b], cache[:, a:b], part, a))
        return _joined(parts)

    def _call_split(self, feats: np.ndarray, cache: np.ndarray, selection: dict[str, np.ndarray], offset: int
                    ) -> Posteriors:
        """One batch as ``threads`` concurrent calls on consecutive slices of streams (each releases the
        interpreter lock), each writing its part of the cache in place."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._split - 1, thread_name_prefix="kwsd-model")
        edges = np.linspace(0, feats.shape[0], self._split + 1).astype(int).tolist()

        def call(a: int, b: int) -> Posteriors:
            return self._call_into(feats[a:b], cache[:, a:b], _rows_of(selection, a, b), offset + a)

        return _joined(concurrently(self._pool, [partial(call, a, b) for a, b in pairwise(edges)]))

    def _binding(self, feats: np.ndarray, selection: dict[str, np.ndarray]) -> Any:
        """An I/O binding with the features and the output-layer selection bound (the caches are the caller's)."""
        binding = self._session.io_binding()
        binding.bind_cpu_input(INPUT_FEATS, feats)
        for name, value in selection.items():
            binding.bind_cpu_input(name, value)
        return binding

    def _call_into(self, feats: np.ndarray, cache: np.ndarray, selection: dict[str, np.ndarray], offset: int
                   ) -> Posteriors:
        """One call: the new cache over ``cache`` (per layer C-contiguous); its rows counted from ``offset``."""
        binding = self._binding(feats, selection)
        for layer, name_in, name_out in zip(cache, self._cache_in, self._cache_out, strict=True):
            binding.bind_cpu_input(name_in, layer)
            binding.bind_output(name_out, "cpu", 0, np.float32, list(layer.shape), layer.ctypes.data)
        for name in _SELECTED:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        rows, starts, probs = (value.numpy() for value in binding.get_outputs()[-3:])  # in the order bound
        return Posteriors(rows + offset, starts, probs)

    def close(self) -> None:
        """Stop the helper threads of split batches (the session itself stays usable, single-threaded)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._split = 1

    def _run_bound(self, feats: np.ndarray, cache: np.ndarray, selection: dict[str, np.ndarray], offset: int
                   ) -> Posteriors:
        """One call through an I/O binding on a GPU: the inputs copied to the device once, the outputs back once
        per call, the new cache then over ``cache``."""
        binding = self._binding(feats, selection)
        for name in _SELECTED:
            binding.bind_output(name, "cpu")
        for layer, name_in, name_out in zip(cache, self._cache_in, self._cache_out, strict=True):
            binding.bind_cpu_input(name_in, layer)
            binding.bind_output(name_out, "cpu")
        binding.synchronize_inputs()
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        rows, starts, probs, *new_cache = binding.copy_outputs_to_cpu()  # in the order they were bound
        for layer, new in zip(cache, new_cache, strict=True):
            layer[...] = new
        return Posteriors(rows + offset, starts, probs)

    def warm_up(self, batch: int = 1, frames: int = 3) -> float:
        """One call on silence-like input so the first real step is not slow; returns its seconds."""
        t0 = time.perf_counter()
        self.run(np.zeros((batch, frames, self.contract.features.dim), dtype=np.float32), self.new_cache(batch))
        return time.perf_counter() - t0


def concurrently(pool: ThreadPoolExecutor, calls: Sequence[Callable[[], T]]) -> list[T]:
    """The results of ``calls``, in order: the first on this thread, the others on ``pool`` meanwhile.

    Every call has finished (or failed) before this returns or raises, so none still writes into memory (cache
    rows, a step's results) that the caller goes on to use; the first failure is raised.
    """
    futures = [pool.submit(call) for call in calls[1:]]
    try:
        first = calls[0]()
    finally:
        for f in futures:
            f.exception()
    return [first, *(f.result() for f in futures)]


def _rows_of(selection: dict[str, np.ndarray], a: int, b: int) -> dict[str, np.ndarray]:
    """The output-layer selection inputs of batch rows ``a .. b-1`` (only ``need`` is per row)."""
    return dict(selection, **{INPUT_NEED: selection[INPUT_NEED][a:b]})


def _joined(parts: list[Posteriors]) -> Posteriors:
    """The posteriors of consecutive parts of one batch as one."""
    if len(parts) == 1:
        return parts[0]
    return Posteriors(*(np.concatenate(column) for column in zip(*parts, strict=True)))


def describe_runtime(path: str | Path, providers: Sequence[str]) -> str:
    """The execution provider the model at ``path`` would run on with ``providers``, and why (``kwsd devices``).

    Builds a session, so CUDA is really tried; a missing model or runtime is described, not raised.
    """
    try:
        return ModelSession(path, providers).describe()
    except ModelError as exc:
        package, cuda_version = runtime_build()
        build = package + (f", CUDA {cuda_version} build" if cuda_version else "")
        return f"unknown ({exc}; runtime {build}, {gpu_count()} NVIDIA GPU(s))"
