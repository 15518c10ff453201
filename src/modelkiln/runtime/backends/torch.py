"""The torch reference backend: runs a zoo family's torch module, for parity checks and predictions.

Which module a source names (a zoo name, or an exported .onnx file whose metadata records its
family, part and weights) is the zoo's knowledge, and the zoo sits above runtime; so the zoo
installs a resolver here when it is imported (``register_resolver``) and this module never
imports it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln._deps import require
from modelkiln.errors import BackendError
from modelkiln.runtime.backends.base import Backend, ModelSource, TensorMeta


@dataclass(frozen=True)
class TorchOptions:
    """Which weights and part to build. Defaults: the weights an exported file records (or the
    family's default weights for a zoo name) and the file's part (or the family's first part)."""

    weights: str | None = None
    part: str | None = None
    image_size: int | None = None
    threads: int | None = None


@dataclass(frozen=True)
class TorchModel:
    """A built torch module with what the backend reports about it; made by the resolver."""

    module: Any
    name: str  # in messages, e.g. "efficientnet_lite0/model (torch)"
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    metadata: dict[str, str] = field(default_factory=dict)  # as an export of it would record


#: (zoo name or exported file, options) -> the module to run.
Resolver = Callable[[str | Path, TorchOptions], TorchModel]

_resolver: list[Resolver] = []
_lock = threading.Lock()


def register_resolver(resolver: Resolver) -> None:
    """Install how sources become torch modules (``modelkiln.zoo`` installs its own on import)."""
    with _lock:
        _resolver[:] = [resolver]


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        module: Any,
        model_name: str,
        inputs: list[TensorMeta],
        outputs: list[TensorMeta],
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(model_name, inputs, outputs, metadata)
        self.module = module

    @classmethod
    def load(cls, model: ModelSource, options: TorchOptions | None = None) -> TorchBackend:
        """``model`` is a zoo name or an exported .onnx file (its metadata names the family)."""
        if not isinstance(model, (str, Path)):
            raise BackendError(
                "the torch backend runs zoo families: give a zoo name or an exported .onnx file, "
                "not an in-memory model"
            )
        with _lock:
            resolver = _resolver[0] if _resolver else None
        if resolver is None:
            raise BackendError(
                "the torch backend finds its modules through the model zoo: import modelkiln.zoo first"
            )
        torch = require("torch", "the torch backend")
        options = options or TorchOptions()
        if options.threads:
            torch.set_num_threads(options.threads)
        built = resolver(model, options)
        return cls(built.module, built.name, list(built.inputs), list(built.outputs), built.metadata)

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = require("torch", "the torch backend")
        with torch.no_grad():
            out = self.module(*(torch.from_numpy(feed[m.name]) for m in self._inputs))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {m.name: o.numpy() for m, o in zip(self._outputs, outs, strict=True)}
