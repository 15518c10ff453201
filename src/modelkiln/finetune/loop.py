"""``finetune``: contrastive training of a dual encoder on an image-caption set (CPU, torch).

One run is one or two phases. ``train`` learns on the training images and measures recall on
the validation images after every epoch; when those were held out of ``--data`` (no ``--val``),
``refit`` then trains a fresh model on all the images with the same settings and epochs (the
method was chosen by cross-validation, and more images help more than early stopping on a few;
see docs/finetune.md), and its weights are the final ones.

Each step takes a batch of distinct images, one caption of each drawn at random and, for a
locked image body, one of its cached augmented views; the loss (``loss.py``) treats every pair
of the same picture as a positive. Everything random is drawn from generators seeded by
(seed, phase, epoch), so runs repeat exactly and a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelkiln.accuracy.tasks.retrieval import recall_at_k
from modelkiln.data.captions import CaptionSet, load_captions
from modelkiln.errors import BadInput
from modelkiln.finetune import features as feats
from modelkiln.finetune import state as ckpt
from modelkiln.finetune.augment import random_view
from modelkiln.finetune.heads import closed_form
from modelkiln.finetune.loss import multi_positive_loss
from modelkiln.finetune.options import FinetuneOptions, defaults_for
from modelkiln.finetune.plot import plot_history
from modelkiln.zoo import get
from modelkiln.zoo.clip import SIDES, DualEncoder, TrainableDual
from modelkiln.zoo.clip_lite0_minilm import CLIPLite0MiniLM, class_prompts
from modelkiln.zoo.images import read_image

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Largest logit scale (CLIP's clamp): beyond it the loss only sharpens, it no longer ranks.
MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of one phase, as the progress bar and ``history.json`` show it."""

    phase: str
    epoch: int
    epochs: int
    loss: float
    logit_scale: float
    seconds: float
    val: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "epoch": self.epoch,
            "loss": self.loss,
            "logit_scale": self.logit_scale,
            "seconds": self.seconds,
            "val": self.val,
        }


@dataclass(frozen=True)
class PhaseStart:
    """A phase begins (or resumes at ``done`` epochs)."""

    phase: str
    epochs: int
    done: int
    images: int
    captions: int


Event = EpochRecord | PhaseStart


@dataclass
class FinetuneResult:
    """What a run wrote and measured."""

    model: str
    out: Path
    final: Path
    history: Path
    plot: Path | None
    split: str
    records: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def val(self) -> dict[str, float] | None:
        """Validation recall after the last epoch of the ``train`` phase."""
        measured = [r.val for r in self.records if r.phase == "train" and r.val is not None]
        return measured[-1] if measured else None


@dataclass
class TrainingData:
    """A caption set as training reads it: paths, flat captions, owners, picture identities."""

    set: CaptionSet
    texts: list[str]
    owner: np.ndarray  # image index of each caption
    first: np.ndarray  # index of each image's first caption
    identity: np.ndarray  # same value for the same picture file (a set may list one twice)

    @classmethod
    def of(cls, captions: CaptionSet) -> TrainingData:
        texts, owner = captions.texts()
        first = np.concatenate([[0], np.cumsum([len(c) for c in captions.captions])[:-1]]).astype(np.int64)
        seen: dict[Path, int] = {}
        identity = np.array(
            [seen.setdefault(p.resolve(), i) for i, p in enumerate(captions.images)], np.int64
        )
        return cls(captions, texts, owner, first, identity)


