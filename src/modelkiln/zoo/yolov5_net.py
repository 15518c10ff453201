"""The YOLOv5 v7.0 network in torch, built from the official yaml description.

Our own implementation: the module tree mirrors the official one (``model.N.cv1.conv.weight`` …) so
official checkpoints load by name; the Detect head decodes boxes with the same algebra as the
official export, so the ONNX output has the official layout ``[N, anchors*cells, 5 + nc]``.
Imported only at export time (needs torch).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU, 'same' padding for odd kernels."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.act(self.bn(self.conv(x)))
        return y


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with three convolutions."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))
        return y


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained max-pools instead of three parallel ones."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        y: torch.Tensor = self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))
        return y


class Concat(nn.Module):
    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class Detect(nn.Module):
    """Anchor-based head: per level a 1x1 conv, then sigmoid decode to pixel xywh, obj, classes."""

    anchors: torch.Tensor  # a registered buffer

    def __init__(self, nc: int, anchors: list[list[int]], ch: list[int], strides: list[float]) -> None:
        super().__init__()
        self.nc, self.no, self.nl, self.na = nc, nc + 5, len(anchors), len(anchors[0]) // 2
        self.stride = list(strides)
        grid_anchors = torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2)
        # Official checkpoints store anchors divided by their level's stride.
        self.register_buffer("anchors", grid_anchors / torch.tensor(strides).view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for i, x in enumerate(xs):
            x = self.m[i](x)
            bs, _, ny, nx = x.shape
            x = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            grid, anchor_grid = self._grid(i, nx, ny, x.dtype)
            xy, wh, conf = x.sigmoid().split((2, 2, self.nc + 1), 4)
            xy = (xy * 2 + grid) * self.stride[i]
            wh = (wh * 2) ** 2 * anchor_grid
            out.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.no))
        return torch.cat(out, 1)

    def _grid(self, i: int, nx: int, ny: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.na, ny, nx, 2)
        yv, xv = torch.meshgrid(torch.arange(ny, dtype=dtype), torch.arange(nx, dtype=dtype), indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid


def make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


class YOLOv5(nn.Module):
    """The layer list of a yaml description, run with its ``from`` wiring."""

    def __init__(self, cfg: dict[str, Any], ch: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        layers, self.froms, self.save = _parse(cfg, ch)
        self.model = nn.Sequential(*layers)

    def forward(self, x: Any) -> torch.Tensor:
        ys: list[Any] = []
        for m, f in zip(self.model, self.froms, strict=True):
            if f != -1:
                x = ys[f] if isinstance(f, int) else [x if j == -1 else ys[j] for j in f]
            x = m(x)
            ys.append(x if len(ys) in self.save else None)
        out: torch.Tensor = x
        return out


_BLOCKS = {"Conv": Conv, "C3": C3, "SPPF": SPPF}


def _parse(cfg: dict[str, Any], ch_in: int) -> tuple[list[nn.Module], list[Any], set[int]]:
    """Official parse_model semantics for the block types YOLOv5 v7.0 uses."""
    nc, gd, gw = cfg["nc"], cfg["depth_multiple"], cfg["width_multiple"]
    anchors = cfg["anchors"]
    ch: list[int] = [ch_in]
    layers: list[nn.Module] = []
    froms: list[Any] = []
    save: set[int] = set()
    for i, (f, n, name, args) in enumerate(cfg["backbone"] + cfg["head"]):
        n = max(round(n * gd), 1) if n > 1 else n
        module: nn.Module
        if name in _BLOCKS:
            c1, c2 = ch[f], make_divisible(args[0] * gw, 8)
            if name == "C3":
                module = C3(c1, c2, n, *args[1:])
            elif n == 1:
                module = _BLOCKS[name](c1, c2, *args[1:])
            else:
                module = nn.Sequential(
                    *(_BLOCKS[name](c1 if j == 0 else c2, c2, *args[1:]) for j in range(n))
                )
        elif name == "nn.Upsample":
            module, c2 = nn.Upsample(scale_factor=args[1], mode=args[2]), ch[f]
        elif name == "Concat":
            module, c2 = Concat(args[0]), sum(ch[x] for x in f)
        elif name == "Detect":
            strides = [8.0 * 2**k for k in range(len(f))]
            module, c2 = Detect(nc, anchors, [ch[x] for x in f], strides), 0
        else:
            raise ValueError(f"unsupported YOLOv5 block {name!r} at layer {i}")
        save.update(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(module)
        froms.append(f)
        ch = ch[1:] if i == 0 else ch
        ch.append(c2)
    return layers, froms, save
