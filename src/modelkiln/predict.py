"""Run an exported model (or a zoo model, exported on the fly) on images with the zoo's own
pre/post-processing, and return one readable result per image.

Models run on any backend (ONNX Runtime by default, TensorRT, or the torch reference); the zoo
entry comes from the model's own metadata, whichever backend loaded it.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from modelkiln.delivery.crypto import ENC_SUFFIX, ModelKey, model_source
from modelkiln.errors import BadInput, ModelNotFound
from modelkiln.export import export
from modelkiln.runtime.backends import Backend, BackendKind, load_backend
from modelkiln.runtime.backends.onnxruntime import OrtOptions
from modelkiln.runtime.backends.torch import TorchOptions
from modelkiln.zoo import ImageTask, ZooModel, as_image_task, entry_from_metadata, get, input_image_size
from modelkiln.zoo.clip import DualEncoder
from modelkiln.zoo.images import read_image

log = logging.getLogger(__name__)
BATCH = 8


@dataclass
class Prediction:
    image: Path
    result: Any  # Classification, Detections or Embedding: each prints readably


def backend_options(kind: BackendKind, weights: str | None = None, threads: int | None = None) -> Any:
    """What predict runs each backend with: ONNX Runtime on the CPU provider (deterministic
    scores, as every accuracy figure here is measured), TensorRT's defaults, torch with
    ``weights`` (None: the weights the export recorded)."""
    if kind is BackendKind.ONNXRUNTIME:
        return OrtOptions(providers=("CPUExecutionProvider",), intra_op_threads=threads)
    if kind is BackendKind.TORCH:
        return TorchOptions(weights=weights, threads=threads)
    return None


def load_parts(
    model: str | Path,
    zoo_name: str | None = None,
    weights: str | None = None,
    threads: int | None = None,
    backend: BackendKind | str = BackendKind.ONNXRUNTIME,
    options: Any = None,
    key: ModelKey | None = None,
) -> tuple[ZooModel, dict[str, Backend]]:
    """The zoo entry of ``model`` and a loaded backend per part, from an .onnx file, a folder of
    part files (CLIP) or a zoo name (exported to a temp dir first; the torch backend builds it
    directly). ``options`` replaces ``backend_options`` for every part; ``key`` opens encrypted
    files (``.onnx.enc``) in memory."""
    kind = BackendKind(backend)
    path = Path(model)
    if not path.exists():
        if str(model).endswith((".onnx", ENC_SUFFIX)):
            raise ModelNotFound(f"model file not found: {model}")
        return _from_zoo(str(model), weights, threads, kind, options)
    files = _part_files(path)
    if not files:
        raise ModelNotFound(f"no .onnx files in {path}")
    chosen = options if options is not None else backend_options(kind, weights, threads)
    backends = {part: load_backend(model_source(f, key), kind, chosen) for part, f in files.items()}
    return _with_entry(backends, zoo_name, str(path))


def _part_files(path: Path) -> dict[str, Path]:
    """Part name -> file: one file is the model; a folder holds one .onnx (or .onnx.enc) per part."""
    if not path.is_dir():
        return {"model": path}
    found = {
        p.name.removesuffix(ENC_SUFFIX).removesuffix(".onnx"): p for p in sorted(path.glob("*.onnx.enc"))
    }
    found.update({p.stem: p for p in sorted(path.glob("*.onnx"))})
    return dict(sorted(found.items()))


def _with_entry(
    backends: dict[str, Backend], zoo_name: str | None, source: str
) -> tuple[ZooModel, dict[str, Backend]]:
    first = next(iter(backends.values()))
    size = input_image_size(m.shape for m in first.input_metadata)
    entry = entry_from_metadata(first.metadata, size, name=zoo_name)
    if entry is None:
        raise BadInput(f"{source} carries no modelkiln metadata; say which zoo model it is with --zoo NAME")
    if len(backends) == 1:  # a single-part file is that entry's first part, whatever its file name
        backends = {entry.parts[0].name: first}
    return entry, backends


def _from_zoo(
    name: str, weights: str | None, threads: int | None, kind: BackendKind, options: Any
) -> tuple[ZooModel, dict[str, Backend]]:
    entry = as_image_task(get(name))  # before exporting a model nothing here could feed
    if kind is BackendKind.TORCH:  # the reference runs the torch modules themselves: no export
        base = options if options is not None else backend_options(kind, weights, threads)
        backends = {p.name: load_backend(name, kind, replace(base, part=p.name)) for p in entry.parts}
        return _with_entry(backends, None, name)
    with tempfile.TemporaryDirectory(prefix="kiln-predict-") as tmp:  # backends keep the model in memory
        out = Path(tmp) if len(entry.parts) > 1 else Path(tmp) / f"{entry.name}.onnx"
        result = export(name, out, weights=weights)
        files = out if len(result.files) > 1 else result.files[entry.parts[0].name]
        return load_parts(files, threads=threads, backend=kind, options=options)


class Predictor:
    """A backend for every part of one image model, plus its zoo entry's pre/post-processing."""

    def __init__(self, entry: ImageTask, backends: dict[str, Backend]) -> None:
        self.entry = entry
        self.backends = backends

    @classmethod
    def open(
        cls,
        model: str | Path,
        zoo_name: str | None = None,
        weights: str | None = None,
        threads: int | None = None,
        backend: BackendKind | str = BackendKind.ONNXRUNTIME,
        options: Any = None,
        key: ModelKey | None = None,
    ) -> Predictor:
        """From an .onnx file, a folder of part files (CLIP) or a zoo name; BadInput when the
        model does not take images (text and generative models). ``key`` opens encrypted files."""
        entry, backends = load_parts(model, zoo_name, weights, threads, backend, options, key)
        return cls(as_image_task(entry), backends)

    def predict(self, images: list[str | Path], labels: list[str] | None = None) -> list[Prediction]:
        """Results in input order; images are read and run in batches of ``BATCH``."""
        results: list[Prediction] = []
        first = self.entry.parts[0].name
        for start in range(0, len(images), BATCH):
            paths = [Path(p) for p in images[start : start + BATCH]]
            prepared = self.entry.preprocess([read_image(p) for p in paths])
            outputs = self.backends[first].infer(prepared.feed)
            if labels and "text" in self.backends and isinstance(self.entry, DualEncoder):
                feed = self.entry.text_feed([f"a photo of a {label}" for label in labels])  # zero-shot
                outputs.update(self.backends["text"].infer(feed))
                prepared.meta = [{"labels": labels}]
            answers = self.entry.postprocess(outputs, prepared)
            results.extend(Prediction(p, r) for p, r in zip(paths, answers, strict=True))
        return results
