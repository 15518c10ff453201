"""``kiln repo add``: build a model repository for ``kiln serve`` (and Triton) from ONNX files."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from modelkiln.errors import BadInput
from modelkiln.log import console
from modelkiln.runtime.backends.base import BackendKind
from modelkiln.serve.config import DynamicBatching, GenAIConfig, ModelConfig, ModelKind, dump_config
from modelkiln.serve.repository import GENAI_FILE, MODEL_FILE

app = typer.Typer(help="Build model repositories.", no_args_is_help=True)


@app.command("add")
def add(
    repository: Path = typer.Argument(..., help="Repository folder (created if missing)."),
    model: Path = typer.Argument(
        ..., help="ONNX model file, or a folder from `kiln export qwen2-vl…` (served as a chat model)."
    ),
    name: str = typer.Option(..., "--name", help="Model name in the repository."),
    version: int = typer.Option(None, "--version", help="Version number (default: next free)."),
    max_batch: int = typer.Option(0, "--max-batch", help="Largest batch (0: no batch axis)."),
    preferred: list[int] = typer.Option([], "--preferred-batch", help="Preferred batch sizes (repeatable)."),
    delay_us: int = typer.Option(None, "--max-queue-delay-us", help="Dynamic batching: longest wait (µs)."),
    instances: int = typer.Option(1, "--instances", help="Sessions running this model at once."),
    threads: int = typer.Option(1, "--threads", help="Intra-op threads per session."),
    priority: int = typer.Option(1, "--priority", help="0 most urgent … 2."),
    max_sequences: int = typer.Option(4, "--max-sequences", help="Chat models: sequences decoding at once."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Chat models: most tokens per answer."),
    decoder: str = typer.Option(None, "--decoder", help="Chat models: decoder file in the folder to serve."),
    vision_int8: bool = typer.Option(
        False,
        "--vision-int8",
        help="Chat models: serve the folder's weight-only INT8 vision encoder (vision.int8.onnx).",
    ),
    continuous: bool = typer.Option(
        True, "--continuous-batching/--no-continuous-batching", help="Chat models: decode sequences together."
    ),
    allow_cpu_mismatch: bool = typer.Option(
        False,
        "--allow-cpu-mismatch",
        help="Serve it even on a CPU its INT8 format does not fit (config key allow_cpu_mismatch).",
    ),
) -> None:
    """Copy MODEL into REPOSITORY/NAME/VERSION/model.onnx (a chat folder: into NAME/VERSION/) and
    write NAME/config.yaml."""
    genai = model.is_dir() and (model / GENAI_FILE).is_file()
    if not model.is_file() and not genai:
        raise BadInput(f"model file (or exported chat folder with {GENAI_FILE}) not found: {model}")
    if decoder is not None and not (genai and (model / decoder).is_file()):
        raise BadInput(f"--decoder {decoder}: not a file in the chat folder {model}")
    if "/" in name or name.startswith(".") or not name:
        raise BadInput(f"--name must be a plain folder name, got {name!r}")
    batching = None
    if preferred or delay_us is not None:
        batching = DynamicBatching(tuple(preferred), 1000 if delay_us is None else delay_us)
    config = ModelConfig(
        name,
        max_batch_size=max_batch,
        dynamic_batching=batching,
        instance_count=instances,
        threads_per_instance=threads,
        priority=priority,
        backend=ModelKind.GENERATION if genai else BackendKind.ONNXRUNTIME,
        genai=GenAIConfig(max_sequences, max_new_tokens, decoder, continuous, vision_int8) if genai else None,
        allow_cpu_mismatch=allow_cpu_mismatch,
    )
    folder = repository / name
    existing = (
        [int(p.name) for p in folder.glob("*") if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
    )
    version = version or (max(existing) + 1 if existing else 1)
    target = folder / str(version) / MODEL_FILE
    if genai:
        target = folder / str(version)
        shutil.copytree(model, target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model, target)
    (folder / "config.yaml").write_text(dump_config(config))
    console.print(f"added {name} v{version}: {target}")
