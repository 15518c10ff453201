"""``kiln feeds``: turn a text file (one sentence per line) into ``.npz`` model feeds for
calibration, evaluation or ``kiln compare``, through the zoo model's own tokenizer."""

from __future__ import annotations

from pathlib import Path

import typer

from modelkiln.data.feeds import write_text_feeds
from modelkiln.errors import BadInput
from modelkiln.log import console
from modelkiln.zoo import get


def feeds_cmd(
    model: str = typer.Argument(..., help="Zoo text model, e.g. all-minilm-l6-v2."),
    text: Path = typer.Argument(..., help="UTF-8 text file, one sentence per line."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for the .npz files (one per line)."),
) -> None:
    """Write one .npz per sentence, keyed by the model's input names."""
    if not text.is_file():
        raise BadInput(f"text file not found: {text}")
    lines = [line.strip() for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise BadInput(f"{text} has no non-empty lines")
    paths = write_text_feeds(get(model), lines, out)
    console.print(f"wrote {len(paths)} feeds to [bold]{out}[/]")
