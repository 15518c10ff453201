"""``kiln compare``: two models, same inputs: per output, and per layer with --per-layer."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from modelkiln import zoo as zoo_registry
from modelkiln.accuracy.compare import CompareResult, compare, plot_layers
from modelkiln.log import console, err_console
from modelkiln.onnx_io import load_model
from modelkiln.quant.data import batches, list_samples
from modelkiln.quant.quantize import input_names
from modelkiln.runtime.session import model_metadata, ort_session


def compare_cmd(
    reference: Path = typer.Argument(..., help="Reference model (usually FP32)."),
    candidate: Path = typer.Argument(..., help="Model to check (FP16, INT8…)."),
    data: Path = typer.Option(
        ..., "--data", help="Images (with the zoo's preprocessing) or .npy/.npz files."
    ),
    zoo_name: str = typer.Option(
        None, "--zoo", help="Zoo family (read from the reference's metadata if absent)."
    ),
    limit: int = typer.Option(32, "--limit", help="At most this many samples."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Compare every intermediate tensor by name."),
    json_out: Path = typer.Option(None, "--json", help="Write the result as JSON."),
    plot: Path = typer.Option(None, "--plot", help="PNG of SNR per layer (with --per-layer)."),
) -> None:
    """Max/mean abs error, cosine, SNR and top-k agreement per output; worst layers with --per-layer."""
    proto = load_model(reference)
    meta = model_metadata(ort_session(reference))
    name = zoo_name or meta.get("modelkiln.zoo")
    entry = zoo_registry.get(name) if name else None
    if entry is not None:
        entry.configure(meta)
    inputs = input_names(proto)
    files = list_samples(data, limit)
    with err_console.status("comparing…"):
        result = compare(
            reference,
            candidate,
            batches(files, inputs, entry, 8),
            per_layer,
            classifier=entry is not None and entry.task == "classification",
        )
    _print(result)
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=1))
    if plot and per_layer:
        console.print(f"wrote {plot_layers(result, plot)}")


def _print(r: CompareResult) -> None:
    table = Table(title=f"{Path(r.candidate).name} vs {Path(r.reference).name} ({r.samples} samples)")
    for col in ("output", "max abs", "mean abs", "cosine", "SNR dB", "top-k agree"):
        table.add_column(col, justify="left" if col == "output" else "right")
    for o in r.outputs:
        agree = ", ".join(f"{k} {v:.1%}" for k, v in (o.topk_agreement or {}).items()) or "-"
        table.add_row(
            o.name, f"{o.max_abs:.3g}", f"{o.mean_abs:.3g}", f"{o.cosine:.5f}", f"{o.snr_db:.1f}", agree
        )
    console.print(table)
    if r.layers:
        worst = sorted(r.layers, key=lambda x: x.snr_db)[:15]
        lt = Table(title=f"{len(r.layers)} layers, worst 15 by SNR")
        for col in ("tensor", "SNR dB", "cosine", "max abs"):
            lt.add_column(col, justify="left" if col == "tensor" else "right")
        for layer in worst:
            lt.add_row(layer.name, f"{layer.snr_db:.1f}", f"{layer.cosine:.4f}", f"{layer.max_abs:.3g}")
        console.print(lt)
        console.print(f"first layer below {15:g} dB: {r.first_collapse or 'none'}")
