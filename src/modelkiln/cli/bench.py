"""``kiln bench``: latency percentiles and throughput per batch size and concurrency."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from modelkiln.bench.plot import plot_results
from modelkiln.bench.runner import BenchResult, LoopSpec, benchmark, machine_info
from modelkiln.delivery.crypto import model_source, resolve_model_key
from modelkiln.errors import BadInput
from modelkiln.log import console, err_console
from modelkiln.runtime.backends import BackendKind, load_backend
from modelkiln.runtime.backends.onnxruntime import OrtOptions
from modelkiln.runtime.feeds import synthesize_feed


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise BadInput(f"{what} must be comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise BadInput(f"{what} must be positive integers, got {text!r}")
    return values


def _shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for spec in specs:
        name, _, dims = spec.rpartition(":")
        try:
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError as exc:
            raise BadInput(f"--shape must look like name:1x3x224x224, got {spec!r}") from exc
        if not name:
            raise BadInput(f"--shape must look like name:1x3x224x224, got {spec!r}")
    return shapes


def bench(
    model: Path = typer.Argument(..., help="ONNX model file."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime or tensorrt."),
    batch: str = typer.Option("1", "--batch", help="Batch sizes, e.g. 1,8."),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads (ONNX Runtime)."),
    concurrency: str = typer.Option("1", "--concurrency", help="Concurrent callers, e.g. 1,2,4."),
    warmup: int = typer.Option(10, "--warmup", help="Untimed calls before measuring."),
    iterations: int = typer.Option(None, "--iterations", help="Timed calls per caller (default 100)."),
    duration: float = typer.Option(None, "--duration", help="Measure for this many seconds instead."),
    shape: list[str] = typer.Option([], "--shape", help="Fix an input's shape: name:1x3x224x224."),
    json_out: Path = typer.Option(None, "--json", help="Write a JSON array, one object per configuration."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG of latency percentiles and throughput."),
    model_key: Path = typer.Option(
        None,
        "--model-key",
        help="Key file for an encrypted model (default: KILN_MODEL_KEY_FILE or KILN_MODEL_KEY).",
    ),
) -> None:
    """Latency min/mean/median/p90/p95/p99 and throughput for every batch × concurrency."""
    loop = LoopSpec(warmup=warmup, iterations=None if duration else (iterations or 100), duration=duration)
    options = OrtOptions(intra_op_threads=threads) if backend == BackendKind.ONNXRUNTIME else None
    runner = load_backend(model_source(model, resolve_model_key(model_key)), backend, options)
    fixed = _shapes(shape)
    results = []
    machine = machine_info(threads)
    for b in _ints(batch, "--batch"):
        feed = synthesize_feed(runner.input_metadata, b, fixed)
        for c in _ints(concurrency, "--concurrency"):
            with err_console.status(f"batch {b}, concurrency {c}…"):
                result = benchmark(runner, feed, b, c, loop)
            result.machine = machine
            results.append(result)
    console.print(f"CPU: {machine['cpu_description']}", markup=False)
    _print(results)
    if json_out:
        json_out.write_text(json.dumps([r.to_dict() for r in results], indent=1))
        console.print(f"wrote {json_out}")
    if plot:
        console.print(f"wrote {plot_results(results, plot)}")


def _print(results: list[BenchResult]) -> None:
    table = Table(title=f"{results[0].model} on {results[0].backend}" if results else "bench")
    for col in ("batch", "conc.", "calls", "min", "mean", "median", "p90", "p95", "p99", "items/s"):
        table.add_column(col, justify="right")
    for r in results:
        lat = r.latency_ms
        table.add_row(
            str(r.batch),
            str(r.concurrency),
            str(r.iterations),
            *(f"{lat[k]:.2f}" for k in ("min", "mean", "median", "p90", "p95", "p99")),
            f"{r.throughput:.1f}",
        )
    console.print(table)
    console.print("latencies in ms per call; items/s = batch × calls / wall time")
