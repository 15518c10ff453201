"""ONNX Runtime backend (the default): provider choice, threads, optimisation level, I/O binding.

This is the only place an ONNX Runtime InferenceSession is created: every command reaches ONNX
Runtime through ``OrtBackend.load``, which is also where the CPU-fit check of INT8 formats sits.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import mmap
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from modelkiln.errors import BackendError, ModelNotFound
from modelkiln.runtime import cpu, kernels
from modelkiln.runtime.backends.base import IN_MEMORY, Backend, ModelSource, TensorMeta, source_name
from modelkiln.runtime.kernels.lookup import fuse_lookups
from modelkiln.runtime.memory_pool import MemoryPool

log = logging.getLogger(__name__)
#: (model identity, reason) pairs already warned about: one warning per model, not per session.
_WARNED: set[tuple[str, str]] = set()
_WARNED_LOCK = threading.Lock()

#: Preference order when providers are chosen automatically.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


class GraphOptimization(enum.Enum):
    DISABLE = "disable"
    BASIC = "basic"
    EXTENDED = "extended"
    ALL = "all"


@dataclass(frozen=True, eq=False)
class OrtOptions:
    """Session settings; ``providers=None`` picks TensorRT > CUDA > CPU from what is installed."""

    providers: tuple[str, ...] | None = None
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    optimization: GraphOptimization = GraphOptimization.ALL
    io_binding: bool = False
    memory_pool: MemoryPool | None = None  # output buffers for io_binding; caller releases them
    #: intermediate tensors to expose as the model's outputs (calibration, layer-wise comparison);
    #: when given, these replace the graph's own outputs.
    expose: tuple[str, ...] = ()
    memory_arena: bool = True  # ORT's CPU arena; off for one-shot sessions over many tensors
    #: write the graph ONNX Runtime runs, after its own fusions, to this file (see optimized_graph)
    optimized_model: Path | None = None
    #: ONNX Runtime's profiler on: its JSON trace goes to a file starting with this prefix
    #: (``OrtBackend.end_profiling()`` returns the file; bench/profile.py summarises it per op type)
    profile_prefix: Path | None = None

    def __post_init__(self) -> None:
        for n in (self.intra_op_threads, self.inter_op_threads):
            if n is not None and n < 1:
                raise ValueError(f"thread counts must be >= 1, got {n}")
        if not isinstance(self.optimization, GraphOptimization):
            raise TypeError(f"optimization must be a GraphOptimization, got {self.optimization!r}")
        if self.memory_pool is not None and not self.io_binding:
            raise ValueError("memory_pool is used only with io_binding=True")


def choose_providers(requested: tuple[str, ...] | None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested is None:
        return [p for p in PROVIDER_ORDER if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        raise BackendError(f"ONNX Runtime providers {missing} are not available here; available: {available}")
    return list(requested)


def tensor_metas(args: list[Any]) -> list[TensorMeta]:
    """TensorMeta of ONNX Runtime's NodeArgs (session.get_inputs()/get_outputs())."""
    return [
        TensorMeta(
            a.name,
            _ORT_TYPES.get(a.type, a.type),
            tuple(d if isinstance(d, (int, str)) else None for d in a.shape),
        )
        for a in args
    ]


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, session: Any, model_name: str, options: OrtOptions) -> None:
        super().__init__(model_name, tensor_metas(session.get_inputs()), tensor_metas(session.get_outputs()))
        self.session, self.options = session, options
        self._output_names = [m.name for m in self._outputs]
        self._device = "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"

    @classmethod
    def load(cls, model: ModelSource, options: OrtOptions | None = None) -> OrtBackend:
        options = options or OrtOptions()
        return cls(_session(model, options), source_name(model), options)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def providers(self) -> list[str]:
        providers: list[str] = self.session.get_providers()
        return providers

    def end_profiling(self) -> Path:
        """Stop ONNX Runtime's profiler and return its JSON trace (needs ``OrtOptions.profile_prefix``)."""
        if self.options.profile_prefix is None:
            raise BackendError(f"{self.model_name}: profiling was not enabled (OrtOptions.profile_prefix)")
        return Path(self.session.end_profiling())

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.options.io_binding:
            return self._infer_bound(feed)
        return dict(zip(self._output_names, self.session.run(self._output_names, feed), strict=True))

    def _infer_bound(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with I/O binding; outputs whose shape is known from the inputs go into pool buffers."""
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        bound = _symbols(self._inputs, feed)
        pooled: dict[str, np.ndarray] = {}
        pool = self.options.memory_pool
        for meta in self._outputs:
            shape = _resolve(meta.shape, bound)
            if pool is not None and shape is not None and self._device == "cpu":
                out = pool.acquire(shape, meta.dtype)
                binding.bind_output(meta.name, "cpu", 0, np.dtype(meta.dtype), list(shape), out.ctypes.data)
                pooled[meta.name] = out
            else:
                binding.bind_output(meta.name, "cpu")
        self.session.run_with_iobinding(binding)
        if len(pooled) == len(self._outputs):
            return pooled
        produced = dict(zip(self._output_names, binding.copy_outputs_to_cpu(), strict=True))
        return {name: pooled.get(name, produced[name]) for name in self._output_names}


def _session(model: ModelSource, options: OrtOptions) -> Any:
    """An InferenceSession for ``model`` with ``options``; load errors become BackendError."""
    import onnxruntime as ort

    if isinstance(model, (str, Path)) and not Path(model).is_file():
        raise ModelNotFound(f"model file not found: {model}")
    source: str | bytes
    if options.expose:
        if isinstance(model, onnx.ModelProto):
            proto = model
        elif isinstance(model, bytes):
            proto = onnx.load_from_string(model)
        else:
            proto = onnx.load(os.fspath(model))
        source = _expose_outputs(proto, list(options.expose)).SerializeToString()
    elif isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    elif isinstance(model, bytes):
        source = model
    else:
        source = os.fspath(model)
    so = _session_options(options)
    providers = choose_providers(options.providers)
    name = os.fspath(model) if isinstance(model, (str, Path)) else IN_MEMORY
    if not options.expose and _asks_for_lookups(model, source):
        fused = _with_lookups(source, options, providers, name)
        if fused is not None:
            source = fused
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimized
            so.optimized_model_filepath = ""
    try:
        session = ort.InferenceSession(source, so, providers=providers)
    except Exception as exc:
        if kernels.DOMAIN in str(exc) and not kernels.available():
            raise BackendError(kernels.unavailable_message(name)) from exc
        raise BackendError(f"ONNX Runtime cannot load {name}: {str(exc).splitlines()[0][:300]}") from exc
    warn_cpu_mismatch(name, dict(session.get_modelmeta().custom_metadata_map))
    return session


def _session_options(options: OrtOptions) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[options.optimization])
    if options.intra_op_threads:
        so.intra_op_num_threads = options.intra_op_threads
    if options.inter_op_threads:
        so.inter_op_num_threads = options.inter_op_threads
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = options.memory_arena
    if options.optimized_model is not None:
        so.optimized_model_filepath = os.fspath(options.optimized_model)
    if options.profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = os.fspath(options.profile_prefix)
    kernels.register(so)
    return so


#: Larger models are not rewritten at load (ONNX Runtime's optimized-model dump is one protobuf).
_LOOKUP_MAX_BYTES = 1 << 30


def _asks_for_lookups(model: ModelSource, source: str | bytes) -> bool:
    """Whether the model's metadata asks kiln's runtime for lookup kernels (quant/build.py writes
    the key). A byte search, not a parse, so models without it pay nothing; a false hit only costs
    the check in _with_lookups."""
    key = kernels.METADATA_KEY
    if isinstance(model, onnx.ModelProto):
        return any(p.key == key for p in model.metadata_props)
    if isinstance(source, bytes):
        return len(source) <= _LOOKUP_MAX_BYTES and key.encode() in source
    path = Path(source)
    if not 0 < path.stat().st_size <= _LOOKUP_MAX_BYTES:
        return False
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(key.encode()) >= 0


def _with_lookups(source: str | bytes, options: OrtOptions, providers: list[str], name: str) -> bytes | None:
    """The graph ONNX Runtime would run for ``source``, with every element-wise chain between two
    quantized tensors replaced by our LookupTable kernel; None where that does not apply (kernel
    library not built, another provider, a lower optimization level, no chain found).

    The rewrite runs on ONNX Runtime's own optimized graph, after its layout pass: done before it,
    ONNX Runtime (which cannot know our op is element-wise) would wrap every lookup in NHWC<->NCHW
    transposes. That graph is specific to this CPU, so it is made at load, never stored."""
    import onnxruntime as ort

    if providers != ["CPUExecutionProvider"] or options.optimization is not GraphOptimization.ALL:
        return None
    if not kernels.available():
        _warn_once(name, "no-kernels", kernels.unavailable_message(name) + "; running its float path")
        return None
    with tempfile.TemporaryDirectory(prefix="kiln-ort-") as tmp:
        so = _session_options(dataclasses.replace(options, optimized_model=None, profile_prefix=None))
        so.intra_op_num_threads = 1
        so.optimized_model_filepath = os.fspath(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(source, so, providers=providers)
            optimized = onnx.load(so.optimized_model_filepath)
        except Exception as exc:  # noqa: BLE001 (the normal load that follows reports real errors)
            log.debug("%s: no lookup rewrite: %s", name, str(exc).splitlines()[0][:200])
            return None
    if not any(p.key == kernels.METADATA_KEY for p in optimized.metadata_props):
        return None
    graph = ir.from_proto(optimized)
    fused = fuse_lookups(graph)
    if not fused:
        return None
    log.debug("%s: %s as int8 lookups", name, dict(fused))
    final = ir.to_proto(graph)
    if options.optimized_model is not None:
        onnx.save(final, options.optimized_model)
    data: bytes = final.SerializeToString()
    return data


_ORT_LEVELS = {
    GraphOptimization.DISABLE: "ORT_DISABLE_ALL",
    GraphOptimization.BASIC: "ORT_ENABLE_BASIC",
    GraphOptimization.EXTENDED: "ORT_ENABLE_EXTENDED",
    GraphOptimization.ALL: "ORT_ENABLE_ALL",
}


def _expose_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are exactly ``names`` (intermediate tensors included)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return exposed


def warn_cpu_mismatch(name: str, props: dict[str, str]) -> str | None:
    """Log once per model when this CPU cannot run it as built (an INT8 format needing VNNI on a
    CPU without it): every command loads through OrtBackend, so each says so without repeating
    itself per session. ``name`` is the file or "<in-memory model>" (in-memory models are
    candidates built from a file, e.g. in a budget search: one warning covers them all).
    Returns the reason (None when the CPU fits)."""
    reason = cpu.unmet_requirement(props)
    if reason is not None:
        _warn_once(name, reason, f"model {name}: {reason}")
    return reason


def _warn_once(name: str, reason: str, message: str) -> None:
    """Log ``message`` the first time (model, reason) is seen in this process."""
    identity = name if name == IN_MEMORY else os.path.realpath(name)
    with _WARNED_LOCK:
        first = (identity, reason) not in _WARNED
        _WARNED.add((identity, reason))
    if first:
        log.warning("%s", message)


def optimized_graph(
    model: ModelSource, optimization: GraphOptimization = GraphOptimization.ALL
) -> onnx.ModelProto:
    """The graph ONNX Runtime's CPU provider runs for ``model`` after its own fusions: how to see
    whether QDQ became QLinearConv / MatMulInteger kernels or stayed float."""
    with tempfile.TemporaryDirectory(prefix="kiln-ort-") as tmp:
        dump = Path(tmp) / "optimized.onnx"
        OrtBackend.load(
            model,
            OrtOptions(providers=("CPUExecutionProvider",), optimization=optimization, optimized_model=dump),
        )
        return onnx.load(dump)


def cpu_backend(
    model: ModelSource,
    optimization: GraphOptimization = GraphOptimization.ALL,
    threads: int | None = None,
    expose: tuple[str, ...] = (),
    memory_arena: bool = True,
) -> OrtBackend:
    """ONNX Runtime on the CPU provider only: the reference runs inside the pipeline (calibration,
    parity checks, candidate scoring) stay on the CPU even where a GPU provider is installed."""
    return OrtBackend.load(
        model,
        OrtOptions(
            providers=("CPUExecutionProvider",),
            intra_op_threads=threads,
            optimization=optimization,
            expose=expose,
            memory_arena=memory_arena,
        ),
    )


def _symbols(inputs: list[TensorMeta], feed: dict[str, np.ndarray]) -> dict[str, int]:
    return {
        d: v for m in inputs for d, v in zip(m.shape, feed[m.name].shape, strict=True) if isinstance(d, str)
    }


def _resolve(shape: tuple[int | str | None, ...], bound: dict[str, int]) -> tuple[int, ...] | None:
    dims = [d if isinstance(d, int) else bound.get(d) if isinstance(d, str) else None for d in shape]
    known = [d for d in dims if d is not None]
    return tuple(known) if len(known) == len(dims) else None
