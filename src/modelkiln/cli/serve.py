"""``kiln serve REPO``: every model of a repository behind a KServe v2 HTTP API."""

from __future__ import annotations

from pathlib import Path

import typer


def serve_cmd(
    repository: Path = typer.Argument(
        ..., help="Model repository: <model>/config.yaml, <model>/<version>/model.onnx."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    cores: int = typer.Option(None, "--cores", help="Cores the inference threads may use (default: all)."),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body accepted (MB)."),
    allow_cpu_mismatch: bool = typer.Option(
        False,
        "--allow-cpu-mismatch",
        help="Serve INT8 models this CPU cannot run exactly (e.g. VNNI format without VNNI) instead of refusing them.",
    ),
) -> None:
    """Serve many models in one process (dynamic batching, priorities, Prometheus /metrics)."""
    from modelkiln.serve.http import serve

    serve(str(repository), host, port, cores, int(max_body_mb * (1 << 20)), allow_cpu_mismatch)
