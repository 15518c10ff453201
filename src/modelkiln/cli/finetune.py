"""``kiln finetune``: contrastive fine-tuning of a dual encoder on image-caption pairs (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from modelkiln.finetune import EpochRecord, Event, PhaseStart, defaults_for, finetune, with_overrides
from modelkiln.log import console, err_console
from modelkiln.zoo import get
from modelkiln.zoo.clip import DualEncoder


def finetune_cmd(
    model: str = typer.Argument(
        ...,
        help="Dual encoder: clip-lite0-minilm, or an open_clip model (clip-vit-b-32, ...) with --weights.",
    ),
    data: Path = typer.Option(
        ...,
        "--data",
        help="Captions: a COCO folder (annotations/captions_*.json + images), a captions JSON, an "
        "image,caption CSV or a JSONL; or an image folder with --labels.",
    ),
    out: Path = typer.Option(
        ..., "-o", "--out", help="Output folder: final.safetensors, history, checkpoints."
    ),
    labels: Path = typer.Option(None, "--labels", help="Caption file when --data is an image folder."),
    val: Path = typer.Option(None, "--val", help="Validation captions (same forms as --data)."),
    val_labels: Path = typer.Option(None, "--val-labels", help="Caption file when --val is an image folder."),
    weights: str = typer.Option(
        None, "--weights", "-w", help="Starting weights: open_clip file or release; a previous checkpoint."
    ),
    epochs: int = typer.Option(None, "--epochs", help="Epochs (family default: clip-lite0-minilm 30)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per step (distinct images)."),
    lr: float = typer.Option(None, "--lr", help="Adam learning rate."),
    weight_decay: float = typer.Option(
        None, "--weight-decay", help="Pull towards the starting weights (L2-SP), per training image."
    ),
    lock_image: bool = typer.Option(
        None, "--lock-image/--no-lock-image", help="Freeze the image tower's body (heads still train)."
    ),
    lock_text: bool = typer.Option(
        None, "--lock-text/--no-lock-text", help="Freeze the text tower's body (heads still train)."
    ),
    unlock_image_last: int = typer.Option(
        None, "--unlock-image-last", help="With --lock-image: its last N layer groups still train."
    ),
    unlock_text_last: int = typer.Option(
        None, "--unlock-text-last", help="With --lock-text: its last N layer groups still train."
    ),
    seed: int = typer.Option(None, "--seed", help="Seed of every random choice (same seed, same weights)."),
    val_fraction: float = typer.Option(
        None, "--val-fraction", help="Without --val: fraction of the images held out (by image)."
    ),
    refit: bool = typer.Option(
        None, "--refit/--no-refit", help="Without --val: train again on all images after validating."
    ),
    views: int = typer.Option(None, "--views", help="Cached augmented views per image (locked image body)."),
    init: str = typer.Option(None, "--init", help="Heads start: closed-form (ridge) or none."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last epoch."),
    json_out: Path = typer.Option(None, "--json", help="Also write the run summary as JSON."),
) -> None:
    """Fine-tune a dual encoder (CLIP-like) on images with any number of captions each."""
    entry = get(model)
    base = defaults_for(entry) if isinstance(entry, DualEncoder) else None
    options = None
    if base is not None:
        options = with_overrides(
            base,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            lock_image=lock_image,
            lock_text=lock_text,
            unlock_image_last=unlock_image_last,
            unlock_text_last=unlock_text_last,
            seed=seed,
            val_fraction=val_fraction,
            refit=refit,
            views=views,
            init=init,
        )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as progress:
        tasks: dict[str, TaskID] = {}

        def show(event: Event) -> None:
            if isinstance(event, PhaseStart):
                tasks[event.phase] = progress.add_task(
                    f"{event.phase} ({event.images} images, {event.captions} captions)",
                    total=event.epochs,
                    completed=event.done,
                    status="caching tower features, starting heads…",
                )
            elif isinstance(event, EpochRecord):
                status = f"loss {event.loss:.3f} scale {event.logit_scale:.1f}"
                if event.val:
                    v = event.val
                    status += (
                        f" | val t→i r@1 {v['text_to_image_r@1']:.2f} r@5 {v['text_to_image_r@5']:.2f}"
                        f" i→t r@5 {v['image_to_text_r@5']:.2f}"
                    )
                progress.update(tasks[event.phase], completed=event.epoch, status=status)

        result = finetune(
            model,
            data,
            out,
            labels=labels,
            val=val,
            val_labels=val_labels,
            weights=weights,
            options=options,
            resume=resume,
            on_event=show,
        )
    console.print(result.split)
    if result.val:
        figures = ", ".join(f"{k} {v:.3f}" for k, v in result.val.items())
        console.print(f"validation after the last epoch: {figures}")
    console.print(f"wrote [bold]{result.final}[/] ({result.seconds:.0f} s); history {result.history}")
    if result.plot:
        console.print(f"plot {result.plot}")
    console.print(f"next: kiln export {result.model} --weights {result.final} -o DIR")
    if json_out:
        json_out.write_text(
            json.dumps(
                {
                    "model": result.model,
                    "final": str(result.final),
                    "history": str(result.history),
                    "split": result.split,
                    "seconds": result.seconds,
                    "val": result.val,
                },
                indent=2,
            )
        )
