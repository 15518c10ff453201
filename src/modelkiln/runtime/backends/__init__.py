"""Backends share one protocol (load, input/output metadata, infer); chosen by name here."""

from __future__ import annotations

import importlib
from typing import Any

from modelkiln.runtime.backends.base import Backend, BackendKind, ModelSource, TensorMeta, validate_feed

__all__ = ["BACKENDS", "Backend", "BackendKind", "ModelSource", "TensorMeta", "load_backend", "validate_feed"]

#: name -> (module, class): imported on demand so the default path never imports torch/tensorrt.
BACKENDS: dict[BackendKind, tuple[str, str]] = {
    BackendKind.ONNXRUNTIME: ("modelkiln.runtime.backends.onnxruntime", "OrtBackend"),
    BackendKind.TENSORRT: ("modelkiln.runtime.backends.tensorrt", "TensorRTBackend"),
    BackendKind.TORCH: ("modelkiln.runtime.backends.torch", "TorchBackend"),
}


def load_backend(
    model: ModelSource, backend: BackendKind | str = BackendKind.ONNXRUNTIME, options: Any = None
) -> Backend:
    """Load ``model`` on the named backend ("onnxruntime", "tensorrt" or "torch")."""
    try:
        kind = BackendKind(backend)
    except ValueError:
        raise ValueError(
            f"unknown backend {backend!r}; choose from {[k.value for k in BackendKind]}"
        ) from None
    module, cls = BACKENDS[kind]
    loaded: Backend = getattr(importlib.import_module(module), cls).load(model, options)
    return loaded
