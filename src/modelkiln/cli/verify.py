"""``kiln verify PACKAGE``: integrity, signature, host fit, golden outputs, determinism and (with
--soak) steady state of a sealed package on this machine. Exit status 0 only when all hold."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from modelkiln.delivery.findings import Status
from modelkiln.delivery.verify import VerifyReport, verify_package
from modelkiln.errors import ConfigError
from modelkiln.log import console, err_console
from modelkiln.runtime.backends.base import BackendKind

#: runtimes a package can be verified on
BACKENDS = (BackendKind.ONNXRUNTIME, BackendKind.TENSORRT)
_STYLE = {Status.PASS: "green", Status.FAIL: "bold red", Status.WARN: "yellow", Status.SKIP: "dim"}


def verify_cmd(
    package: Path = typer.Argument(..., help="Package folder (holds manifest.json), from kiln deploy."),
    backend: str = typer.Option("onnxruntime", "--backend", help="Runtime: onnxruntime or tensorrt."),
    threads: int = typer.Option(None, "--threads", min=1, help="Intra-op threads (default: every core)."),
    soak: float = typer.Option(0.0, "--soak", min=0.0, help="Seconds of steady-state running (0: none)."),
    json_out: Path = typer.Option(None, "--json", help="Write the report as JSON (for CI)."),
    public_key: Path = typer.Option(
        None, "--public-key", help="Ed25519 public key (PEM): the manifest signature is then required."
    ),
    model_key: Path = typer.Option(
        None,
        "--model-key",
        help="Key file of encrypted models (else $KILN_MODEL_KEY_FILE or $KILN_MODEL_KEY).",
    ),
) -> None:
    """Check that this machine runs a deploy package as it was built to run (hashes, signature, golden outputs).

    Every failure names the model, precision, check, what was expected and what came; the exit
    status is 0 only when everything holds."""
    if backend not in [k.value for k in BACKENDS]:
        raise ConfigError(f"--backend must be one of {[k.value for k in BACKENDS]}, got {backend!r}")
    with err_console.status("verifying…"):
        report = verify_package(package, backend, threads, soak, public_key, model_key)
    print_report(report)
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_dict(), indent=1))
        console.print(f"wrote {json_out}")
    if not report.ok:
        raise typer.Exit(1)


def print_report(report: VerifyReport) -> None:
    """The findings as a table, then one verdict line."""
    table = Table(title=f"kiln verify {report.package} ({report.backend})")
    for head in ("status", "check", "model", "precision", "what", "expected", "got"):
        table.add_column(head, overflow="fold")
    for f in report.findings:
        cells = (f.check, f.model or "", f.precision or "", f.message, f.expected or "", f.got or "")
        table.add_row(Text(f.status.value, style=_STYLE[f.status]), *(Text(c) for c in cells))
    console.print(table)
    console.print(f"built on: {report.build_machine}", markup=False)
    console.print(f"this host: {report.host}", markup=False)
    warnings = sum(f.status is Status.WARN for f in report.findings)
    if report.ok:
        console.print(
            f"[green]PASS[/]: {len(report.findings)} checks, {warnings} warnings, {report.seconds:.1f} s"
        )
    else:
        console.print(f"[bold red]FAIL[/]: {len(report.failures)} failed checks, {report.seconds:.1f} s")
        for f in report.failures:
            console.print(f"  {f.line()}", markup=False)
