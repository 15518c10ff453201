"""Model feeds from sample files, for calibration, evaluation and comparison: images through the
zoo's own preprocessing, or tensors from ``.npy`` (single-input models) / ``.npz`` (keyed by input
name) files, read as they are.

``model_feeds`` is the one way every stage turns a folder of samples into feeds for a model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelkiln.errors import BadInput, CalibrationError
from modelkiln.onnx_io import input_names, load_model
from modelkiln.zoo.base import TextTask, ZooModel, as_image_task
from modelkiln.zoo.images import IMAGE_SUFFIXES, read_image

Feed = dict[str, np.ndarray]


def list_samples(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Image or tensor files in ``folder`` (sorted; at most ``limit``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (*IMAGE_SUFFIXES, ".npy", ".npz"))
    if not files:
        raise CalibrationError(f"no images or .npy/.npz files in {folder}")
    return files[:limit] if limit else files


def model_feeds(
    model: onnx.ModelProto | str | Path,
    samples: str | Path | Sequence[Path],
    entry: ZooModel | None,
    batch_size: int = 8,
    limit: int | None = None,
) -> Iterator[Feed]:
    """Feeds for ``model`` (a file or a loaded model: its real inputs name the tensors) from
    ``samples``, a folder or a list of files (at most ``limit``), ``batch_size`` samples each.
    Lazy: wrap in ``list`` to go over them more than once. Folder and model errors are raised
    here, sample errors when the samples are read."""
    if isinstance(samples, (str, Path)):
        files = list_samples(samples, limit)
    else:
        files = list(samples)[:limit] if limit else list(samples)
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    return batches(files, input_names(proto), entry, batch_size)


def batches(
    files: list[Path], input_names: list[str], zoo: ZooModel | None, batch_size: int
) -> Iterator[Feed]:
    """Feeds of up to ``batch_size`` samples each."""
    tensors = [f for f in files if f.suffix in (".npy", ".npz")]
    if tensors and len(tensors) != len(files):
        raise CalibrationError("mix of images and tensor files in one folder; use one kind")
    if not tensors and zoo is None:
        raise CalibrationError("images need --zoo NAME so they get the model's own preprocessing")
    images = as_image_task(zoo) if not tensors and zoo is not None else None
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        if images is None:
            yield from _stack_by_shape([_read_tensor(f, input_names) for f in chunk])
        else:
            yield images.preprocess([read_image(f) for f in chunk]).feed


def write_text_feeds(zoo: ZooModel, texts: list[str], folder: str | Path) -> list[Path]:
    """One ``.npz`` per text (unpadded, keyed by input name) through the zoo's own tokenizer."""
    if not isinstance(zoo, TextTask):
        raise BadInput(f"{zoo.name} does not take text; feeds from text need a text model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        path = folder / f"{i:05d}.npz"
        feed: dict[str, Any] = zoo.preprocess_texts([text]).feed
        np.savez(path, **feed)
        paths.append(path)
    return paths


def _read_tensor(path: Path, input_names: list[str]) -> Feed:
    try:
        if path.suffix == ".npy":
            if len(input_names) != 1:
                raise BadInput(
                    f"{path}: .npy holds one tensor but the model has inputs {input_names}; use .npz"
                )
            return {input_names[0]: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            feed = {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:
        raise BadInput(f"cannot read calibration tensor {path}: {exc}") from exc
    if set(feed) != set(input_names):
        raise BadInput(f"{path}: keys {sorted(feed)} do not match the model inputs {sorted(input_names)}")
    return feed


def _stack_by_shape(feeds: list[Feed]) -> Iterator[Feed]:
    """Samples of equal shapes stacked into one feed each (sentences of different lengths are
    not padded: padding is model-specific and would change what is calibrated)."""
    groups: dict[tuple[tuple[str, tuple[int, ...]], ...], list[Feed]] = {}
    for feed in feeds:
        groups.setdefault(tuple((k, v.shape) for k, v in sorted(feed.items())), []).append(feed)
    for group in groups.values():
        yield _stack(group)


def _stack(feeds: list[Feed]) -> Feed:
    """Concatenate per-sample feeds along the batch axis (samples may carry their own batch dim)."""
    out = {}
    for name in feeds[0]:
        parts = [f[name] for f in feeds]
        out[name] = np.concatenate(parts) if parts[0].ndim else np.stack(parts)
    return out
