"""The torch reference backend: runs a zoo model's torch modules, for parity checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.runtime.backends.base import Backend, TensorMeta


@dataclass(frozen=True)
class TorchOptions:
    """Which zoo weights and part to build; ``path`` passed to load() is the zoo name."""

    weights: str | None = None
    part: str | None = None  # default: the zoo entry's first part
    image_size: int | None = None
    threads: int | None = None


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self, module: Any, model_name: str, inputs: list[TensorMeta], outputs: list[TensorMeta]
    ) -> None:
        super().__init__(model_name, inputs, outputs)
        self.module = module

    @classmethod
    def load(cls, path: str | Path, options: TorchOptions | None = None) -> TorchBackend:
        from modelkiln import zoo
        from modelkiln._deps import require

        torch = require("torch", "the torch backend")
        options = options or TorchOptions()
        if options.threads:
            torch.set_num_threads(options.threads)
        entry = zoo.get(str(path), options.image_size)
        part = entry.part(options.part or entry.parts[0].name)
        module = entry.build(options.weights if options.weights is not None else entry.default_weights)[
            part.name
        ]
        meta = [TensorMeta(s.name, s.dtype, s.shape) for s in part.inputs]
        outs = [TensorMeta(s.name, s.dtype, s.shape) for s in part.outputs]
        return cls(module, f"{entry.name}/{part.name} (torch)", meta, outs)

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.module(*(torch.from_numpy(feed[m.name]) for m in self._inputs))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {m.name: o.numpy() for m, o in zip(self._outputs, outs, strict=True)}
