"""Fine-tuning of dual encoders (CLIP-like) on image-caption sets: ``kiln finetune``.

Our own training loop in torch on the CPU (``loop.py``), the multi-positive contrastive loss
(``loss.py``), cached tower features and augmentation (``features.py``, ``augment.py``),
closed-form starting heads (``heads.py``), safetensors + JSON checkpoints (``state.py``) and the
loss/recall plot (``plot.py``). docs/finetune.md has the method and its cross-validated figures.
"""

from __future__ import annotations

from modelkiln.finetune.loop import EpochRecord, Event, FinetuneResult, PhaseStart, finetune
from modelkiln.finetune.options import FinetuneOptions, defaults_for, with_overrides

__all__ = [
    "EpochRecord",
    "Event",
    "FinetuneOptions",
    "FinetuneResult",
    "PhaseStart",
    "defaults_for",
    "finetune",
    "with_overrides",
]
