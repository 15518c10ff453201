"""``kiln``: entry point, global options, and the one place errors become exit codes."""

from __future__ import annotations

import logging
import sys

import click
import typer
from rich.markup import escape

from modelkiln.cli import bench as bench_cmd
from modelkiln.cli import chat as chat_cmd
from modelkiln.cli import compare as compare_cmd
from modelkiln.cli import deploy as deploy_cmd
from modelkiln.cli import encrypt as encrypt_cmd
from modelkiln.cli import evaluate as evaluate_cmd
from modelkiln.cli import export as export_cmd
from modelkiln.cli import feeds as feeds_cmd
from modelkiln.cli import finetune as finetune_cmd
from modelkiln.cli import optimize as optimize_cmd
from modelkiln.cli import predict as predict_cmd
from modelkiln.cli import quantize as quantize_cmd
from modelkiln.cli import repo as repo_cmd
from modelkiln.cli import verify as verify_cmd
from modelkiln.errors import KilnError, MissingDependency
from modelkiln.log import configure_logging, err_console

#: Third-party modules of the optional `serve` extra: without them every other command still works.
_SERVE_EXTRA = {"starlette", "uvicorn", "prometheus_client", "h11", "anyio"}
try:
    from modelkiln.cli import serve as serve_cmd
except ImportError as _exc:  # pragma: no cover - exercised in an install without the serve extra
    if (_exc.name or "").split(".")[0] not in _SERVE_EXTRA:
        raise
    serve_cmd = None  # type: ignore[assignment]

app = typer.Typer(
    name="kiln",
    help="modelkiln: export, optimize, quantize, compare, bench, serve, deploy and verify neural networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"verbose": False}


@app.callback()
def _global(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging and full tracebacks."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    _state["verbose"] = verbose
    configure_logging(verbose=verbose, quiet=quiet)


app.command("export")(export_cmd.export)
app.command("predict")(predict_cmd.predict)
app.command("bench")(bench_cmd.bench)
app.command("optimize")(optimize_cmd.optimize_cmd)
app.command("quantize")(quantize_cmd.quantize_cmd)
app.command("compare")(compare_cmd.compare_cmd)
app.command("evaluate")(evaluate_cmd.evaluate_cmd)
app.command("feeds")(feeds_cmd.feeds_cmd)
app.command("finetune")(finetune_cmd.finetune_cmd)
if serve_cmd is not None:
    app.command("serve")(serve_cmd.serve_cmd)
else:  # pragma: no cover

    @app.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def _serve_missing() -> None:
        """Serve models over HTTP (needs the serve extra)."""
        raise MissingDependency("starlette", "serve", "kiln serve")


app.command("deploy")(deploy_cmd.deploy_cmd)
app.command("chat")(chat_cmd.chat_cmd)
app.command("verify")(verify_cmd.verify_cmd)
app.command("encrypt")(encrypt_cmd.encrypt_cmd)
app.command("keygen")(encrypt_cmd.keygen_cmd)
app.add_typer(repo_cmd.app, name="repo")


def main() -> None:
    """Run the CLI; a KilnError is one red line and exit code 1 (traceback only with --verbose)."""
    try:
        code = app(standalone_mode=False)
    except KilnError as exc:
        if _state["verbose"]:
            logging.getLogger("modelkiln").exception("failed")
        # escaped: messages quote install commands such as pip install 'modelkiln[grpc]'
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
