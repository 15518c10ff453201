"""Issue 17: our LookupTable kernel (runtime/kernels, C) against ONNX Runtime's float path for the
same uint8 SiLU, per code path of the kernel.

On the same uint8 activation [N, C, H, W] (YOLOv5n-like shapes), one model each:
  float:          DequantizeLinear -> Sigmoid -> Mul -> QuantizeLinear (what QDQ with SiLU runs);
  lookup:         ai.modelkiln LookupTable with the exact 256-entry SiLU table, --threads threads
                  (tensors from 128 KiB up are split across ONNX Runtime's intra-op pool);
  lookup_1thread: the same on one thread, i.e. without the split (is splitting worth it?).
Timed in interleaved rounds (runtime.timing.interleaved, with a pause before each turn so the
previous session's spinning pool threads do not steal the next one's cores): median and min in ms.

Then "in_graph": one model that runs the float path and then the lookup on its output, as in a
network (the pool has just been busy, the input is warm), profiled by ONNX Runtime: per-node kernel
times, median and min over the runs, with --threads threads (lookup split) and with one.

KILN_KERNELS_ISA is read once per process, so each code path (scalar, avx2, avx512vbmi: those this
CPU has) is measured in its own child process, against the float path again each time.

    .venv/bin/python benchmarks/lookup_kernel.py [--isa all|auto|scalar|avx2|avx512vbmi]
        [--rounds 7] [--iterations 20] [--threads 2]

Prints one JSON line per (path, shape) and appends them to benchmarks/results/lookup_kernel.jsonl.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelkiln.bench.runner import machine_info
from modelkiln.runtime import kernels
from modelkiln.runtime.backends.base import Backend
from modelkiln.runtime.backends.onnxruntime import OrtBackend, OrtOptions, cpu_backend
from modelkiln.runtime.cpu import cpu_info
from modelkiln.runtime.timing import interleaved

RESULTS = Path(__file__).resolve().parent / "results" / "lookup_kernel.jsonl"
SHAPES = ((1, 16, 320, 320), (1, 32, 160, 160), (1, 64, 80, 80), (8, 32, 160, 160))
S_IN, Z_IN, S_OUT, Z_OUT = 0.05, 100, 0.04, 10  # typical post-conv activation ranges
#: CPU flags behind the kernel's code paths (runtime.cpu's INT8 list does not carry VBMI).
LOOKUP_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vbmi")


def silu_table() -> np.ndarray:
    """uint8 SiLU: quantize(silu(dequantize(q))) for q = 0..255, in float64, round half to even."""
    x = (np.arange(256, dtype=np.float64) - Z_IN) * S_IN
    y = x / (1.0 + np.exp(-x))
    table: np.ndarray = np.clip(np.rint(y / S_OUT) + Z_OUT, 0, 255).astype(np.uint8)
    return table


def _model(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], shape: tuple[int, ...], lookup: bool
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "silu",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, list(shape))],
        inits,
    )
    opsets = [helper.make_opsetid("", 17)]
    if lookup:
        opsets.append(helper.make_opsetid(kernels.DOMAIN, kernels.DOMAIN_VERSION))
    return helper.make_model(graph, opset_imports=opsets)


def _float_nodes(x: str, y: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("DequantizeLinear", [x, "s_in", "z_in"], ["f"]),
        helper.make_node("Sigmoid", ["f"], ["g"]),
        helper.make_node("Mul", ["f", "g"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "s_out", "z_out"], [y]),
    ]


def _float_inits() -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.array(S_IN, np.float32), "s_in"),
        numpy_helper.from_array(np.array(Z_IN, np.uint8), "z_in"),
        numpy_helper.from_array(np.array(S_OUT, np.float32), "s_out"),
        numpy_helper.from_array(np.array(Z_OUT, np.uint8), "z_out"),
    ]


def float_silu(shape: tuple[int, ...]) -> onnx.ModelProto:
    return _model(_float_nodes("x", "y"), _float_inits(), shape, lookup=False)


def lookup_silu(shape: tuple[int, ...]) -> onnx.ModelProto:
    table = numpy_helper.from_array(silu_table(), "table")
    node = helper.make_node(kernels.LOOKUP_OP, ["x", "table"], ["y"], domain=kernels.DOMAIN, name="silu")
    return _model([node], [table], shape, lookup=True)


def float_then_lookup(shape: tuple[int, ...]) -> onnx.ModelProto:
    """x -> float SiLU -> a -> LookupTable -> y: the lookup runs right after ONNX Runtime's ops."""
    table = numpy_helper.from_array(silu_table(), "table")
    node = helper.make_node(kernels.LOOKUP_OP, ["a", "table"], ["y"], domain=kernels.DOMAIN, name="silu")
    return _model([*_float_nodes("x", "a"), node], [*_float_inits(), table], shape, lookup=True)


def _timed_ms(backend: Backend, feed: dict[str, np.ndarray], iterations: int) -> list[float]:
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        backend.infer(feed)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _stats(times: list[float]) -> dict[str, float]:
    return {"median": round(float(np.median(times)), 4), "min": round(float(np.min(times)), 4)}


