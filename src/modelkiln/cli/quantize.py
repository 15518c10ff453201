"""``kiln quantize``: INT8 QDQ with our calibrators and placement; sensitivity analysis and the
accuracy-budget fallback (``--max-drop``)."""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from modelkiln.accuracy.budget import AccuracyBudget, BudgetResult, plot_sensitivity, within_budget
from modelkiln.errors import BadInput, ConfigError
from modelkiln.log import console, err_console
from modelkiln.quant.build import QuantizeResult
from modelkiln.quant.config import (
    CalibrationData,
    Int8Cpu,
    Method,
    PerChannel,
    PerTensor,
    QuantConfig,
    Target,
    WeightKernel,
)
from modelkiln.quant.mixed_precision import LayerSensitivity
from modelkiln.quant.quantizer import Quantizer
from modelkiln.runtime.cpu import cpu_info

E = TypeVar("E", bound=enum.Enum)


def _enum(kind: type[E], value: str, option: str) -> E:
    try:
        return kind(value)
    except ValueError as exc:
        raise ConfigError(f"{option} must be one of {[m.value for m in kind]}, got {value!r}") from exc


@contextlib.contextmanager
def _bars() -> Iterator[Callable[[str, int | None], Callable[[int], None]]]:
    """A factory of progress bars: each call adds one labelled bar and returns its advance()."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:

        def add(label: str, total: int | None) -> Callable[[int], None]:
            task = bar.add_task(label, total=total)
            return lambda n: bar.advance(task, n)

        yield add


def quantize_cmd(
    source: Path = typer.Argument(..., help="FP32 ONNX model."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the INT8 QDQ model."),
    calib: Path = typer.Option(
        None, "--calib", help="Folder of calibration images (with --zoo) or .npy/.npz tensors."
    ),
    zoo_name: str = typer.Option(None, "--zoo", help="Zoo family whose preprocessing the images get."),
    calib_size: int = typer.Option(100, "--calib-size", help="At most this many calibration samples."),
    method: str = typer.Option("percentile", "--method", help="entropy, minmax, percentile or mse."),
    percentile: float = typer.Option(99.999, "--percentile", help="For --method percentile."),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="Per-tensor instead of per-channel weights."),
    exclude: list[str] = typer.Option([], "--exclude", help="Node names to keep in float (repeatable)."),
    target: str = typer.Option(
        "cpu", "--target", help="cpu (ONNX Runtime integer kernels) or trt (TensorRT)."
    ),
    cpu: str = typer.Option(
        "portable",
        "--cpu",
        help="INT8 format: portable (int8 weights no kernel can overflow: exact and fast on every "
        "x86-64/ARM64 CPU), u8 (uint8 weights: exact everywhere, full weight resolution, slower), "
        "vnni (plain int8: needs AVX512-VNNI/AVX-VNNI/AMX or ARM64, saturates on AVX2-only CPUs) "
        "or native (vnni where this CPU has it, else portable).",
    ),
    int8_silu: bool = typer.Option(
        False,
        "--int8-silu",
        help="Quantize SiLU's Sigmoid and Mul separately (QLinearSigmoid/QLinearMul): less exact; "
        "by default SiLU between int8 convolutions runs as one exact lookup.",
    ),
    standard_ops: bool = typer.Option(
        False,
        "--standard-ops",
        help="Standard ONNX ops only: no modelkiln kernels (the exact int8 lookup for SiLU and other "
        "activations), for TensorRT and other runtimes.",
    ),
    smoothquant: float = typer.Option(
        None, "--smoothquant", help="SmoothQuant alpha in [0, 1] (0.5 is usual): tame activation outliers."
    ),
    weight_only: bool = typer.Option(
        False, "--weight-only", help="int8 weights only, float activations; needs no --calib."
    ),
    kernel: str = typer.Option(
        "dequantize",
        "--kernel",
        help="Weight-only kernel: dequantize (any runtime) or matmulnbits (ORT CPU, fast decoders).",
    ),
    block_size: int = typer.Option(
        0,
        "--block-size",
        help="matmulnbits: block along K (power of two >= 16; 32: finest, as llama.cpp's Q8_0); 0 is "
        "the largest power of two dividing K (one scale per output channel when K is a power of two).",
    ),
    dynamic: bool = typer.Option(
        False, "--dynamic", help="MatMul activations quantized per batch at run time (ORT CPU); no --calib."
    ),
    transformer: bool = typer.Option(
        None,
        "--transformer/--no-transformer",
        help="Transformer defaults (residual Adds, attention MatMuls float); detected when not given.",
    ),
    int8_attention: bool = typer.Option(
        False, "--int8-attention", help="Also quantize attention MatMuls (Q@K^T, P@V) in transformers."
    ),
    int8_ffn_down: bool = typer.Option(
        False,
        "--int8-ffn-down",
        help="Quantize every FFN down-projection in transformers (faster, less exact).",
    ),
    ffn_spread: float = typer.Option(
        8.0,
        "--ffn-spread",
        help="Transformers: an FFN down-projection stays float when its input's largest channel "
        "exceeds this multiple of the median one.",
    ),
    sensitivity: bool = typer.Option(
        False, "--sensitivity", help="Rank layers by the output error each causes alone (table + --plot)."
    ),
    max_drop: float = typer.Option(
        None, "--max-drop", help="Accuracy budget: return sensitive layers to float until the drop <= this."
    ),
    metric: str = typer.Option("cosine", "--metric", help="Budget metric: top1, map or cosine (vs FP32)."),
    eval_data: Path = typer.Option(None, "--eval", help="Data the budget is measured on."),
    labels: Path = typer.Option(
        None, "--labels", help="Labels for --eval (CSV for top1, COCO JSON for map)."
    ),
    min_int8: int = typer.Option(
        1, "--min-int8", help="Fail if the budget needs fewer int8 layers than this."
    ),
    sensitivity_samples: int = typer.Option(
        32, "--sensitivity-samples", help="Calibration samples the sensitivity ranking runs on."
    ),
    plot: Path = typer.Option(None, "--plot", help="PNG of layer sensitivity."),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration batch size."),
    json_out: Path = typer.Option(None, "--json", help="Write the summary as JSON."),
) -> None:
    """Calibrate on real inputs and write an INT8 QDQ model that runs on ONNX Runtime and TensorRT."""
    config = QuantConfig(
        method=_enum(Method, method, "--method"),
        percentile=percentile,
        weights=PerTensor() if per_tensor else PerChannel(0),
        target=_enum(Target, target, "--target"),
        cpu=_enum(Int8Cpu, cpu, "--cpu"),
        exclude=tuple(exclude),
        int8_silu=int8_silu,
        custom_kernels=not standard_ops,
        transformer=transformer,
        int8_attention=int8_attention,
        int8_ffn_down=int8_ffn_down,
        ffn_spread=ffn_spread,
        smoothquant=smoothquant,
        weight_only=weight_only,
        weight_kernel=_enum(WeightKernel, kernel, "--kernel"),
        block_size=block_size,
        dynamic=dynamic,
    )
    budget = None
    if max_drop is not None:
        if eval_data is None:
            raise BadInput("--max-drop needs --eval DIR: the data the accuracy drop is measured on")
        budget = AccuracyBudget(eval_data, max_drop, metric, labels, min_int8, sensitivity_samples)
    data = CalibrationData(calib, zoo_name, calib_size, batch_size)
    with _bars() as bars:
        quantizer = Quantizer(source, config, data, bars)
        if budget is not None:
            budgeted = within_budget(quantizer, budget, out)
        else:
            ranking = quantizer.sensitivity(samples=sensitivity_samples) if sensitivity else None
            result = quantizer.save(out)
    summary: dict[str, Any]
    if budget is not None:
        _print_budget(source, out, budgeted, budget, plot)
        summary = budgeted.to_dict()
    else:
        _print_result(source, out, result)
        summary = result.to_dict()
        if ranking is not None:
            _print_ranking(ranking, plot)
            summary = {"quantize": summary, "sensitivity": [vars(s) for s in ranking]}
    if json_out:
        json_out.write_text(json.dumps(summary, indent=1, default=float))


def _print_budget(
    source: Path, out: Path, result: BudgetResult, budget: AccuracyBudget, plot: Path | None
) -> None:
    metric = budget.metric
    _print_result(source, out, result.quantize, show_kept=False)
    if result.sensitivity:  # computed only when the full INT8 model missed the budget
        _print_ranking(result.sensitivity, plot, top=10)
    fb = result.fallback
    steps = Table(title=f"accuracy budget: {metric} drop <= {budget.max_drop:g} (FP32 {fb.baseline:.4f})")
    for col in ("layers in float", metric, "drop", "within"):
        steps.add_column(col, justify="right")
    for s in fb.steps:
        steps.add_row(
            str(s.float_layers), f"{s.metric:.4f}", f"{s.drop:+.4f}", "yes" if s.within_budget else "no"
        )
    console.print(steps)
    for name in fb.kept_float:
        console.print(f"kept float (budget): {name}", highlight=False)
    lat = result.latency_ms
    console.print(
        f"{metric} {fb.metric:.4f} (drop {fb.drop:.4f}); {len(fb.kept_float)} of {fb.quantizable} layers float, "
        f"{fb.int8_fraction:.0%} int8; latency (batch {result.latency_batch}) median fp32 {lat['fp32']['median']:.2f} ms, "
        f"full int8 {lat['int8']['median']:.2f} ms, chosen {lat['chosen']['median']:.2f} ms"
    )


def _print_ranking(ranking: list[LayerSensitivity], plot: Path | None, top: int = 15) -> None:
    table = Table(
        title=f"layer sensitivity (only that layer int8), worst {min(top, len(ranking))} of {len(ranking)}"
    )
    for col in ("layer", "op", "output SNR dB", "output cosine"):
        table.add_column(col, justify="left" if col in ("layer", "op") else "right")
    for s in ranking[:top]:
        table.add_row(s.name, s.op, f"{s.snr_db:.1f}", f"{s.cosine:.5f}")
    console.print(table)
    if plot:
        console.print(f"wrote {plot_sensitivity(ranking, plot)}")


def _print_result(source: Path, out: Path, result: QuantizeResult, show_kept: bool = True) -> None:
    table = Table(
        title=f"{source.name} -> {out.name} ({result.method}, target {result.target}, "
        f"{result.calibration_samples} samples)"
    )
    table.add_column("op")
    table.add_column("int8", justify="right")
    table.add_column("float", justify="right")
    for op in sorted(set(result.quantized_ops) | set(result.float_ops)):
        table.add_row(op, str(result.quantized_ops.get(op, 0)), str(result.float_ops.get(op, 0)))
    console.print(table)
    if show_kept:
        for node, reason in result.kept_float.items():
            console.print(f"kept float: {node}: {reason}", highlight=False)
    if result.smoothed:
        kinds = sorted(set(result.smoothed.values()))
        counts = ", ".join(f"{sum(v == k for v in result.smoothed.values())} {k}" for k in kinds)
        console.print(f"SmoothQuant: {len(result.smoothed)} tensors smoothed ({counts})")
    if result.lookups:
        chains = ", ".join(f"{n} {k}" for k, n in sorted(result.lookups.items()))
        console.print(
            f"activations kiln's runtime runs as exact int8 lookups: {chains} "
            "(the file is standard QDQ; --standard-ops turns this off)"
        )
    if result.int8_format:
        console.print(
            f"INT8 format: {result.int8_format}; this CPU: {cpu_info().describe()}", highlight=False
        )
    console.print(
        f"size {result.size_before / 1e6:.2f} MB -> {result.size_after / 1e6:.2f} MB; wrote [bold]{out}[/]"
    )