def finetune(
    model: str,
    data: Path,
    out: Path,
    *,
    labels: Path | None = None,
    val: Path | None = None,
    val_labels: Path | None = None,
    weights: str | None = None,
    options: FinetuneOptions | None = None,
    resume: bool = False,
    on_event: Callable[[Event], None] | None = None,
) -> FinetuneResult:
    """Fine-tune zoo dual encoder ``model`` on the captions at ``data`` and write ``out``
    (final.safetensors, history.json, history.png, per-epoch checkpoints). ``options`` defaults
    to the family's method (``options.defaults_for``); ``weights`` are the starting weights
    (open_clip: the user's local file; clip-lite0-minilm: none, or a previous checkpoint)."""
    start = time.perf_counter()
    entry = get(model)
    if not isinstance(entry, DualEncoder):
        raise BadInput(
            f"{entry.name} is not a dual encoder (image and text towers); kiln finetune trains those"
        )
    options = options or defaults_for(entry)
    options.check()
    full, _ = load_captions(Path(data), labels)
    if val is not None:
        train_set, val_set = full, load_captions(Path(val), val_labels)[0]
        held_out = False
        split = f"training on {len(full)} images of {full.source}, validating on {len(val_set)} of {val_set.source}"
    else:
        train_set, val_set = full.split(options.val_fraction, options.seed)
        held_out = True
        split = (
            f"no --val: holding out {len(val_set)} of {len(full)} images of {full.source} "
            f"({options.val_fraction:.0%}, by image) for validation"
            + (f"; then refitting on all {len(full)} images" if options.refit else "")
        )
    if len(train_set) < 2:
        raise BadInput(
            f"{full.source}: contrastive training needs at least 2 training images, got {len(train_set)}"
        )
    log.info("%s", split)
    out = Path(out)
    if resume and ckpt.read_state(out / ckpt.CHECKPOINTS / "train") is None:
        raise BadInput(f"nothing to resume in {out}: no {ckpt.CHECKPOINTS}/train/state.json there")
    if not resume and (out / ckpt.CHECKPOINTS).exists():
        raise BadInput(
            f"{out} already holds a fine-tuning run; pass --resume to continue it or choose another -o"
        )
    phases: list[tuple[str, CaptionSet, CaptionSet | None]] = [("train", train_set, val_set)]
    if held_out and options.refit:
        phases.append(("refit", full, None))
    records: list[EpochRecord] = []
    trainer: Trainer | None = None
    store = feats.FeatureStore(entry, options.views, options.seed)
    for index, (name, train, check) in enumerate(phases):
        checked = None if check is None else TrainingData.of(check)
        trainer = Trainer(entry, weights, options, name, index, TrainingData.of(train), checked, store)
        records.extend(trainer.run(out / ckpt.CHECKPOINTS / name, resume, on_event, model))
    assert trainer is not None
    final = out / ckpt.FINAL
    trainer.save_final(final)
    result = FinetuneResult(entry.name, out, final, out / ckpt.HISTORY, None, split, records)
    result.seconds = time.perf_counter() - start
    result.plot = plot_history(records, out / ckpt.PLOT)
    ckpt.write_json(
        result.history,
        {
            "model": entry.name,
            "weights": weights,
            "data": str(full.source),
            "val": None if val is None else str(val_set.source),
            "split": split,
            "options": options.to_dict(),
            "final": str(final),
            "seconds": result.seconds,
            "val_recall": result.val,
            "epochs": [r.to_dict() for r in records],
        },
    )
    return result


