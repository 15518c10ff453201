"""``kiln optimize``: our graph passes, with per-pass rewrites, op histogram, memory plan, parity."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from modelkiln.cli.bench import _shapes
from modelkiln.graph.optimize import OptimizeResult, optimize
from modelkiln.graph.pipeline import TARGETS, pass_names
from modelkiln.log import console, err_console


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()] if text else []


def optimize_cmd(
    source: Path = typer.Argument(..., help="ONNX model to optimise."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the optimised model."),
    target: str = typer.Option(
        "portable", "--target", help=f"One of {', '.join(TARGETS)}: 'ort' allows ONNX Runtime contrib ops."
    ),
    passes: str = typer.Option(
        None, "--passes", help=f"Comma-separated passes to run, in order: {', '.join(pass_names())}."
    ),
    disable: str = typer.Option(None, "--disable", help="Comma-separated passes to switch off."),
    shape: list[str] = typer.Option(
        [], "--shape", help="Input shape for parity and memory plan: name:1x3x224x224."
    ),
    report: bool = typer.Option(False, "--report", help="Full op histogram and the 5 largest live sets."),
    json_out: Path = typer.Option(None, "--json", help="Write the result as JSON."),
) -> None:
    """Optimise an ONNX model with our passes and prove its outputs unchanged."""
    if target not in TARGETS:
        raise typer.BadParameter(f"--target must be one of {TARGETS}, got {target!r}")
    with err_console.status(f"optimising {source}…"):
        result = optimize(
            source,
            out,
            target=target,
            passes=_names(passes) or None,
            disable=tuple(_names(disable)),
            shapes=_shapes(shape),
        )
    _print(result, report)
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=1))


def _print(r: OptimizeResult, report: bool) -> None:
    passes = Table(title=f"passes ({r.steps} steps, target {r.target})")
    passes.add_column("pass")
    passes.add_column("rewrites", justify="right")
    for name, n in r.rewrites.items():
        passes.add_row(name, str(n))
    console.print(passes)
    ops = Table(title=f"nodes {r.before.nodes} -> {r.after.nodes}")
    for col in ("op", "before", "after"):
        ops.add_column(col, justify="left" if col == "op" else "right")
    names = sorted(
        set(r.before.ops) | set(r.after.ops),
        key=lambda k: -max(r.before.ops.get(k, 0), r.after.ops.get(k, 0)),
    )
    for op in names if report else names[:12]:
        ops.add_row(op, str(r.before.ops.get(op, 0)), str(r.after.ops.get(op, 0)))
    console.print(ops)
    console.print(f"parameters: {r.before.param_bytes / 1e6:.2f} MB -> {r.after.param_bytes / 1e6:.2f} MB")
    for c in r.parity:
        console.print(
            f"parity {c.name}: max abs {c.max_abs:.2e} (limit {c.limit or 0.0:.2e}) "
            + ("[green]ok[/]" if c.passed else "[red]FAILED[/]")
        )
    if r.memory:
        m = r.memory
        console.print(
            f"activation memory: naive {m.naive_bytes / 1e6:.2f} MB, planned arena {m.planned_bytes / 1e6:.2f} MB "
            f"({m.saving:.0%} saved), peak live {m.peak_live_bytes / 1e6:.2f} MB"
        )
        if report:
            for s in m.largest_live_sets:
                largest = ", ".join(f"{n} {b / 1e6:.2f} MB" for n, b in s.largest)
                console.print(f"  step {s.step} ({s.node}): {s.bytes / 1e6:.2f} MB live; largest: {largest}")
    if r.output:
        console.print(f"wrote [bold]{r.output}[/]")
