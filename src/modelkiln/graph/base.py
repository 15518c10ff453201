"""Pass infrastructure: a pass is a small class whose ``rewrite(model)`` returns how many rewrites it
made; ``call`` wraps that into onnx-ir's ``PassResult(model, modified)``."""

from __future__ import annotations

import abc
import logging

import onnx_ir as ir

log = logging.getLogger(__name__)


class GraphPass(ir.passes.InPlacePass):
    """Base of our passes. ``targets`` says which ``--target`` values may run it."""

    name: str = "?"
    targets: frozenset[str] = frozenset({"portable", "ort"})

    def __init__(self) -> None:
        super().__init__()
        self.last_rewrites = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.last_rewrites = self.rewrite(model)
        return ir.passes.PassResult(model, modified=self.last_rewrites > 0)

    @abc.abstractmethod
    def rewrite(self, model: ir.Model) -> int:
        """Apply the rewrite everywhere it is provably safe; return the number of rewrites."""

    @staticmethod
    def skip(node: ir.Node, reason: str) -> None:
        """'Did not match' is a return value with a reason, logged at debug level."""
        log.debug("%s: skip %s (%s)", node.name, node.op_type, reason)
