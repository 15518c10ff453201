"""The child process of ``int8_cpu_formats.py accuracy``: run one built model with ONNX Runtime on
prepared inputs, dump its raw outputs, print one JSON line (natively or under qemu).

Kept apart from int8_cpu_formats.py so that it imports only ONNX Runtime and feed reading: under
qemu every import is emulated (~40-130x slower), and the parent's exporters, optimiser and
evaluation have no part in running a model. Scoring happens in the parent, natively.

    python benchmarks/int8_score.py --work DIR --model NAME --variant NAME --dump OUT [--feeds NPZ]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from modelkiln.data.feeds import model_feeds
from modelkiln.runtime.backends.onnxruntime import cpu_backend

THREADS = 2
MINILM = "all-minilm-l6-v2"
#: Integer ops whose weight input (index) decides u8 x s8 vs u8 x u8 kernels.
WEIGHT_INPUT = {
    "QLinearConv": 3,
    "QLinearMatMul": 3,
    "QGemm": 3,
    "MatMulInteger": 1,
    "ConvInteger": 1,
    "DynamicQuantizeMatMul": 1,
    "MatMulIntegerToFloat": 1,
    "QAttention": 1,
}


def ort_graph(path: str) -> dict:
    """What ONNX Runtime's optimizer made of the model on this CPU: op counts and, per integer op,
    whether its weights ended up s8 (u8 x s8 kernels) or u8 (u8 x u8 kernels). ONNX Runtime's own
    optimized-model dump is what is inspected here, so this opens a session directly."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        model = onnx.load(so.optimized_model_filepath)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    ops = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in model.graph.node
    )
    weights: Counter = Counter()
    names = {onnx.TensorProto.INT8: "s8", onnx.TensorProto.UINT8: "u8"}
    for n in model.graph.node:
        i = WEIGHT_INPUT.get(n.op_type)
        if i is not None and len(n.input) > i:
            weights[f"{n.op_type}:{names.get(inits.get(n.input[i], -1), 'runtime')}"] += 1
    interesting = {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "Conv",
        "MatMul",
        "Gemm",
        "com.microsoft:FusedConv",
        "com.microsoft:FusedMatMul",
        "com.microsoft.nchwc:Conv",
    }
    return {
        "integer_ops": dict(weights),
        "ops": {k: v for k, v in sorted(ops.items()) if k in interesting or k.split(":")[-1].startswith("Q")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--dump", type=Path, required=True)
    ap.add_argument("--feeds", type=Path, help="npz of prepared input batches (image models)")
    a = ap.parse_args()
    manifest = json.loads((a.work / "manifest.json").read_text())
    path = manifest[a.model]["variants"][a.variant]
    t = time.perf_counter()
    row: dict = {"model": a.model, "variant": a.variant}
    backend = cpu_backend(path, threads=THREADS)
    if a.model == MINILM:
        feeds = list(model_feeds(path, a.work / "minilm_eval", None, 1))
        np.save(a.dump, np.stack([next(iter(backend.infer(f).values()))[0] for f in feeds]))
        row["sentences"] = len(feeds)
    else:
        name = backend.input_metadata[0].name
        with np.load(a.feeds) as feeds:
            outs = [list(backend.infer({name: feeds[k]}).values()) for k in sorted(feeds.files)]
        names = [o.name for o in backend.output_metadata]
        np.savez(a.dump, **{n: np.concatenate([o[i] for o in outs]) for i, n in enumerate(names)})
        row["images_run"] = sum(len(o[0]) for o in outs)
    row["seconds"] = time.perf_counter() - t
    row["ort_graph"] = ort_graph(path)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
