"""Lazy import of optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from modelkiln.errors import MissingDependency

_EXTRA = {
    "torch": "export",
    "torchvision": "export",
    "open_clip": "export",
    "transformers": "export",
    "pycocotools": "eval",
    "matplotlib": "eval",
    "PIL": "genai",
    "jinja2": "genai",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise MissingDependency saying which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingDependency(top, _EXTRA.get(top, "all"), purpose) from exc
