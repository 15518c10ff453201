"""``kiln compare``: two models, same inputs: per output, and per layer with --per-layer; either
side may run on another runtime (--backend / --reference-backend). With --task, both are scored on
a task metric instead (FP32 vs INT8 retrieval recall of two CLIP folders, top-1, mAP) and the drop
is shown."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from modelkiln import zoo as zoo_registry
from modelkiln.accuracy.compare import COLLAPSE_DB, CompareResult, compare, label, load_pair, plot_layers
from modelkiln.accuracy.evaluate import TaskComparison, compare_task
from modelkiln.data.feeds import batches, list_samples
from modelkiln.errors import ConfigError
from modelkiln.log import console, err_console
from modelkiln.runtime.backends.base import BackendKind
from modelkiln.zoo.base import Task

#: runtimes an ONNX file can be compared on (torch runs zoo modules, not files)
BACKENDS = (BackendKind.ONNXRUNTIME, BackendKind.TENSORRT)
DEFAULT_LIMIT = 32


def _kind(value: str, option: str) -> BackendKind:
    if value not in [k.value for k in BACKENDS]:
        raise ConfigError(f"{option} must be one of {[k.value for k in BACKENDS]}, got {value!r}")
    return BackendKind(value)


def compare_cmd(
    reference: Path = typer.Argument(..., help="Reference model (usually FP32)."),
    candidate: Path = typer.Argument(..., help="Model to check (FP16, INT8…)."),
    data: Path = typer.Option(
        ..., "--data", help="Images (with the zoo's preprocessing) or .npy/.npz files."
    ),
    zoo_name: str = typer.Option(
        None, "--zoo", help="Zoo family (read from the reference's metadata if absent)."
    ),
    limit: int = typer.Option(
        None, "--limit", help=f"At most this many samples (default {DEFAULT_LIMIT}; with --task: all)."
    ),
    per_layer: bool = typer.Option(False, "--per-layer", help="Compare every intermediate tensor by name."),
    backend: str = typer.Option(
        "onnxruntime", "--backend", help="Runtime of the candidate: onnxruntime or tensorrt."
    ),
    reference_backend: str = typer.Option(
        "onnxruntime", "--reference-backend", help="Runtime of the reference: onnxruntime or tensorrt."
    ),
    json_out: Path = typer.Option(None, "--json", help="Write the result as JSON."),
    plot: Path = typer.Option(None, "--plot", help="PNG of SNR per layer (with --per-layer)."),
    task: str = typer.Option(
        None,
        "--task",
        help="Score both on a task metric instead (retrieval for CLIP folders; classification, "
        "detection) and show the drop.",
    ),
    labels: Path = typer.Option(
        None, "--labels", help="With --task: the labels kiln evaluate takes (retrieval: captions)."
    ),
) -> None:
    """Max/mean abs error, cosine, SNR and top-k agreement per output; worst layers with --per-layer;
    with --task, both models' task metrics and the drop."""
    kinds = _kind(reference_backend, "--reference-backend"), _kind(backend, "--backend")
    if task is not None:
        with err_console.status(f"scoring both on {task}…"):
            scores = compare_task(reference, candidate, data, labels, task, zoo_name, limit, kinds)
        _print_task(scores)
        if json_out:
            json_out.write_text(json.dumps(scores.to_dict(), indent=1))
        return
    if labels is not None:
        raise ConfigError("--labels is for task metrics: give --task too")
    limit = DEFAULT_LIMIT if limit is None else limit
    pair = load_pair(reference, candidate, per_layer, *kinds)
    meta = pair.reference.metadata
    name = zoo_name or meta.get("modelkiln.zoo")
    entry = zoo_registry.get(name) if name else None
    if entry is not None:
        entry.configure(meta)
    inputs = [m.name for m in pair.reference.input_metadata]
    files = list_samples(data, limit)
    with err_console.status("comparing…"):
        result = compare(
            pair.reference,
            pair.candidate,
            batches(files, inputs, entry, 8),
            layers=pair.layers,
            classifier=entry is not None and entry.task == Task.CLASSIFICATION,
            names=(label(reference), label(candidate)),
        )
    _print(result, kinds)
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=1))
    if plot and per_layer:
        console.print(f"wrote {plot_layers(result, plot)}")


def _print(r: CompareResult, kinds: tuple[BackendKind, BackendKind]) -> None:
    on = f", {kinds[1].value} vs {kinds[0].value}" if kinds[0] != kinds[1] else ""
    table = Table(title=f"{Path(r.candidate).name} vs {Path(r.reference).name} ({r.samples} samples{on})")
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
        console.print(f"first layer below {COLLAPSE_DB:g} dB: {r.first_collapse or 'none'}")


def _print_task(r: TaskComparison) -> None:
    ref, cand = Path(r.reference.model).name, Path(r.candidate.model).name
    table = Table(title=f"{cand} vs {ref}: {r.task.value} on {r.reference.images} images")
    for col in ("metric", "reference", "candidate", "drop"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, value in r.reference.metrics.items():
        if key in r.drop:
            name = f"{key} (headline)" if key == r.metric else key
            table.add_row(name, f"{value:.4f}", f"{r.candidate.metrics[key]:.4f}", f"{r.drop[key]:+.4f}")
    console.print(table)
