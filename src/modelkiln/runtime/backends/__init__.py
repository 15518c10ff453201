"""Backends share one protocol (load, input/output metadata, infer); chosen by name here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelkiln.runtime.backends.base import Backend, TensorMeta, validate_feed

__all__ = ["BACKENDS", "Backend", "TensorMeta", "load_backend", "validate_feed"]

#: name -> (module, class): imported on demand so the default path never imports torch/tensorrt.
BACKENDS = {
    "onnxruntime": ("modelkiln.runtime.backends.onnxruntime", "OrtBackend"),
    "tensorrt": ("modelkiln.runtime.backends.tensorrt", "TensorRTBackend"),
    "torch": ("modelkiln.runtime.backends.torch", "TorchBackend"),
}


def load_backend(path: str | Path, backend: str = "onnxruntime", options: Any = None) -> Backend:
    """Load ``path`` on the named backend ("onnxruntime", "tensorrt" or "torch")."""
    import importlib

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {sorted(BACKENDS)}")
    module, cls = BACKENDS[backend]
    return getattr(importlib.import_module(module), cls).load(path, options)