class Trainer:
    """One phase: a fresh model, its caches, its optimizer, its epochs (``finetune`` runs one or
    two; the cross-validation benchmark runs one per fold, sharing a FeatureStore)."""

    def __init__(
        self,
        entry: DualEncoder,
        weights: str | None,
        options: FinetuneOptions,
        phase: str,
        index: int,
        train: TrainingData,
        val: TrainingData | None,
        store: feats.FeatureStore,
    ) -> None:
        import torch

        self.entry, self.weights, self.options = entry, weights, options
        self.phase, self.index, self.train, self.val = phase, index, train, val
        self.store = store
        torch.manual_seed(options.seed)
        with _quiet_random_warning(entry, weights):
            self.model: TrainableDual = entry.trainable(weights)
        self.heads_untrained = weights is None or str(weights).strip().lower() == "random"
        self.params = self._select_parameters()
        self.cache = _Cache()

    # -- setup -----------------------------------------------------------------------------

    def _select_parameters(self) -> list[torch.nn.Parameter]:
        """Lock what the options lock; the trainable parameters, heads and scale included."""
        o, model = self.options, self.model
        for p in model.parameters():
            p.requires_grad_(False)
        chosen: list[torch.nn.Parameter] = []
        for side in SIDES:
            groups = model.layer_groups(side)
            locked = o.lock_image if side == "image" else o.lock_text
            keep = o.unlock_image_last if side == "image" else o.unlock_text_last
            trained = [] if locked and keep == 0 else groups[-keep:] if locked else groups
            chosen += [p for g in trained for p in g] + model.head_parameters(side)
        chosen.append(model.log_scale)
        unique = list({id(p): p for p in chosen}.values())
        for p in unique:
            p.requires_grad_(True)
        if len(unique) == 1:
            raise BadInput(
                f"{self.entry.name}: nothing to train: both towers are locked and the family has no "
                "heads; unlock a tower (--no-lock-image/--no-lock-text or --unlock-*-last N)"
            )
        return unique

    def prepare(self, resumed: bool = False) -> None:
        """Feature caches of locked bodies, then the closed-form heads when they start untrained
        (not when resuming: the checkpoint has the heads)."""
        o, model, entry = self.options, self.model, self.entry
        model.eval()
        t0 = time.perf_counter()
        store = self.store
        if o.body_locked("image"):
            self.cache.views = store.views(model, self.train.set.images)
            if self.val is not None:
                self.cache.val_images = store.eval_images(model, self.val.set.images)
        if o.body_locked("text"):
            self.cache.texts = store.texts(model, self.train.texts)
            if self.val is not None:
                self.cache.val_texts = store.texts(model, self.val.texts)
        if (
            o.init == "closed-form"
            and self.heads_untrained
            and not resumed
            and isinstance(entry, CLIPLite0MiniLM)
        ):
            views = store.views(model, self.train.set.images)
            texts = store.texts(model, self.train.texts)
            classes = store.texts(model, class_prompts())
            closed_form(model, views, texts, self.train.owner, classes, o.ridge)
        if self.heads_untrained and isinstance(entry, CLIPLite0MiniLM):
            self._set_scale(o.logit_scale)  # open_clip and a previous checkpoint keep their own
        log.info("%s: features and starting heads in %.1f s", self.phase, time.perf_counter() - t0)

    def _set_scale(self, scale: float) -> None:
        import torch

        with torch.no_grad():
            self.model.log_scale.fill_(math.log(scale))

    # -- the loop --------------------------------------------------------------------------

    def run(
        self,
        folder: Path | None,
        resume: bool = False,
        on_event: Callable[[Event], None] | None = None,
        model_name: str = "",
    ) -> list[EpochRecord]:
        """Train this phase's epochs (from the last checkpoint in ``folder`` with ``resume``);
        ``folder`` None keeps everything in memory (cross-validation)."""
        import torch

        o = self.options
        saved = ckpt.read_state(folder) if resume and folder is not None else None
        fingerprint = ckpt.fingerprint(self.train.set, self.val.set if self.val else None)
        if on_event:
            before = min(int(saved["epoch"]), o.epochs) if saved else 0
            on_event(PhaseStart(self.phase, o.epochs, before, len(self.train.set), len(self.train.texts)))
        self.prepare(resumed=saved is not None)
        optimizer = torch.optim.Adam(self.params, lr=o.lr)
        records: list[EpochRecord] = []
        done = 0
        if saved is not None and folder is not None:
            done = self._restore(folder, saved, optimizer, fingerprint, model_name)
            records = [EpochRecord(**r) for r in saved["history"]]
            records = [r for r in records if r.epoch <= min(done, o.epochs)]
        anchor = self._anchor(folder, saved is not None)
        for epoch in range(done + 1, o.epochs + 1):
            t0 = time.perf_counter()
            loss = self._epoch(epoch, optimizer, anchor)
            metrics = self.validate() if self.val is not None else None
            record = EpochRecord(
                self.phase,
                epoch,
                o.epochs,
                loss,
                float(self.model.log_scale.detach().exp()),
                time.perf_counter() - t0,
                metrics,
            )
            records.append(record)
            if folder is not None:
                self._save(folder, optimizer, epoch, records, fingerprint, model_name)
            if on_event:
                on_event(record)
        return records

    def _epoch(self, epoch: int, optimizer: torch.optim.Optimizer, anchor: dict[int, torch.Tensor]) -> float:
        import torch

        o, data = self.options, self.train
        rng = np.random.default_rng([o.seed, 2 + self.index, epoch])
        torch.manual_seed(o.seed * 1_000_003 + self.index * 10_007 + epoch)
        self.model.train()
        n = len(data.set)
        batch = min(o.batch_size, n)
        order = rng.permutation(n)
        losses = []
        for step in range(n // batch):  # the remainder waits for the next epoch's shuffle
            images = order[step * batch : (step + 1) * batch]
            captions = np.array([data.first[i] + rng.integers(len(data.set.captions[i])) for i in images])
            image_embeds = self._image_embeds(images, rng)
            text_embeds = self._text_embeds(captions)
            ids = torch.from_numpy(data.identity[images])
            loss = multi_positive_loss(
                torch.nn.functional.normalize(image_embeds, dim=-1),
                torch.nn.functional.normalize(text_embeds, dim=-1),
                ids,
                ids,
                self.model.log_scale.exp(),
            )
            if o.weight_decay > 0:
                pull = sum(
                    ((p - anchor[id(p)]) ** 2).sum() for p in self.params if p is not self.model.log_scale
                )
                loss = loss + o.weight_decay * pull / n
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            with torch.no_grad():
                self.model.log_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    def _image_embeds(self, images: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        import torch

        model, cache = self.model, self.cache
        if cache.views is not None:
            view = rng.integers(cache.views.shape[1], size=len(images))
            return model.image_head(cache.views[torch.from_numpy(images), torch.from_numpy(view)])
        crops = [random_view(read_image(self.train.set.images[i]), rng) for i in images]
        return model.image_head(model.image_features(feats.image_batch(self.entry, crops)))

    def _text_embeds(self, captions: np.ndarray) -> torch.Tensor:
        import torch

        if self.cache.texts is not None:
            return self.model.text_head(self.cache.texts[torch.from_numpy(captions)])
        feed = feats.to_torch(self.entry.text_feed([self.train.texts[j] for j in captions]))
        return self.model.text_head(self.model.text_features(feed))

    def validate(self) -> dict[str, float]:
        """Recall@k of the validation set through the model as exported (test-time views)."""
        import torch

        assert self.val is not None
        model, entry, val, cache = self.model, self.entry, self.val, self.cache
        model.eval()
        with torch.no_grad():
            if cache.val_images is not None:
                images = feats.head_image_embeds(model, cache.val_images)
            else:
                images = torch.cat(
                    [
                        model.encode_image(
                            feats.image_batch(entry, [read_image(p) for p in val.set.images[s : s + 16]])
                        )
                        for s in range(0, len(val.set), 16)
                    ]
                )
            if cache.val_texts is not None:
                texts = model.text_head(cache.val_texts)
            else:
                texts = torch.cat(
                    [
                        model.encode_text(feats.to_torch(entry.text_feed(val.texts[s : s + 64])))
                        for s in range(0, len(val.texts), 64)
                    ]
                )
        return recall_at_k(images.numpy(), texts.numpy(), val.owner)

    # -- checkpoints -----------------------------------------------------------------------

    def _trained_bodies(self) -> list[str]:
        return [side for side in SIDES if not self.options.body_locked(side)]

    def _anchor(self, folder: Path | None, resumed: bool) -> dict[int, torch.Tensor]:
        """The L2-SP anchor: the parameters as this phase started (saved once, read on resume)."""
        if folder is None:
            return {id(p): p.detach().clone() for p in self.params}
        path = folder / "anchor.safetensors"
        if resumed:
            tensors, _ = ckpt.load_tensors(path)
            if len(tensors) != len(self.params):
                raise BadInput(
                    f"cannot resume: {path} holds {len(tensors)} tensors, this run trains {len(self.params)}"
                )
            return {id(p): tensors[str(i)] for i, p in enumerate(self.params)}
        anchor = {id(p): p.detach().clone() for p in self.params}
        ckpt.save_tensors(path, {str(i): anchor[id(p)] for i, p in enumerate(self.params)})
        return anchor

    def _save(
        self,
        folder: Path,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        records: list[EpochRecord],
        fingerprint: str,
        model_name: str,
    ) -> None:
        meta = self.entry.checkpoint_metadata()
        ckpt.save_tensors(
            folder / "model.safetensors", self.model.checkpoint_state(self._trained_bodies()), meta
        )
        tensors, groups = ckpt.optimizer_tensors(optimizer)
        ckpt.save_tensors(folder / "optimizer.safetensors", tensors, groups)
        ckpt.write_json(
            folder / "state.json",
            {
                "version": ckpt.STATE_VERSION,
                "model": model_name,
                "weights": self.weights,
                "phase": self.phase,
                "epoch": epoch,
                "options": self.options.to_dict(),
                "data": fingerprint,
                "history": [r.to_dict() | {"epochs": r.epochs} for r in records],
            },
        )

    def _restore(
        self,
        folder: Path,
        saved: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        fingerprint: str,
        model_name: str,
    ) -> int:
        """Load the phase's last checkpoint; the epoch it ended."""
        saved_options = FinetuneOptions.from_dict(saved["options"])
        differ = self.options.same_run(saved_options)
        if differ or saved.get("model") != model_name or saved.get("weights") != self.weights:
            raise BadInput(
                f"cannot resume {folder}: it was run with other settings "
                f"({', '.join(differ) or 'model/weights'} differ); give the same options or a new -o"
            )
        if saved.get("data") != fingerprint:
            raise BadInput(f"cannot resume {folder}: the caption data differ from the run's")
        epoch = int(saved["epoch"])
        if epoch > self.options.epochs:
            raise BadInput(
                f"cannot resume {folder}: it already trained {epoch} epochs, more than --epochs {self.options.epochs}"
            )
        tensors, _ = ckpt.load_tensors(folder / "model.safetensors")
        self.model.load_checkpoint_state(tensors)
        opt_tensors, meta = ckpt.load_tensors(folder / "optimizer.safetensors")
        ckpt.load_optimizer(optimizer, opt_tensors, meta)
        log.info("%s: resuming after epoch %d", self.phase, epoch)
        return epoch

    def save_final(self, path: Path) -> None:
        meta = self.entry.checkpoint_metadata()
        ckpt.save_tensors(path, self.model.checkpoint_state(self._trained_bodies()), meta)


@dataclass
class _Cache:
    views: torch.Tensor | None = None  # [train images, views, F]
    texts: torch.Tensor | None = None  # [train captions, F]
    val_images: torch.Tensor | None = None  # [val images, test-time views, F]
    val_texts: torch.Tensor | None = None


@contextmanager
def _quiet_random_warning(entry: DualEncoder, weights: str | None) -> Iterator[None]:
    """Fine-tuning initialises untrained heads itself: the zoo's 'random weights' warning about
    them would only mislead (open_clip's random towers still warn: they stay random)."""
    logger = logging.getLogger("modelkiln.zoo.weights")
    quiet = isinstance(entry, CLIPLite0MiniLM)
    previous = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)
