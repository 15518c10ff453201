"""Random feeds from a model's input metadata: benchmarks, parity checks and warm-up share them."""

from __future__ import annotations

import numpy as np

from modelkiln.errors import BadInput
from modelkiln.runtime.backends.base import TensorMeta


def synthesize_feed(
    inputs: list[TensorMeta], batch: int, shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs from metadata: ``shapes`` fixes a whole input's shape; otherwise the first
    symbolic dim is the batch and any other symbolic dim must be given in ``shapes``."""
    rng = np.random.default_rng(seed)
    shapes = shapes or {}
    feed = {}
    for meta in inputs:
        if meta.name in shapes:
            shape = shapes[meta.name]
        else:
            shape = tuple(
                d if isinstance(d, int) else batch if i == 0 else -1 for i, d in enumerate(meta.shape)
            )
            if -1 in shape:
                raise BadInput(
                    f"input '{meta.name}' has symbolic dims {meta.describe()}; give its shape with "
                    f"--shape {meta.name}:{'x'.join(str(d) if d != -1 else 'N' for d in shape)}"
                )
        dtype = np.dtype(meta.dtype)
        if dtype.kind == "f":
            feed[meta.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feed[meta.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            feed[meta.name] = rng.integers(0, 100, shape).astype(dtype)
    return feed
