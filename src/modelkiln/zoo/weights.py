"""How a ``--weights`` string is read: ``random``, a local file, or a named release."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def is_random(weights: str | None) -> bool:
    return weights is not None and weights.strip().lower() == "random"


def is_path(weights: str) -> bool:
    """True when ``weights`` names a file (existing or clearly meant as one), not a release name."""
    return Path(weights).exists() or "/" in weights or "\\" in weights or weights.endswith(_FILE_SUFFIXES)


def warn_random(model: str) -> None:
    log.warning("%s: random-initialised weights; outputs are meaningless except for testing", model)
