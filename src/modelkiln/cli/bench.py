"""``kiln bench``: latency percentiles and throughput per batch size and concurrency."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from modelkiln.bench.plot import plot_results
from modelkiln.bench.profile import ProfileSummary, profile_model
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
    profile: bool = typer.Option(
        False, "--profile", help="Also run ONNX Runtime's profiler: time per op type and slowest nodes."
    ),
    profile_runs: int = typer.Option(20, "--profile-runs", help="Profiled runs per batch size."),
    profile_json: Path = typer.Option(None, "--profile-json", help="Write the profile summaries (JSON)."),
    profile_trace: Path = typer.Option(
        None, "--profile-trace", help="Keep ONNX Runtime's raw trace (Chrome trace JSON) here."
    ),
) -> None:
    """Latency min/mean/median/p90/p95/p99 and throughput for every batch × concurrency."""
    loop = LoopSpec(warmup=warmup, iterations=None if duration else (iterations or 100), duration=duration)
    profile = profile or profile_json is not None or profile_trace is not None
    if profile and backend != BackendKind.ONNXRUNTIME:
        raise BadInput(
            f"--profile reads ONNX Runtime's profiler and needs --backend onnxruntime, got --backend {backend}"
        )
    if profile and profile_runs < 1:
        raise BadInput(f"--profile-runs must be >= 1, got {profile_runs}")
    options = OrtOptions(intra_op_threads=threads) if backend == BackendKind.ONNXRUNTIME else None
    source = model_source(model, resolve_model_key(model_key))
    runner = load_backend(source, backend, options)
    fixed = _shapes(shape)
    batches = _ints(batch, "--batch")
    results = []
    profiles: list[tuple[int, ProfileSummary]] = []
    machine = machine_info(threads)
    for b in batches:
        feed = synthesize_feed(runner.input_metadata, b, fixed)
        for c in _ints(concurrency, "--concurrency"):
            with err_console.status(f"batch {b}, concurrency {c}…"):
                result = benchmark(runner, feed, b, c, loop)
            result.machine = machine
            results.append(result)
        if profile:
            trace = _trace_path(profile_trace, b, len(batches))
            with err_console.status(f"batch {b}: profiling {profile_runs} runs…"):
                profiles.append(
                    (b, profile_model(source, feed, profile_runs, warmup, options, keep_trace=trace))
                )
    console.print(f"CPU: {machine['cpu_description']}", markup=False)
    _print(results)
    for b, summary in profiles:
        _print_profile(summary, b)
    if json_out:
        json_out.write_text(json.dumps([r.to_dict() for r in results], indent=1))
        console.print(f"wrote {json_out}")
    if profile_json:
        rows = [{"batch": b, **s.to_dict(), "machine": machine} for b, s in profiles]
        profile_json.write_text(json.dumps(rows, indent=1))
        console.print(f"wrote {profile_json}")
    if plot:
        console.print(f"wrote {plot_results(results, plot)}")


def _trace_path(path: Path | None, batch: int, batches: int) -> Path | None:
    """Where batch ``batch``'s raw trace is kept: the path itself, or name-b<batch>.json per batch."""
    if path is None or batches == 1:
        return path
    return path.with_name(f"{path.stem}-b{batch}{path.suffix or '.json'}")


def _print_profile(s: ProfileSummary, batch: int) -> None:
    table = Table(title=f"{s.model}, batch {batch}: time per op type ({s.runs} profiled runs)")
    for col in ("op type", "ms/run", "%", "calls/run"):
        table.add_column(col, justify="left" if col == "op type" else "right")
    for op in s.op_types:
        table.add_row(op.op_type, f"{op.ms_per_run:.3f}", f"{100 * op.share:.1f}", f"{op.calls_per_run:g}")
    console.print(table)
    nodes = Table(title=f"{len(s.top_nodes)} slowest nodes")
    for col in ("node", "op type", "ms/run", "%"):
        nodes.add_column(col, justify="right" if col in ("ms/run", "%") else "left")
    for n in s.top_nodes:
        nodes.add_row(n.name, n.op_type, f"{n.ms_per_run:.3f}", f"{100 * n.share:.1f}")
    console.print(nodes)
    console.print(
        f"kernels {s.node_ms['median']:.3f} ms of model_run {s.run_ms['median']:.3f} ms per run (median; "
        f"min {s.node_ms['min']:.3f} / {s.run_ms['min']:.3f}); outside kernels {s.overhead_ms:.3f} ms "
        "per run (mean); timed under the profiler",
        markup=False,
    )
    if s.trace:
        console.print(f"trace: {s.trace}", markup=False)


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
