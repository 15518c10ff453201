"""The deploy report: ``report.md`` and a self-contained ``report.html`` (images inlined) holding the
same figures as ``summary.json``, with plots a person would rather look at than read."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from modelkiln._deps import require
from modelkiln.deploy.summary import BatchFigures, DeploySummary, PrecisionFigures


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _batch(p: PrecisionFigures, batch: int, key: str) -> float | None:
    figures: BatchFigures | None = p.bench.get(batch)
    return None if figures is None else float(getattr(figures, key))


def table_rows(summary: DeploySummary) -> tuple[list[str], list[list[str]]]:
    """One row per precision: task metric, agreement, latency, throughput, size."""
    precisions = summary.image_precisions()
    task_keys = sorted({k for p in precisions.values() for k in (p.task or {})})
    head = [
        "precision",
        *task_keys,
        "cosine vs FP32",
        "top-1 agree",
        "b1 p50 ms",
        "b1 p99 ms",
        "b8 p50 ms",
        "b8 p99 ms",
        "b8 items/s",
        "size MB",
    ]
    rows = []
    for name, p in precisions.items():
        agree = p.agreement
        rows.append(
            [
                name,
                *(_fmt((p.task or {}).get(k)) for k in task_keys),
                _fmt(agree.first_cosine if agree else None, 5),
                _fmt(agree.first_top1 if agree else None, 3),
                *(_fmt(_batch(p, n, k), 2) for n in (1, 8) for k in ("p50_ms", "p99_ms")),
                _fmt(_batch(p, 8, "throughput"), 1),
                _fmt(p.size_mb, 2),
            ]
        )
    return head, rows


def _plots(summary: DeploySummary, out: Path) -> dict[str, Path]:
    mpl = require("matplotlib", "deploy report plots")
    mpl.use("Agg")
    plt = require("matplotlib.pyplot", "deploy report plots")
    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    plots: dict[str, Path] = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    precisions = summary.image_precisions()
    for name, p in precisions.items():
        y = p.first_task_metric if p.task else (p.agreement.first_cosine if p.agreement else None)
        x = _batch(p, 8, "p50_ms")
        if x is not None and y is not None:
            ax.scatter([x], [y], s=60)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4))
    first = next(iter(precisions.values()), PrecisionFigures())
    metric = next(iter(first.task or {}), "cosine vs FP32")
    ax.set_xlabel("latency p50 at batch 8 (ms)")
    ax.set_ylabel(metric)
    ax.set_title("accuracy vs latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plots["accuracy_vs_latency"] = folder / "accuracy_vs_latency.png"
    fig.savefig(plots["accuracy_vs_latency"], dpi=110)
    plt.close(fig)
    before = summary.optimize.get("before", {}).get("ops", {})
    after = summary.optimize.get("after", {}).get("ops", {})
    if before:
        ops = sorted(set(before) | set(after), key=lambda o: -before.get(o, 0))[:20]
        fig, ax = plt.subplots(figsize=(8, 4))
        xs = range(len(ops))
        ax.bar([x - 0.2 for x in xs], [before.get(o, 0) for o in ops], width=0.4, label="exported")
        ax.bar([x + 0.2 for x in xs], [after.get(o, 0) for o in ops], width=0.4, label="optimized")
        ax.set_xticks(list(xs), ops, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("nodes")
        ax.set_title("op histogram before / after optimisation")
        ax.legend()
        fig.tight_layout()
        plots["op_histogram"] = folder / "op_histogram.png"
        fig.savefig(plots["op_histogram"], dpi=110)
        plt.close(fig)
    int8 = precisions.get("int8")
    layers = int8.agreement.layers if int8 is not None and int8.agreement is not None else None
    if layers is not None:
        plots["int8_layer_snr"] = Path(layers.plot)
    return plots


def _kept_float(summary: DeploySummary) -> list[tuple[str, str]]:
    return sorted((summary.int8.get("kept_float") or {}).items())


def machine_lines(summary: DeploySummary) -> list[str]:
    """The CPU the figures were measured on and the INT8 format the file states (INT8 numerics and
    speed depend on both)."""
    lines = [f"measured on: {summary.cpu.get('description', 'unknown')}"]
    fmt = summary.int8_format
    if fmt is not None:
        needs = "runs on any CPU" if fmt.requires == "" else f"needs {fmt.requires}"
        asked = f"; asked --cpu {fmt.requested}" if fmt.requested else ""
        lines.append(
            f"INT8 format: {fmt.format} (weights {fmt.weights}, activations {fmt.activations}; {needs}{asked})"
        )
    return lines


def write_reports(summary: DeploySummary, out: Path) -> dict[str, str]:
    """``report.md`` and ``report.html`` (plots inlined) in ``out``; returns their paths by kind."""
    plots = _plots(summary, out)
    head, rows = table_rows(summary)
    md = [f"# Deployment report: {summary.model}", ""]
    md += [
        f"- zoo: {summary.zoo or '–'}, task: {summary.task or '–'}",
        *[f"- {line}" for line in machine_lines(summary)],
        *[f"- {n}" for n in summary.notes],
        "",
    ]
    md += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "## Plots", ""]
    md += [f"![{name}](plots/{p.name})" for name, p in plots.items()]
    kept = _kept_float(summary)
    md += ["", f"## Layers kept in float ({len(kept)})", ""]
    md += [f"- `{n}`: {why}" for n, why in kept] or ["- none"]
    budget = summary.int8.get("budget")
    if budget:
        md += [
            "",
            (
                f"Accuracy budget: {budget['metric_name']} drop ≤ {budget['max_drop']}: final "
                f"{budget['metric']:.4f} vs FP32 {budget['baseline']:.4f}, {budget['int8_fraction']:.0%} of layers int8."
            ),
        ]
    md += ["", "## Stages", "", *[f"- {k}: {v:.1f} s" for k, v in summary.stages.items()]]
    md += ["", "## Reproduce", "", "```bash", summary.command or f"kiln deploy {summary.model}", "```", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html(summary, head, rows, plots, kept))
    return {"report_md": str(out / "report.md"), "report_html": str(out / "report.html")}


def _html(
    summary: DeploySummary,
    head: list[str],
    rows: list[list[str]],
    plots: dict[str, Path],
    kept: list[tuple[str, str]],
) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>kiln deploy report</title>",
        (
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            "img{max-width:100%}</style></head><body>"
        ),
        f"<h1>Deployment report: {e(summary.model)}</h1>",
        f"<p>zoo: {e(summary.zoo or '–')}, task: {e(summary.task or '–')}</p>",
        *[f"<p>{e(line)}</p>" for line in machine_lines(summary)],
        *[f"<p>{e(n)}</p>" for n in summary.notes],
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>",
        *["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows],
        "</table><h2>Plots</h2>",
    ]
    for name, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h3>{e(name)}</h3><img alt='{e(name)}' src='data:image/png;base64,{data}'>")
    parts.append(f"<h2>Layers kept in float ({len(kept)})</h2><ul>")
    parts += [f"<li><code>{e(n)}</code>: {e(why)}</li>" for n, why in kept] or ["<li>none</li>"]
    parts.append(
        "</ul><h2>Reproduce</h2><pre>" + e(summary.command or f"kiln deploy {summary.model}") + "</pre>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)
