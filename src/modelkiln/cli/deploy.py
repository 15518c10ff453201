"""``kiln deploy MODEL_OR_ONNX -o OUT``: export, optimize, quantize, compare, evaluate, bench, and
write a serve-ready repository, a Triton repository and a report."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.table import Table

from modelkiln.deploy import DeployOptions, DeploySummary, deploy
from modelkiln.deploy.report import machine_lines, table_rows
from modelkiln.log import console, err_console


def deploy_cmd(
    model: str = typer.Argument("efficientnet_lite0", help="Zoo name or ONNX file."),
    out: Path = typer.Option(Path("deploy"), "-o", "--out", help="Output folder."),
    weights: str = typer.Option(None, "--weights", help="Weights for zoo models (default: the zoo's)."),
    calib: Path = typer.Option(
        None, "--calib", help="Calibration images or .npz feeds (default: built-in sample)."
    ),
    eval_data: Path = typer.Option(None, "--eval", help="Labelled evaluation data for task metrics."),
    labels: Path = typer.Option(None, "--labels", help="Labels for --eval (CSV or COCO JSON)."),
    precision: str = typer.Option(
        "fp32,fp16,int8", "--precision", help="Precisions to build, comma-separated."
    ),
    max_drop: float = typer.Option(None, "--max-drop", help="INT8 accuracy budget (needs --eval)."),
    target: str = typer.Option("cpu", "--target", help="cpu or trt (INT8 activation format)."),
    cpu: str = typer.Option(
        "portable",
        "--cpu",
        help="INT8 format: portable (exact on every CPU), u8, vnni (needs VNNI/AMX or ARM64), "
        "native (this CPU's); see kiln quantize --help.",
    ),
    bench_seconds: float = typer.Option(
        3.0, "--bench-seconds", help="Timed seconds per precision and batch."
    ),
    eval_limit: int = typer.Option(None, "--eval-limit", help="At most this many evaluation images."),
    sign_key: Path = typer.Option(
        None, "--sign-key", help="Ed25519 private key (PEM, from kiln keygen): sign the manifest."
    ),
    encrypt_key: Path = typer.Option(
        None, "--encrypt-key", help="AES-256 key file (from kiln keygen): encrypt the served models."
    ),
) -> None:
    """Take a model to a served, verified deployment and report what each precision gains and costs."""
    opts = DeployOptions(
        model,
        out,
        weights,
        calib,
        eval_data,
        labels,
        tuple(p.strip() for p in precision.split(",") if p.strip()),
        max_drop,
        target,
        bench_seconds,
        eval_limit=eval_limit,
        cpu=cpu,
        sign_key=sign_key,
        encrypt_key=encrypt_key,
        command="kiln deploy " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
    )
    with err_console.status("deploying…") as status:
        summary = deploy(opts, status=lambda text: status.update(text))
    if summary.is_chat:
        return _print_chat(summary, out)
    head, rows = table_rows(summary)
    table = Table(title=f"{summary.model}: deployment")
    for h in head:
        table.add_column(h, justify="left" if h == "precision" else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    for line in machine_lines(summary):
        console.print(line, markup=False)
    for note in summary.notes:
        console.print(note, style="yellow")
    written = [out / f for f in ("report.html", "report.md", "summary.json", "manifest.json")]
    console.print("wrote " + ", ".join(str(p) for p in written if p.is_file()))
    if (out / "manifest.json").is_file():  # sealed (dual-encoder deployments are not, yet)
        console.print(f"check it on the target: kiln verify {out}")
    key = f" --model-key {encrypt_key}" if encrypt_key else ""
    triton = f"   (Triton: {out / 'triton'})" if (out / "triton").is_dir() else ""
    console.print(f"serve it: kiln serve {out / 'repository'}{key}{triton}")


def _print_chat(summary: DeploySummary, out: Path) -> None:
    """The chat-model deployment: speed and INT8 quality per precision."""
    table = Table(title=f"{summary.model}: deployment")
    for h in ("precision", "decoder MB", "first token ms", "decode tok/s", "cosine vs fp32", "top-1 agree"):
        table.add_column(h, justify="left" if h == "precision" else "right")
    for name, p in summary.chat_precisions().items():
        b, q = p.bench, p.quality
        table.add_row(
            name,
            str(p.size_mb if p.size_mb is not None else ""),
            str(b.ttft_ms_median if b else ""),
            str(b.decode_tok_s_median if b else ""),
            f"{q.logit_cosine_mean:.5f}" if q else "-",
            f"{q.top1_agreement:.1%}" if q else "-",
        )
    console.print(table)
    for note in summary.notes:
        console.print(note, style="yellow")
    console.print(f"wrote {out / 'report.md'}, {out / 'summary.json'}")
    console.print(f"serve it: kiln serve {out / 'repository'}   (POST /v1/chat/completions)")
