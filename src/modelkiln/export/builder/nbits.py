"""8-bit weights for ONNX Runtime's MatMulNBits (com.microsoft), packed straight from a torch
``Linear`` weight [N, K] while the graph is built, in output-channel chunks so a large matrix (the
LM head) never needs more than a chunk of scratch memory.

The arithmetic and the choice of block are the weight-only INT8 path's own: both call
``quantmath`` (``pack_int8_rows``, ``default_block``: symmetric int8 per (output channel, block of
K), stored +128 as uint8, scales float32, K padded with zeros to whole blocks), so a W8 build and an
FP32 build quantized by ``kiln quantize --weight-only --kernel matmulnbits`` are the same bytes
(tests/export/test_qwen_builder.py and tests/export/test_builder_w8.py check it).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from modelkiln.quantmath import default_block, pack_int8_rows, per_channel_block

#: Output channels packed per chunk: bounds the float32 scratch of one chunk to chunk x block x 4 B.
CHUNK = 4096
#: ``block_size`` asking for the first builder's layout: one block covering K, padded to a power of
#: two (kept to measure against and to rebuild old exports bit for bit).
PER_CHANNEL = -1


def resolve_block(block_size: int, k: int) -> int:
    """The block a linear layer of input size ``k`` is packed with: 0 -> ``default_block``,
    ``PER_CHANNEL`` -> ``per_channel_block``, else ``block_size`` as given."""
    if block_size == 0:
        return default_block(k)
    if block_size == PER_CHANNEL:
        return per_channel_block(k)
    return block_size


def pack_chunks(w_nk: np.ndarray, block: int, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``pack_int8_rows`` over ``chunk`` output channels at a time (per-channel packing is row-local, so
    the chunks concatenate to the whole)."""
    for start in range(0, w_nk.shape[0], chunk):
        yield pack_int8_rows(np.asarray(w_nk[start : start + chunk], np.float32), block)
