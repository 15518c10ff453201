"""Qwen2-VL's multimodal rotary positions (M-RoPE) in numpy: text tokens count up on all three
axes; an image's tokens get (temporal, row, column) of its merged patch grid offset by the current
position, and the text after it continues from the image's largest extent."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np


def mrope_positions(
    token_types: Sequence[int], grids: Sequence[tuple[int, int, int]], merge: int
) -> tuple[np.ndarray, int]:
    """Positions [3, seq] for a prompt (type 0 text, 1 image per token) and the delta that later
    decode positions add to their sequence index."""
    parts, current = [], 0
    images = iter(grids)
    for kind, group in itertools.groupby(token_types):
        n = len(list(group))
        if kind == 0:
            parts.append(np.tile(np.arange(n) + current, (3, 1)))
            current += n
            continue
        t, h, w = next(images)
        lh, lw = h // merge, w // merge
        if t * lh * lw != n:
            raise ValueError(f"image with grid {(t, h, w)} needs {t * lh * lw} tokens, the prompt has {n}")
        grid = np.stack(
            [
                np.repeat(np.arange(t), lh * lw),
                np.tile(np.repeat(np.arange(lh), lw), t),
                np.tile(np.arange(lw), t * lh),
            ]
        )
        parts.append(grid + current)
        current += max(h, w) // merge
    positions = np.concatenate(parts, axis=1).astype(np.int64)
    return positions, int(positions.max() + 1 - positions.shape[1])
