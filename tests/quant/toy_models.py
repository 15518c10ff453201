"""Small torch models exported to ONNX for quantization tests: a pre-LN and a post-LN transformer
block with a planted activation outlier channel, and a chain of linears with one outlier layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN, HEADS, SEQ = 32, 4, 8


def _block(pre_ln: bool, outlier: float):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
            self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)
            with torch.no_grad():  # outlier channels, as trained transformers have them
                self.ln1.weight[3] *= outlier
                self.ln2.weight[5] *= outlier
                self.ln1.bias.normal_(0, 0.1)

        def attention(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            heads = lambda t: t.reshape(b, s, HEADS, -1).transpose(1, 2)
            q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
            p = torch.softmax(q @ k.transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5, dim=-1)
            return self.o((p @ v).transpose(1, 2).reshape(b, s, HIDDEN))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if pre_ln:
                x = x + self.attention(self.ln1(x))
                return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
            x = self.ln1(x + self.attention(x))
            return self.ln2(x + self.fc2(nn.functional.gelu(self.fc1(x))))

    torch.manual_seed(0)
    return Block().eval()


def export_block(path: Path, pre_ln: bool = True, outlier: float = 1.0) -> Path:
    """A transformer block, input x [batch, 8, 32] -> y, opset 17 (LayerNormalization op)."""
    import torch

    return _export(_block(pre_ln, outlier), torch.randn(1, SEQ, HIDDEN), path)


def _export(model, example, path: Path) -> Path:
    """x -> y with a dynamic batch axis, opset 17 (LayerNormalization is one op)."""
    import torch

    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def export_chain(path: Path, outlier_layer: int = 2, layers: int = 5, width: int = 16) -> Path:
    """x [batch, 16] -> linear -> GELU -> … ; the input of layer ``outlier_layer + 1`` has one
    channel 1000x larger than the rest (scaled in the producer, undone in the reader), so
    quantizing that input per tensor wipes out its other channels. GELU keeps every linear's
    output in float, so only the reading layer carries the damage."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    linears = [nn.Linear(width, width) for _ in range(layers)]
    with torch.no_grad():
        linears[outlier_layer - 1].weight[0] *= 1000
        linears[outlier_layer - 1].bias[0] = 1000 * linears[outlier_layer - 1].bias[0].abs()
        linears[outlier_layer].weight[:, 0] /= 1000
    seq = []
    for lin in linears:
        seq += [lin, nn.GELU()]
    return _export(nn.Sequential(*seq[:-1]).eval(), torch.randn(2, width), path)


def write_feeds(folder: Path, shape: tuple[int, ...], count: int, seed: int = 0) -> Path:
    """``count`` .npy samples of ``shape`` (batch dim 1 included)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.save(folder / f"{i:03d}.npy", rng.standard_normal(shape).astype(np.float32))
    return folder
