"""What a fine-tuning run is told: ``FinetuneOptions`` and each family's defaults.

The defaults of ``clip-lite0-minilm`` are the method chosen by k-fold cross-validation by image
on the COCO caption assets (``benchmarks/clip_finetune.py``, ``docs/finetune.md``): both tower
bodies locked (their features cached per augmented view), heads initialised in closed form, then
30 epochs of contrastive training pulled towards that start. open_clip models start from a
user's weights and train whole towers at a small learning rate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from modelkiln.errors import BadInput
from modelkiln.zoo.clip import CLIPFamily, DualEncoder
from modelkiln.zoo.clip_lite0_minilm import CLIPLite0MiniLM

#: How the heads start: "closed-form" (ridge regression, families with heads) or "none" (as built).
INITS = ("closed-form", "none")


@dataclass(frozen=True)
class FinetuneOptions:
    """One run's settings; every field is recorded in the checkpoint and ``history.json``."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    #: Strength of the pull towards the starting weights (L2-SP), per training image.
    weight_decay: float = 1.0
    lock_image: bool = True
    lock_text: bool = True
    #: With a locked body, its last N layer groups still train (partial unfreezing).
    unlock_image_last: int = 0
    unlock_text_last: int = 0
    seed: int = 0
    #: Images held out for validation when no --val set is given (by image, never by caption).
    val_fraction: float = 0.2
    #: After a run validated on held-out images, train again on all of them (same settings).
    refit: bool = True
    #: Augmented views per image whose features are cached when the image body is locked.
    views: int = 12
    init: str = "closed-form"
    #: Ridge strength of the closed-form head initialisation (per row, on standardised features).
    ridge: float = 3.0
    #: Starting logit scale of families with heads (open_clip keeps its own); capped at 100.
    logit_scale: float = 20.0

    def check(self) -> None:
        """BadInput naming the first setting out of range."""
        problems = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (
                self.batch_size >= 2,
                f"--batch-size must be >= 2 (contrastive needs negatives), got {self.batch_size}",
            ),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0.0 < self.val_fraction < 1.0, f"--val-fraction must be in (0, 1), got {self.val_fraction}"),
            (self.views >= 1, f"--views must be >= 1, got {self.views}"),
            (self.init in INITS, f"--init must be one of {', '.join(INITS)}, got {self.init!r}"),
            (self.ridge > 0, f"ridge must be > 0, got {self.ridge}"),
            (0 < self.logit_scale <= 100, f"logit scale must be in (0, 100], got {self.logit_scale}"),
            (self.unlock_image_last >= 0, f"--unlock-image-last must be >= 0, got {self.unlock_image_last}"),
            (self.unlock_text_last >= 0, f"--unlock-text-last must be >= 0, got {self.unlock_text_last}"),
        ]
        for ok, message in problems:
            if not ok:
                raise BadInput(message)

    def body_locked(self, side: str) -> bool:
        """True when no part of ``side``'s body trains (its features can be cached)."""
        locked, unlocked = (
            (self.lock_image, self.unlock_image_last)
            if side == "image"
            else (self.lock_text, self.unlock_text_last)
        )
        return locked and unlocked == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInput(f"unknown fine-tuning options {unknown}")
        return cls(**data)

    def same_run(self, other: FinetuneOptions) -> list[str]:
        """Settings that differ from ``other``, epochs aside (a resumed run may train longer)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k != "epochs" and mine[k] != theirs[k]]


#: open_clip: whole towers train, gently, from the user's pretrained weights.
OPEN_CLIP = FinetuneOptions(
    epochs=10, lr=1e-5, weight_decay=0.1, lock_image=False, lock_text=False, init="none", views=4
)


def defaults_for(entry: DualEncoder) -> FinetuneOptions:
    """The family's default method (see the module doc)."""
    if isinstance(entry, CLIPLite0MiniLM):
        return FinetuneOptions()
    if isinstance(entry, CLIPFamily):
        return OPEN_CLIP
    return replace(FinetuneOptions(), init="none")


def with_overrides(base: FinetuneOptions, **given: Any) -> FinetuneOptions:
    """``base`` with every option the user gave (not None) replaced, then checked."""
    chosen = replace(base, **{k: v for k, v in given.items() if v is not None})
    chosen.check()
    return chosen


def dumps(options: FinetuneOptions) -> str:
    return json.dumps(options.to_dict(), sort_keys=True)
