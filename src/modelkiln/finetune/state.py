"""Checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A run's folder ``OUT`` holds ``final.safetensors`` (what ``kiln export --weights`` reads),
``history.json`` and ``history.png``; ``OUT/checkpoint/<phase>/`` holds, after every epoch,
``model.safetensors`` (the family's checkpoint state), ``optimizer.safetensors`` (Adam's moments
and step counts; its hyper-parameters in the file's metadata), ``anchor.safetensors`` (the
starting weights the L2-SP pull aims at) and ``state.json`` (options, data fingerprint, epoch,
history), written last: a checkpoint counts only once its ``state.json`` is there.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln._deps import require
from modelkiln.data.captions import CaptionSet
from modelkiln.errors import BadInput, WeightsError

if TYPE_CHECKING:
    import torch

STATE_VERSION = 1
FINAL = "final.safetensors"
HISTORY = "history.json"
PLOT = "history.png"
CHECKPOINTS = "checkpoint"


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` (contiguous, CPU) to ``path`` atomically (a temp file, then a rename)."""
    st = require("safetensors.torch", "writing checkpoints")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    st.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; WeightsError when it cannot be read."""
    safetensors = require("safetensors", "reading checkpoints")
    if not path.is_file():
        raise WeightsError(f"checkpoint file not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (safe_open is no dict)
    except Exception as exc:
        raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from exc


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Adam's state as flat tensors ``state.<param index>.<name>`` and its param groups as JSON."""
    import torch

    saved = optimizer.state_dict()
    tensors = {}
    for index, entries in saved["state"].items():
        for name, value in entries.items():
            tensors[f"state.{index}.{name}"] = (
                value if isinstance(value, torch.Tensor) else torch.tensor(value)
            )
    groups = [{k: v for k, v in g.items()} for g in saved["param_groups"]]
    return tensors, {"param_groups": json.dumps(groups)}


def load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, str]
) -> None:
    """Restore what ``optimizer_tensors`` wrote into an optimizer over the same parameters."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    try:
        groups = json.loads(meta["param_groups"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"optimizer checkpoint does not fit this run: {exc}") from exc


def fingerprint(*sets: CaptionSet | None) -> str:
    """SHA-256 of the image paths and captions of ``sets`` (a resumed run must see the same data)."""
    digest = hashlib.sha256()
    for s in sets:
        rows = [] if s is None else [[str(p), list(c)] for p, c in zip(s.images, s.captions, strict=True)]
        digest.update(json.dumps(rows).encode())
    return digest.hexdigest()


def read_state(folder: Path) -> dict[str, Any] | None:
    """A phase checkpoint's ``state.json`` (None when the phase never saved one)."""
    path = folder / "state.json"
    if not path.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot resume: {path} is not readable JSON ({exc})") from exc
    if data.get("version") != STATE_VERSION:
        raise BadInput(f"cannot resume: {path} has version {data.get('version')}, expected {STATE_VERSION}")
    return data
