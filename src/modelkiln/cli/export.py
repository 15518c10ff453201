"""``kiln export``: zoo model -> ONNX with a parity report."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from modelkiln.export import export as export_model
from modelkiln.export.exporter import DEFAULT_OPSET
from modelkiln.log import console, err_console


def export(
    model: str = typer.Argument(
        ...,
        help="Zoo name: resnet50, efficientnet_lite0, yolov5n|s|m|l|x, clip-vit-b-32, all-minilm-l6-v2, "
        "qwen2-vl[-tiny], qwen2-vl-2b-random, qwen2.5-vl[-tiny].",
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Output .onnx file (a folder for multi-part models)."),
    weights: str = typer.Option(None, "--weights", "-w", help="Weights file, release name, or 'random'."),
    opset: int = typer.Option(DEFAULT_OPSET, "--opset", help="ONNX opset version."),
    image_size: int = typer.Option(
        None, "--image-size", help="Input height and width (model default if unset)."
    ),
    nms: bool = typer.Option(False, "--nms", help="Detectors: add NMS to the graph (end-to-end model)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the parity report as JSON."),
    precision: str = typer.Option(
        None,
        "--precision",
        help="Qwen-VL: language-model weights as fp32 (default), fp16, w8 (8-bit MatMulNBits: "
        "fastest decode), w8a8 (8-bit weights and per-token 8-bit activations through ONNX "
        "Runtime's int8 GEMM: faster prefill than fp32, also on AVX2-only CPUs), written directly "
        "by the graph builder.",
    ),
    block_size: int = typer.Option(
        0,
        "--block-size",
        help="Qwen-VL w8/w8a8: MatMulNBits block along K (power of two >= 16; 32 as llama.cpp's "
        "Q8_0: 2B logit cosine 0.997 vs 0.994, 11% more bytes); 0: the largest power of two dividing K.",
    ),
    vision_precision: str = typer.Option(
        None,
        "--vision-precision",
        help="Qwen-VL vision encoder: fp32 (default), fp16, w8 or w8a8 (per-token int8: 0.8x FP32's "
        "time on a 448x448 image on an AVX2 CPU, embedding cosine 0.9992).",
    ),
    kv_layout: str = typer.Option(
        None,
        "--kv-layout",
        help="Qwen-VL decoder's KV cache: shared (default: one buffer updated in place by ONNX "
        "Runtime's GroupQueryAttention, batched decode without copies) or concat (plain ONNX ops, "
        "any runtime).",
    ),
) -> None:
    """Export a zoo model to ONNX (dynamic batch) and check it against torch."""
    with err_console.status(f"exporting {model}…"):
        result = export_model(
            model,
            out,
            weights=weights,
            opset=opset,
            image_size=image_size,
            nms=nms,
            precision=precision,
            kv_layout=kv_layout,
            block_size=block_size,
            vision_precision=vision_precision,
        )
    table = Table(title=f"{result.model}: ONNX Runtime vs torch")
    for col in ("part", "output", "batch", "max abs", "max rel", "cosine", "ok"):
        table.add_column(col, justify="right" if col not in ("part", "output") else "left")
    for p in result.parity:
        table.add_row(
            p.part or "",
            p.name,
            str(p.batch),
            f"{p.max_abs:.2e}",
            f"{p.max_rel:.2e}",
            f"{p.cosine:.8f}",
            "[green]yes[/]" if p.passed else "[red]no[/]",
        )
    console.print(table)
    for part, path in result.files.items():
        console.print(f"wrote [bold]{path}[/] ({part})")
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=2))
