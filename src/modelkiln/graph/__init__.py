"""Graph optimisation: our passes over onnx-ir, a pass manager, and a static memory planner."""

from modelkiln.graph.optimize import OptimizeResult, optimize

__all__ = ["OptimizeResult", "optimize"]
