"""Run passes to a fixed point, verifying the model after every pass that changed it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from modelkiln.errors import PassError
from modelkiln.graph.base import GraphPass

try:  # a private helper of onnx-ir: checks without serialising large initializers
    from onnx_ir.passes.common._c_api_utils import call_onnx_api
except ImportError:  # moved: verify() checks the whole model instead
    call_onnx_api = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


@dataclass
class PipelineReport:
    """Rewrites per pass (summed over steps) and how many steps ran."""

    rewrites: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    reached_fixed_point: bool = False


class PassManager:
    """Runs ``passes`` in order, repeatedly, until none changes the model or ``max_steps`` runs."""

    def __init__(self, passes: Sequence[GraphPass], max_steps: int = 8, verify: bool = True) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.passes, self.max_steps, self.verify = list(passes), max_steps, verify

    def run(self, model: ir.Model) -> PipelineReport:
        report = PipelineReport(rewrites={p.name: 0 for p in self.passes})
        for step in range(1, self.max_steps + 1):
            report.steps = step
            changed = False
            for p in self.passes:
                result = p(model)
                if result.modified:
                    changed = True
                    report.rewrites[p.name] += p.last_rewrites
                    log.debug("step %d: %s made %d rewrites", step, p.name, p.last_rewrites)
                    if self.verify:
                        verify(model, p.name)
            if not changed:
                report.reached_fixed_point = True
                break
        return report


def verify(model: ir.Model, after: str) -> None:
    """onnx.checker and strict shape inference; a failure names the pass that broke the model.

    Large initializers are presented as graph inputs for the check (onnx-ir's helper), so the
    weights are not serialised after every pass.
    """

    def check(proto: onnx.ModelProto) -> None:
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)

    try:
        if call_onnx_api is None:
            check(ir.to_proto(model))
        else:
            call_onnx_api(check, model)
    except Exception as exc:
        raise PassError(f"pass {after} produced an invalid model: {str(exc).splitlines()[0][:300]}") from exc
