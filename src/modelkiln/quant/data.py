"""Calibration and evaluation inputs: images through the zoo's own preprocessing, or tensors from
``.npy`` (single-input models) / ``.npz`` (keyed by input name) files, read as they are."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from modelkiln.errors import BadInput, CalibrationError
from modelkiln.zoo import ZooModel
from modelkiln.zoo.images import IMAGE_SUFFIXES, read_image


def list_samples(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Image or tensor files in ``folder`` (sorted; at most ``limit``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (*IMAGE_SUFFIXES, ".npy", ".npz"))
    if not files:
        raise CalibrationError(f"no images or .npy/.npz files in {folder}")
    return files[:limit] if limit else files


def batches(
    files: list[Path], input_names: list[str], zoo: ZooModel | None, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of up to ``batch_size`` samples each."""
    tensors = [f for f in files if f.suffix in (".npy", ".npz")]
    if tensors and len(tensors) != len(files):
        raise CalibrationError("mix of images and tensor files in one folder; use one kind")
    if not tensors and zoo is None:
        raise CalibrationError("images need --zoo NAME so they get the model's own preprocessing")
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        if tensors:
            yield from _stack_by_shape([_read_tensor(f, input_names) for f in chunk])
        else:
            yield zoo.preprocess([read_image(f) for f in chunk]).feed


def write_text_feeds(zoo: ZooModel, texts: list[str], folder: str | Path) -> list[Path]:
    """One ``.npz`` per text (unpadded, keyed by input name) through the zoo's own tokenizer."""
    prepare = getattr(zoo, "preprocess_texts", None)
    if prepare is None:
        raise BadInput(f"{zoo.name} does not take text; feeds from text need a text model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        path = folder / f"{i:05d}.npz"
        np.savez(path, **prepare([text]).feed)
        paths.append(path)
    return paths


def _read_tensor(path: Path, input_names: list[str]) -> dict[str, np.ndarray]:
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


def _stack_by_shape(feeds: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Samples of equal shapes stacked into one feed each (sentences of different lengths are
    not padded: padding is model-specific and would change what is calibrated)."""
    groups: dict[tuple, list[dict[str, np.ndarray]]] = {}
    for feed in feeds:
        groups.setdefault(tuple((k, v.shape) for k, v in sorted(feed.items())), []).append(feed)
    for group in groups.values():
        yield _stack(group)


def _stack(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-sample feeds along the batch axis (samples may carry their own batch dim)."""
    out = {}
    for name in feeds[0]:
        parts = [f[name] for f in feeds]
        out[name] = np.concatenate(parts) if parts[0].ndim else np.stack(parts)
    return out
