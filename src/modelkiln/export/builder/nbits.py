"""8-bit weights for ONNX Runtime's MatMulNBits (com.microsoft), packed straight from a torch
``Linear`` weight [N, K] while the graph is built, in output-channel chunks so a large matrix (the
LM head) never needs more than a chunk of scratch memory.

The arithmetic is the weight-only INT8 path's own (``quant/matmul_nbits.pack_int8_blocks``:
symmetric int8 per (output channel, block of K), stored +128 as uint8, scales float32, K padded
with zeros to whole blocks); the builder cannot import quant (a later room), so it is restated
here and tests/export/test_qwen_builder.py checks the two bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

#: MatMulNBits' accuracy level 4: int8 activations inside the kernel (quant/matmul_nbits.py says why).
ACCURACY_INT8 = 4
#: Output channels packed per chunk: bounds the float32 scratch of one chunk to chunk x block x 4 B.
CHUNK = 4096


def per_channel_block(k: int) -> int:
    """The smallest power-of-two block (>= 16) covering all of K: one scale per output channel
    (what the weight-only path writes)."""
    return max(16, 1 << (k - 1).bit_length())


def pack_rows(w_nk: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of the rows of ``w_nk`` [N, K] (one row per output channel) per block of K:
    (B [N, blocks, block] uint8, scales [N, blocks] float32)."""
    n, k = w_nk.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float32)
    padded[:, :k] = w_nk
    grouped = padded.reshape(n, blocks, block)
    scale = np.abs(grouped).max(axis=2) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(grouped / scale[..., None]), -127, 127).astype(np.int16) + 128
    return q.astype(np.uint8), scale


def pack_chunks(w_nk: np.ndarray, block: int, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``pack_rows`` over ``chunk`` output channels at a time (per-channel packing is row-local, so
    the chunks concatenate to the whole)."""
    for start in range(0, w_nk.shape[0], chunk):
        yield pack_rows(np.asarray(w_nk[start : start + chunk], np.float32), block)
