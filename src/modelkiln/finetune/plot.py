"""The loss and validation-recall curves of a run, as one PNG beside its checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Validation curves drawn (keys of recall_at_k).
CURVES = ("text_to_image_r@1", "text_to_image_r@5", "image_to_text_r@5", "mean_r@5")


def plot_history(records: Sequence[Any], path: Path) -> Path | None:
    """Loss per epoch for each phase (left) and validation recall (right) to ``path``; None (and
    a log line) when matplotlib is not installed: the figures stay in history.json."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no %s (pip install 'modelkiln[eval]')", path.name)
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for phase in dict.fromkeys(r.phase for r in records):
        rows = [r for r in records if r.phase == phase]
        left.plot([r.epoch for r in rows], [r.loss for r in rows], marker=".", label=phase)
    left.set(xlabel="epoch", ylabel="contrastive loss", title="training loss")
    left.legend()
    validated = [r for r in records if r.val]
    for key in CURVES:
        right.plot([r.epoch for r in validated], [r.val[key] for r in validated], marker=".", label=key)
    right.set(xlabel="epoch", ylabel="recall", ylim=(0, 1), title="validation recall")
    if validated:
        right.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
