"""ONNX Runtime backend (the default): provider choice, threads, optimisation level, I/O binding."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.errors import BackendError
from modelkiln.runtime.backends.base import Backend, TensorMeta
from modelkiln.runtime.memory_pool import MemoryPool
from modelkiln.runtime.session import ort_session

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
    def load(cls, path: str | Path, options: OrtOptions | None = None) -> OrtBackend:
        options = options or OrtOptions()
        session = ort_session(
            path,
            threads=options.intra_op_threads,
            optimization=options.optimization.value,
            providers=choose_providers(options.providers),
            inter_op_threads=options.inter_op_threads,
        )
        return cls(session, Path(path).name, options)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

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


def _symbols(inputs: list[TensorMeta], feed: dict[str, np.ndarray]) -> dict[str, int]:
    return {
        d: v for m in inputs for d, v in zip(m.shape, feed[m.name].shape, strict=True) if isinstance(d, str)
    }


def _resolve(shape: tuple[int | str | None, ...], bound: dict[str, int]) -> tuple[int, ...] | None:
    dims = [d if isinstance(d, int) else bound.get(d) if isinstance(d, str) else None for d in shape]
    return None if any(d is None for d in dims) else tuple(dims)  # type: ignore[misc]
