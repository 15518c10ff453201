"""Pad (constant zeros, spatial dims only) followed by Conv -> Conv with the padding in its ``pads``."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelkiln.graph.base import GraphPass
from modelkiln.ir_utils import attr_ints, const, is_op, remove, single_consumer


class FusePadConv(GraphPass):
    name = "fuse_pad_conv"

    def rewrite(self, model: ir.Model) -> int:
        count = 0
        for pad in list(model.graph):
            if not is_op(pad, "Pad") or pad.graph is None:
                continue
            conv = single_consumer(pad.outputs[0])
            if not is_op(conv, "Conv") or conv.inputs[0] is not pad.outputs[0]:
                continue
            extra = self._spatial_pads(pad)
            if extra is None:
                continue
            auto = conv.attributes.get("auto_pad")
            if auto is not None and auto.as_string() not in ("NOTSET", ""):
                continue
            spatial = len(extra) // 2
            current = attr_ints(conv, "pads", (0,) * (2 * spatial))
            merged = [a + b for a, b in zip(current, extra, strict=True)]
            conv.attributes["pads"] = ir.Attr("pads", ir.AttributeType.INTS, merged)
            conv.replace_input_with(0, pad.inputs[0])
            remove(pad)
            count += 1
        return count

    def _spatial_pads(self, pad: ir.Node) -> list[int] | None:
        """Conv-style pads [x1_begin, x2_begin, …, x1_end, …] if the Pad only zero-pads spatial dims."""
        mode = pad.attributes.get("mode")
        if mode is not None and mode.as_string() != "constant":
            return None
        if len(pad.inputs) > 3 and pad.inputs[3] is not None:
            return None  # explicit axes: keep it simple
        found: tuple[int, ...] | np.ndarray | None = (
            attr_ints(pad, "pads") if "pads" in pad.attributes else None  # opset < 11: attribute
        )
        if found is None:
            found = const(pad.inputs[1]) if len(pad.inputs) > 1 else None
        if found is None:
            return None
        value = const(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] is not None else np.zeros(1)
        if value is None or np.any(value != 0):
            return None
        pads = [int(p) for p in found]
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or any(begin[:2]) or any(end[:2]) or min(pads) < 0:
            return None
        return begin[2:] + end[2:]
