"""The Qwen2-VL decoder step alone to ONNX, from any (e.g. resized) transformers model: what the
benchmarks time against transformers' generate. ``kiln export qwen2-vl…`` writes it with the token
embedding and the vision buckets through the zoo family (and checks parity); the graph is the same
(``zoo.qwen_vl.decoder_part``: one graph for prefill and decode, last-position logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelkiln._deps import require
from modelkiln.zoo.base import Part
from modelkiln.zoo.qwen_vl import decoder_example, decoder_part, decoder_step_module


def export_decoder_step(model: Any, path: str | Path, opset: int = 17) -> Part:
    """Write the decoder step of a transformers Qwen2-VL model to ``path``; returns its I/O."""
    torch = require("torch", "exporting the Qwen2-VL decoder step")
    part = decoder_part(model.model.language_model.config)
    example = decoder_example(part, batch=1, seq=5, past=3, seed=0)
    with torch.no_grad():
        torch.onnx.export(
            decoder_step_module(model),
            tuple(torch.from_numpy(example[s.name]) for s in part.inputs),
            str(path),
            input_names=[s.name for s in part.inputs],
            output_names=[s.name for s in part.outputs],
            dynamic_axes=part.dynamic_axes(),
            opset_version=opset,
            dynamo=False,
        )
    return part
