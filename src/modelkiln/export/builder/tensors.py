"""Named weights for the graph builder, one tensor at a time: from safetensors shards (opened per
tensor, memory-mapped, so pages read for one weight are let go before the next) or from a model
already in memory (a tiny random model built for tests). Every tensor comes back as a float32
numpy array in torch's layout (a Linear weight is [out, in]).

Checkpoint names differ between the hub's files (``model.layers.0...``, ``visual...``) and
transformers 5's modules (``model.language_model.layers.0...``, ``model.visual...``); callers ask
for the hub name and either spelling is found.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from modelkiln._deps import require
from modelkiln.errors import WeightsError

#: (hub prefix, transformers 5 prefix): the same weight under its two names.
ALIASES = (("model.", "model.language_model."), ("visual.", "model.visual."))


def spellings(name: str) -> list[str]:
    """``name`` and its other spelling (hub <-> transformers 5), hub first."""
    found = [name]
    for hub, v5 in ALIASES:
        if name.startswith(v5):
            found.append(hub + name[len(v5) :])
        elif name.startswith(hub) and not name.startswith(v5):
            found.append(v5 + name[len(hub) :])
    return found


class Tensors(Protocol):
    """What the builder reads weights from."""

    source: str

    def __contains__(self, name: object) -> bool: ...

    def get(self, name: str) -> np.ndarray: ...

    def rows(self, name: str, index: np.ndarray) -> np.ndarray: ...

    def nbytes(self) -> int: ...


class _Named:
    """Name resolution shared by the sources: ``names`` holds the stored spellings."""

    source = ""
    names: set[str]

    def _stored(self, name: str) -> str | None:
        return next((n for n in spellings(name) if n in self.names), None)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._stored(name) is not None

    def _require(self, name: str) -> str:
        stored = self._stored(name)
        if stored is None:
            raise WeightsError(
                f"{self.source}: no weight {name!r} (nor {spellings(name)[1:]}) in the checkpoint"
            )
        return stored


class SafetensorsFolder(_Named):
    """The ``*.safetensors`` shards of a folder (with or without ``model.safetensors.index.json``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.source = str(self.folder)
        safetensors = require("safetensors", "reading checkpoint shards")
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {k: self.folder / v for k, v in weight_map.items()}
        else:
            self.files = {}
            for shard in sorted(self.folder.glob("*.safetensors")):
                with safetensors.safe_open(str(shard), framework="pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), shard))
        if not self.files:
            raise WeightsError(f"{self.folder}: no *.safetensors weights found")
        self.names = set(self.files)
        self._safetensors = safetensors

    def get(self, name: str) -> np.ndarray:
        stored = self._require(name)
        with self._safetensors.safe_open(str(self.files[stored]), framework="pt") as f:
            tensor = f.get_tensor(stored)
            if tensor.dtype.is_floating_point and tensor.element_size() < 4:
                # widening makes a fresh tensor: hand it over as it is (one float32 copy in memory)
                widened: np.ndarray = tensor.float().numpy()
                return widened
            # float32 as stored: a private copy, nothing may point into the mapping once it closes
            return np.array(tensor.numpy(), np.float32, copy=True)

    def stored(self, name: str) -> Any:
        """The tensor as a torch tensor in its stored dtype (bfloat16 stays bfloat16: half the
        memory of ``get`` for a reference that widens it a chunk at a time)."""
        stored = self._require(name)
        with self._safetensors.safe_open(str(self.files[stored]), framework="pt") as f:
            return f.get_tensor(stored)

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """``get(name)[index]`` reading only those rows (a check of a 150 000-row table)."""
        stored = self._require(name)
        flat = np.asarray(index, np.int64).ravel()
        with self._safetensors.safe_open(str(self.files[stored]), framework="pt") as f:
            table = f.get_slice(stored)
            picked = [np.array(table[int(i) : int(i) + 1].float().numpy(), np.float32) for i in flat]
        return np.concatenate(picked).reshape(*np.shape(index), *picked[0].shape[1:])

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self._require(name)
        with self._safetensors.safe_open(str(self.files[stored]), framework="pt") as f:
            return tuple(f.get_slice(stored).get_shape())

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))


class StateDict(_Named):
    """Tensors of a model in memory (``model.state_dict()``: torch tensors, or numpy arrays)."""

    def __init__(self, tensors: Mapping[str, Any], source: str = "state dict") -> None:
        self.tensors, self.source = dict(tensors), source
        self.names = set(self.tensors)

    def get(self, name: str) -> np.ndarray:
        value = self.tensors[self._require(name)]
        if hasattr(value, "detach"):
            value = value.detach().float().numpy()
        return np.array(value, np.float32, copy=True)

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        return self.get(name)[np.asarray(index, np.int64)]

    def nbytes(self) -> int:
        return sum(int(np.prod(tuple(v.shape))) * 4 for v in self.tensors.values())
