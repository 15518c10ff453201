"""The model zoo: every family we export, with its pre/post-processing and the task it is scored on.

The families are one explicit table (``registry.FAMILIES``); importing the zoo imports no torch
(families load torch, open_clip and transformers only when they build). Importing it also gives
the torch backend its way from a zoo name or exported file to a torch module.
"""

from __future__ import annotations

from modelkiln.runtime.backends.torch import register_resolver
from modelkiln.zoo.base import (
    ImageTask,
    Part,
    Prepared,
    Task,
    TensorSpec,
    TextTask,
    ZooModel,
    as_image_task,
)
from modelkiln.zoo.reference import torch_model
from modelkiln.zoo.registry import (
    FAMILIES,
    Family,
    entry_from_metadata,
    export_metadata,
    family,
    get,
    input_image_size,
    names,
)

__all__ = [
    "FAMILIES",
    "Family",
    "ImageTask",
    "Part",
    "Prepared",
    "Task",
    "TensorSpec",
    "TextTask",
    "ZooModel",
    "as_image_task",
    "entry_from_metadata",
    "export_metadata",
    "family",
    "get",
    "input_image_size",
    "names",
]

register_resolver(torch_model)