def in_graph_ms(
    shape: tuple[int, ...], x: np.ndarray, threads: int, runs: int
) -> dict[str, dict[str, float]]:
    """Per-node kernel times of float_then_lookup from ONNX Runtime's profiler: the float path's
    four nodes summed per run, and the lookup node."""
    with tempfile.TemporaryDirectory(prefix="kiln-lookup-") as tmp:
        options = OrtOptions(
            providers=("CPUExecutionProvider",), intra_op_threads=threads, profile_prefix=Path(tmp) / "p"
        )
        backend = OrtBackend.load(float_then_lookup(shape), options)
        for _ in range(runs + 3):
            backend.infer({"x": x})
        events = json.loads(backend.end_profiling().read_text())
    per_node: dict[str, list[float]] = defaultdict(list)  # node name -> its kernel time, per run
    lookup_nodes = set()
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per_node[e["name"]].append(e["dur"] / 1e3)
            if e["args"].get("op_name") == kernels.LOOKUP_OP:
                lookup_nodes.add(e["name"])
    warm = 3
    lookup = [t for n in lookup_nodes for t in per_node[n][warm:]]
    float_nodes = [per_node[n][warm:] for n in per_node if n not in lookup_nodes]
    floats = np.sum(np.asarray(float_nodes), axis=0)  # the float path's nodes summed, per run
    return {"float": _stats(list(floats)), "lookup": _stats(lookup)}


def measure(args: argparse.Namespace) -> list[dict[str, object]]:
    """Every shape on this process's code path (KILN_KERNELS_ISA as the parent set it)."""
    isa = kernels.active_isa()
    machine = machine_info(args.threads)
    info = cpu_info()
    machine["lookup_flags"] = [f for f in LOOKUP_FLAGS if f in info.flags]
    machine["loadavg_1min_at_start"] = round(os.getloadavg()[0], 2)  # the machine is shared: was it busy?
    table = silu_table()
    rows = []
    for shape in SHAPES:
        x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        backends = {
            "float": cpu_backend(float_silu(shape), threads=args.threads),
            "lookup": cpu_backend(lookup_silu(shape), threads=args.threads),
            "lookup_1thread": cpu_backend(lookup_silu(shape), threads=1),
        }
        feed = {"x": x}
        outs = {k: b.infer(feed)["y"] for k, b in backends.items()}
        jobs = {k: functools.partial(_timed_ms, b, feed, args.iterations) for k, b in backends.items()}
        turns = interleaved(jobs, args.rounds, settle_s=args.settle)
        lat = {k: _stats([t for turn in v for t in turn]) for k, v in turns.items()}
        graph = {
            f"{t}_threads": in_graph_ms(shape, x, t, args.iterations * 2) for t in sorted({args.threads, 1})
        }
        want = table[x]
        nbytes = int(np.prod(shape))
        split = graph[f"{args.threads}_threads"]["lookup"]["median"]
        rows.append(
            {
                "bench": "lookup_kernel",
                "isa": isa,
                "shape": list(shape),
                "bytes": nbytes,
                "threads": args.threads,
                "ms": lat,
                "in_graph_ms": graph,
                "speedup_vs_float": round(lat["float"]["median"] / lat["lookup"]["median"], 1),
                "in_graph_speedup_vs_float": round(
                    graph[f"{args.threads}_threads"]["float"]["median"] / split, 1
                ),
                "split_gain": round(lat["lookup_1thread"]["median"] / lat["lookup"]["median"], 2),
                "in_graph_split_gain": round(graph["1_threads"]["lookup"]["median"] / split, 2),
                "lookup_gb_per_s": round(2 * nbytes / (lat["lookup"]["median"] * 1e-3) / 1e9, 1),
                "lookup_equals_table": bool(np.array_equal(outs["lookup"], want)),
                "float_equals_table": float(np.mean(outs["float"] == want)),
                "machine": machine,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--isa", default="all", choices=("all", "auto", *kernels.ISAS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settle", type=float, default=0.02, help="pause (s) before each timed turn")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not kernels.available():
        sys.exit("the kernel library is not built: pip install -e . where a C compiler works")
    if args.child:
        for row in measure(args):
            print(json.dumps(row), flush=True)
        return
    isas = list(kernels.cpu_isas()) if args.isa == "all" else [args.isa]
    RESULTS.parent.mkdir(exist_ok=True)
    for isa in isas:
        cmd = [sys.executable, __file__, "--child", "--rounds", str(args.rounds)]
        cmd += [
            "--iterations",
            str(args.iterations),
            "--threads",
            str(args.threads),
            "--settle",
            str(args.settle),
        ]
        env = {**os.environ, kernels.ISA_ENV: isa}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"{isa}: failed\n{out.stderr}", file=sys.stderr)
            continue
        for line in out.stdout.splitlines():
            print(line)
            with RESULTS.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
