"""The one small protocol every backend implements (Polygraphy-style runners).

``infer`` is public: it validates the feed against the model's inputs and raises one BadInput
that names the model, the input, what was expected and what came; ``_infer`` runs.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import onnx

from modelkiln.errors import BadInput

#: What a backend can load: a file, serialized bytes, or an in-memory model (a candidate being built).
ModelSource: TypeAlias = "str | Path | bytes | onnx.ModelProto"


class BackendKind(str, enum.Enum):
    """The runtimes a model can be run on; the value is the name used on the command line."""

    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    TORCH = "torch"


def source_name(model: ModelSource) -> str:
    """How a model is named in messages: its file name, or a placeholder for in-memory models."""
    return Path(model).name if isinstance(model, (str, Path)) else IN_MEMORY


IN_MEMORY = "<in-memory model>"


def serialized(model: ModelSource) -> bytes:
    """The model as ONNX bytes (a file is read whole: external-data weights are not folded in)."""
    if isinstance(model, onnx.ModelProto):
        data: bytes = model.SerializeToString()
        return data
    if isinstance(model, bytes):
        return model
    return Path(model).read_bytes()


@dataclass(frozen=True)
class TensorMeta:
    """Name, numpy dtype and shape of a model input/output; str or None for symbolic dims."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


def _describe_array(value: Any) -> str:
    if not isinstance(value, np.ndarray):
        return type(value).__name__
    return f"{value.dtype}[{', '.join(map(str, value.shape))}]"


def validate_feed(model: str, inputs: list[TensorMeta], feed: dict[str, Any]) -> dict[str, int]:
    """Check names, dtypes, ranks and dims; returns the values bound to symbolic dims."""
    expected = {m.name for m in inputs}
    missing, unexpected = sorted(expected - set(feed)), sorted(set(feed) - expected)
    if missing or unexpected:
        raise BadInput(
            f"{model}: expected inputs {sorted(expected)}, got {sorted(feed)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unexpected {unexpected})" if unexpected else "")
        )
    bound: dict[str, int] = {}
    for meta in inputs:
        value = feed[meta.name]
        problem = _mismatch(meta, value, bound)
        if problem:
            raise BadInput(
                f"{model}: input '{meta.name}' expects {meta.describe()}, got {_describe_array(value)} ({problem})"
            )
    return bound


def _mismatch(meta: TensorMeta, value: Any, bound: dict[str, int]) -> str | None:
    if not isinstance(value, np.ndarray):
        return "not a numpy array"
    if value.dtype != np.dtype(meta.dtype):
        return f"dtype {value.dtype} instead of {meta.dtype}"
    if value.ndim != len(meta.shape):
        return f"rank {value.ndim} instead of {len(meta.shape)}"
    for axis, (want, got) in enumerate(zip(meta.shape, value.shape, strict=True)):
        if isinstance(want, int) and want != got:
            return f"dim {axis} is {got} instead of {want}"
        if isinstance(want, str) and bound.setdefault(want, got) != got:
            return f"dim {axis} ('{want}') is {got} but another input has {want}={bound[want]}"
    return None


class Backend(abc.ABC):
    """A loaded model on one runtime; subclasses pass its I/O metadata and implement ``_infer``."""

    name: str = "?"

    def __init__(
        self,
        model_name: str,
        inputs: list[TensorMeta],
        outputs: list[TensorMeta],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.model_name = model_name
        self._inputs, self._outputs = inputs, outputs
        self._metadata = dict(metadata or {})

    @classmethod
    @abc.abstractmethod
    def load(cls, model: ModelSource, options: Any = None) -> Backend:
        """Load ``model`` (a file, bytes or an in-memory ModelProto) with backend-specific ``options``."""

    @property
    def metadata(self) -> dict[str, str]:
        """The ONNX model's metadata_props (zoo family, class names, INT8 format); {} when none."""
        return dict(self._metadata)

    @property
    def input_metadata(self) -> list[TensorMeta]:
        return self._inputs

    @property
    def output_metadata(self) -> list[TensorMeta]:
        return self._outputs

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``feed`` and run; outputs by name."""
        validate_feed(self.model_name, self._inputs, feed)
        return self._infer(feed)

    @abc.abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
