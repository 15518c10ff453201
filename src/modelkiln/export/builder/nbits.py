"""8-bit weights for ONNX Runtime's MatMulNBits (com.microsoft), packed straight from a torch
``Linear`` weight [N, K] while the graph is built, in output-channel chunks so a large matrix (the
LM head) never needs more than a chunk of scratch memory.

The arithmetic is the weight-only INT8 path's own (``quant/matmul_nbits.pack_int8_blocks``:
symmetric int8 per (output channel, block of K), stored +128 as uint8, scales float32, K padded
with zeros to whole blocks), and so is the choice of block (``default_block``); the builder cannot
import quant (a later room), so both are restated here and tests/export/test_qwen_builder.py and
tests/export/test_builder_w8.py check the two bit for bit.

Why the block is no longer "one block covering K": MatMulNBits only takes power-of-two blocks, so
one scale per output channel meant K padded with zeros to the next power of two, and Qwen2-VL-2B's
K are 1536 and 8960: 1536 -> 2048 and 8960 -> 16384, a 2.25 GB W8 decoder where 1.54 GB holds the
weights, and the padded zeros are also read and multiplied on every step. The largest power-of-two
block dividing K (512 for 1536, 256 for 8960) stores exactly K values per row plus a few scales.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

#: MatMulNBits' accuracy level 4: int8 activations inside the kernel (quant/matmul_nbits.py says why).
ACCURACY_INT8 = 4
#: Output channels packed per chunk: bounds the float32 scratch of one chunk to chunk x block x 4 B.
CHUNK = 4096
#: The smallest block MatMulNBits accepts.
MIN_BLOCK = 16
#: ``block_size`` asking for the first builder's layout: one block covering K, padded to a power of
#: two (kept to measure against and to rebuild old exports bit for bit).
PER_CHANNEL = -1


def per_channel_block(k: int) -> int:
    """The smallest power-of-two block (>= 16) covering all of K: one scale per output channel,
    K zero-padded up to the block (the layout written before ``default_block``)."""
    return max(MIN_BLOCK, 1 << (k - 1).bit_length())


def padded_k(k: int, block: int) -> int:
    """K rounded up to whole blocks: the values per output channel a W8 matrix stores."""
    return -(-k // block) * block


def default_block(k: int) -> int:
    """The block that pads K least, the largest such (fewest scales): K itself when K is a power of
    two (one scale per output channel, as before), else the largest power-of-two divisor of K
    (1536 -> 512, 8960 -> 256); a K with no power-of-two divisor >= 16 (the vision patch embedding's
    1176 = 8 x 147) takes the block that pads it least (1176 -> 32, padded to 1184)."""
    best = MIN_BLOCK
    block = MIN_BLOCK
    while block <= per_channel_block(k):
        if padded_k(k, block) <= padded_k(k, best):
            best = block
        block *= 2
    return best


def resolve_block(block_size: int, k: int) -> int:
    """The block a linear layer of input size ``k`` is packed with: 0 -> ``default_block``,
    ``PER_CHANNEL`` -> ``per_channel_block``, else ``block_size`` as given."""
    if block_size == 0:
        return default_block(k)
    if block_size == PER_CHANNEL:
        return per_channel_block(k)
    return block_size


def pack_rows(w_nk: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of the rows of ``w_nk`` [N, K] (one row per output channel) per block of K:
    (B [N, blocks, block] uint8, scales [N, blocks] float32)."""
    n, k = w_nk.shape
    blocks = -(-k // block)
    if blocks * block == k:  # no padding: group the rows in place (no padded copy)
        grouped = np.asarray(w_nk, np.float32).reshape(n, blocks, block)
    else:
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
