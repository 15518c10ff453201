"""``kiln quantize``: INT8 QDQ with our calibrators and placement."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from modelkiln.errors import ConfigError
from modelkiln.log import console, err_console
from modelkiln.quant.config import Method, PerChannel, PerTensor, QuantConfig, Target
from modelkiln.quant.quantize import quantize


def _enum(kind: type, value: str, option: str):
    try:
        return kind(value)
    except ValueError as exc:
        raise ConfigError(f"{option} must be one of {[m.value for m in kind]}, got {value!r}") from exc


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
    int8_silu: bool = typer.Option(
        False, "--int8-silu", help="Run SiLU (Sigmoid, Mul) in int8 too: faster, less exact."
    ),
    smoothquant: float = typer.Option(
        None, "--smoothquant", help="SmoothQuant alpha in [0, 1] (0.5 is usual): tame activation outliers."
    ),
    weight_only: bool = typer.Option(
        False, "--weight-only", help="int8 weights only, float activations; needs no --calib."
    ),
    transformer: bool = typer.Option(
        None,
        "--transformer/--no-transformer",
        help="Transformer defaults (residual Adds, attention MatMuls float); detected when not given.",
    ),
    int8_attention: bool = typer.Option(
        False, "--int8-attention", help="Also quantize attention MatMuls (Q@K^T, P@V) in transformers."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration batch size."),
    json_out: Path = typer.Option(None, "--json", help="Write the summary as JSON."),
) -> None:
    """Calibrate on real inputs and write an INT8 QDQ model that runs on ONNX Runtime and TensorRT."""
    config = QuantConfig(
        method=_enum(Method, method, "--method"),
        percentile=percentile,
        weights=PerTensor() if per_tensor else PerChannel(0),
        target=_enum(Target, target, "--target"),
        exclude=tuple(exclude),
        int8_silu=int8_silu,
        transformer=transformer,
        int8_attention=int8_attention,
        smoothquant=smoothquant,
        weight_only=weight_only,
    )
    with Progress(
        TextColumn("calibrating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("calibrate", total=None)
        result = quantize(
            source,
            out,
            calib,
            zoo_name,
            config,
            calib_size,
            batch_size,
            progress=lambda n: bar.advance(task, n),
        )
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
    for node, reason in result.kept_float.items():
        console.print(f"kept float: {node}: {reason}", highlight=False)
    if result.smoothed:
        kinds = sorted(set(result.smoothed.values()))
        counts = ", ".join(f"{sum(v == k for v in result.smoothed.values())} {k}" for k in kinds)
        console.print(f"SmoothQuant: {len(result.smoothed)} tensors smoothed ({counts})")
    console.print(
        f"size {result.size_before / 1e6:.2f} MB -> {result.size_after / 1e6:.2f} MB; wrote [bold]{out}[/]"
    )
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=1))
