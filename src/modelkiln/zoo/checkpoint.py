"""Load PyTorch checkpoints without executing arbitrary code.

A ``.pt`` file is a pickle: loading it the ordinary way can run any code its author chose. Plain
state_dicts load through ``torch.load(weights_only=True)``. Full-model checkpoints (YOLOv5 saves
``{'model': Model}``) need the classes of the code that wrote them; here every module class under a
known prefix becomes an inert placeholder that only records its attributes, tensors are rebuilt by
torch's own rebuild functions, and any other global (``os.system``, ``builtins.eval``, …) is refused.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import logging
import pickle
import types
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln._deps import require
from modelkiln.errors import ModelNotFound, WeightsError

log = logging.getLogger(__name__)

#: Globals rebuilt for real: tensor/storage reconstruction and plain containers and arrays.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Size"),
    ("torch", "device"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}
_TORCH_DTYPES = {"float16", "float32", "float64", "bfloat16", "int8", "uint8", "int32", "int64", "bool"}

#: Module prefixes whose classes become inert placeholders (the training code's own classes).
_PLACEHOLDER_PREFIXES = ("models.", "utils.", "torch.nn.modules.", "ultralytics.")


class Inert:
    """Stand-in for a class we refuse to import: keeps the pickled state as plain attributes."""

    kiln_class = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.kiln_args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["kiln_state"] = state

    def __repr__(self) -> str:
        return f"<inert {self.kiln_class}>"


_placeholder_cache: dict[str, type] = {}


def _placeholder(module: str, name: str) -> type:
    qual = f"{module}.{name}"
    if qual not in _placeholder_cache:
        _placeholder_cache[qual] = type(name, (Inert,), {"kiln_class": qual})
    return _placeholder_cache[qual]


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles carry Python 2 names (__builtin__, commands…): translate as pickle does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            module = module.replace("numpy.core.", "numpy._core.") if _numpy2() else module
            return getattr(importlib.import_module(module), name)
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(importlib.import_module("torch"), name)
        if module.startswith(_PLACEHOLDER_PREFIXES) or module in ("models.yolo", "models.common"):
            return _placeholder(module, name)
        raise pickle.UnpicklingError(f"refused global '{module}.{name}'")


def _numpy2() -> bool:
    return int(np.__version__.split(".")[0]) >= 2


restricted_pickle = types.ModuleType("modelkiln_restricted_pickle")
restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ModelNotFound(f"{what}: weights file not found: {path}")


def load_checkpoint(path: str | Path, what: str) -> Any:
    """Unpickle a torch checkpoint with module classes as inert placeholders; refuse anything else."""
    torch = require("torch", "loading PyTorch weights")
    path = Path(path)
    _check_file(path, what)
    try:
        return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{what}: {path} holds a pickle this loader will not open ({exc}); "
            "expected a state_dict or a checkpoint of the model's own training code"
        ) from exc
    except Exception as exc:  # zip/pickle corruption surfaces as many exception types
        raise WeightsError(f"{what}: {path} is corrupt or unreadable: {type(exc).__name__}: {exc}") from exc


def load_state_dict(path: str | Path, what: str) -> dict[str, Any]:
    """A state_dict from a plain torch.save file (tensors only, loaded with weights_only=True)."""
    torch = require("torch", "loading PyTorch weights")
    path = Path(path)
    _check_file(path, what)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"{what}: {path} is not a plain state_dict that loads with weights_only=True "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{what}: {path} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def module_tensors(module: Inert, prefix: str = "") -> dict[str, Any]:
    """Parameters and buffers of an unpickled module tree, keyed by dotted path like a state_dict."""
    out: dict[str, Any] = {}
    state = module.__dict__
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is not None:
                out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, Inert):
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def load_into(model: Any, state: dict[str, Any], what: str) -> None:
    """Load ``state`` into a torch module, failing with the first mismatching names and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{what}: weights do not fit the architecture: {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(wrong)} wrong shapes {wrong[:3]}"
        )
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False
    )
