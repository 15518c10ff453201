"""The default optimisation pipeline: one explicit tuple, in the order the passes run."""

from __future__ import annotations

from collections.abc import Sequence

from modelkiln.errors import ConfigError
from modelkiln.graph.base import GraphPass
from modelkiln.graph.passes.collapse_reshapes import CollapseReshapes
from modelkiln.graph.passes.cse import CommonSubexpressions
from modelkiln.graph.passes.eliminate_noops import EliminateNoOps
from modelkiln.graph.passes.fold_constants import FoldConstants
from modelkiln.graph.passes.fuse_conv_affine import FuseConvAffine
from modelkiln.graph.passes.fuse_conv_bn import FuseConvBatchNorm
from modelkiln.graph.passes.fuse_gelu_ort import FuseGeluOrt
from modelkiln.graph.passes.fuse_matmul_add import FuseMatMulAdd
from modelkiln.graph.passes.fuse_pad_conv import FusePadConv
from modelkiln.graph.passes.merge_parallel_linears import MergeParallelLinears
from modelkiln.graph.passes.remove_dead import RemoveDead
from modelkiln.graph.passes.simplify_shapes import SimplifyShapes

DEFAULT_PIPELINE: tuple[type[GraphPass], ...] = (
    FoldConstants,
    SimplifyShapes,
    EliminateNoOps,
    CollapseReshapes,
    FusePadConv,
    FuseConvBatchNorm,
    FuseConvAffine,
    MergeParallelLinears,
    FuseMatMulAdd,
    CommonSubexpressions,
    FuseGeluOrt,
    RemoveDead,
)
TARGETS = ("portable", "ort")


def pass_names() -> list[str]:
    return [p.name for p in DEFAULT_PIPELINE]


def build_pipeline(
    target: str = "portable", only: Sequence[str] | None = None, disable: Sequence[str] = ()
) -> list[GraphPass]:
    """Passes for ``target``; ``only`` picks and orders them by name, ``disable`` switches some off."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; choose from {TARGETS}")
    by_name = {p.name: p for p in DEFAULT_PIPELINE}
    unknown = [n for n in [*(only or ()), *disable] if n not in by_name]
    if unknown:
        raise ConfigError(f"unknown passes {unknown}; available: {pass_names()}")
    chosen = [by_name[n] for n in only] if only else list(DEFAULT_PIPELINE)
    return [cls() for cls in chosen if cls.name not in disable and target in cls.targets]
