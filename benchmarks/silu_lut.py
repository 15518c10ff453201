"""Groundwork for issue 17: is a SiLU between two uint8 tensors faster as a 256-entry lookup in
standard ONNX ops than as ONNX Runtime runs it after QDQ (DequantizeLinear -> Sigmoid -> Mul ->
QuantizeLinear on float tensors), and is the lookup exact?

Three graphs on the same uint8 activation [1, C, H, W] (YOLOv5n-like shapes):
  float: DequantizeLinear -> Sigmoid -> Mul -> QuantizeLinear (what QDQ with SiLU in int8 runs);
  lut32: Cast(int32) -> Gather(table[256]) (standard ops only, any runtime);
  lut64: Cast(int64) -> Gather(table[256]).
The table is float SiLU of every dequantized input, then quantized with round-half-even and
saturation (the "float SiLU then quantize" reference, computed in float64).

    .venv/bin/python benchmarks/silu_lut.py [--rounds 7] [--iterations 20]

Prints one JSON line per shape (and appends them to benchmarks/results/silu_lut.jsonl).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelkiln.bench.runner import machine_info
from modelkiln.runtime.backends.onnxruntime import cpu_backend
from modelkiln.runtime.timing import interleaved_latency_ms

RESULTS = Path(__file__).resolve().parent / "results" / "silu_lut.jsonl"
S_IN, Z_IN, S_OUT, Z_OUT = 0.05, 100, 0.04, 10  # typical post-conv activation ranges


def silu_table(s_in: float, z_in: int, s_out: float, z_out: int) -> np.ndarray:
    """uint8 SiLU lookup: quantize(silu(dequantize(q))) for q = 0..255, exact in float64."""
    x = (np.arange(256, dtype=np.float64) - z_in) * s_in
    y = x / (1.0 + np.exp(-x))
    return np.clip(np.rint(y / s_out) + z_out, 0, 255).astype(np.uint8)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], shape: tuple[int, ...]) -> bytes:
    graph = helper.make_graph(
        nodes,
        "silu",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, list(shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def float_silu(shape: tuple[int, ...]) -> bytes:
    inits = [
        numpy_helper.from_array(np.array(S_IN, np.float32), "s_in"),
        numpy_helper.from_array(np.array(Z_IN, np.uint8), "z_in"),
        numpy_helper.from_array(np.array(S_OUT, np.float32), "s_out"),
        numpy_helper.from_array(np.array(Z_OUT, np.uint8), "z_out"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s_in", "z_in"], ["f"]),
        helper.make_node("Sigmoid", ["f"], ["g"]),
        helper.make_node("Mul", ["f", "g"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "s_out", "z_out"], ["y"]),
    ]
    return _model(nodes, inits, shape)


def lut_silu(shape: tuple[int, ...], index: int) -> bytes:
    table = numpy_helper.from_array(silu_table(S_IN, Z_IN, S_OUT, Z_OUT), "table")
    nodes = [
        helper.make_node("Cast", ["x"], ["i"], to=index),
        helper.make_node("Gather", ["table", "i"], ["y"], axis=0),
    ]
    return _model(nodes, [table], shape)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    machine = machine_info(args.threads)
    every = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    exact = {
        name: bool(
            np.array_equal(
                cpu_backend(m, threads=1).infer({"x": every})["y"],
                silu_table(S_IN, Z_IN, S_OUT, Z_OUT).reshape(every.shape),
            )
        )
        for name, m in (
            ("float", float_silu(every.shape)),
            ("lut32", lut_silu(every.shape, TensorProto.INT32)),
        )
    }
    for shape in ((1, 16, 320, 320), (1, 32, 160, 160), (1, 64, 80, 80), (8, 32, 160, 160)):
        models = {
            "float": float_silu(shape),
            "lut32": lut_silu(shape, TensorProto.INT32),
            "lut64": lut_silu(shape, TensorProto.INT64),
        }
        backends = {k: cpu_backend(m, threads=args.threads) for k, m in models.items()}
        x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        outs = {k: b.infer({"x": x})["y"] for k, b in backends.items()}
        lat = interleaved_latency_ms(backends, {"x": x}, args.rounds, args.iterations)
        row = {
            "bench": "silu_lut",
            "shape": list(shape),
            "ms": {k: {"median": round(v["median"], 3), "min": round(v["min"], 3)} for k, v in lat.items()},
            "speedup_lut32": round(lat["float"]["median"] / lat["lut32"]["median"], 2),
            "speedup_lut64": round(lat["float"]["median"] / lat["lut64"]["median"], 2),
            "lut_equals_float_path": float(np.mean(outs["lut32"] == outs["float"])),
            "exact_on_all_256": exact,
            "machine": machine,
        }
        line = json.dumps(row)
        print(line)
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
