"""modelkiln: take neural networks to production from Python.

The public verbs, imported lazily so that ``import modelkiln`` stays light (no torch):
``optimize``, ``quantize``, ``compare``, ``evaluate``, ``benchmark``. Export is
``modelkiln.export.export``: the subpackage of that name owns the attribute ``modelkiln.export``
(Python sets it on import), so a top-level ``export`` function could not stay reliably callable.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_VERBS = {
    "optimize": ("modelkiln.graph", "optimize"),
    "quantize": ("modelkiln.quant.quantize", "quantize"),
    "compare": ("modelkiln.accuracy.compare", "compare"),
    "evaluate": ("modelkiln.accuracy.evaluate", "evaluate"),
    "benchmark": ("modelkiln.bench.runner", "benchmark"),
}
__all__ = ["__version__", "benchmark", "compare", "evaluate", "optimize", "quantize"]


def __getattr__(name: str) -> Any:
    if name in _VERBS:
        module, attr = _VERBS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'modelkiln' has no attribute {name!r}")
