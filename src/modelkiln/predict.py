"""Run an exported model (or a zoo model, exported on the fly) on images with the zoo's own
pre/post-processing, and return one readable result per image."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelkiln import zoo
from modelkiln.errors import BadInput, ModelNotFound
from modelkiln.runtime.session import model_metadata, ort_session, run
from modelkiln.zoo.images import read_image

log = logging.getLogger(__name__)
BATCH = 8


@dataclass
class Prediction:
    image: Path
    result: Any  # Classification, Detections or Embedding: each prints readably


class Predictor:
    """ONNX Runtime sessions for every part of one model, plus its zoo entry."""

    def __init__(self, entry: zoo.ZooModel, sessions: dict[str, Any]) -> None:
        self.entry = entry
        self.sessions = sessions

    @classmethod
    def open(
        cls,
        model: str | Path,
        zoo_name: str | None = None,
        weights: str | None = None,
        threads: int | None = None,
    ) -> Predictor:
        """From an .onnx file, a folder of part files (CLIP), or a zoo name (exported to a temp dir)."""
        path = Path(model)
        if not path.exists():
            if str(model).endswith(".onnx"):
                raise ModelNotFound(f"model file not found: {model}")
            return cls._from_zoo(str(model), weights, threads)
        files = {p.stem: p for p in sorted(path.glob("*.onnx"))} if path.is_dir() else {"model": path}
        if not files:
            raise ModelNotFound(f"no .onnx files in {path}")
        sessions = {part: ort_session(f, threads=threads) for part, f in files.items()}
        meta = model_metadata(next(iter(sessions.values())))
        name = zoo_name or meta.get("modelkiln.zoo")
        if not name:
            raise BadInput(f"{path} carries no modelkiln metadata; say which zoo model it is with --zoo NAME")
        entry = zoo.get(name, _image_size(next(iter(sessions.values()))))
        entry.configure(meta)
        if len(sessions) == 1:  # a single-part file is that entry's first part, whatever its file name
            sessions = {entry.parts[0].name: next(iter(sessions.values()))}
        return cls(entry, sessions)

    @classmethod
    def _from_zoo(cls, name: str, weights: str | None, threads: int | None) -> Predictor:
        from modelkiln.export import export

        entry = zoo.get(name)
        with tempfile.TemporaryDirectory(prefix="kiln-predict-") as tmp:  # sessions keep the model in memory
            out = Path(tmp) if len(entry.parts) > 1 else Path(tmp) / f"{entry.name}.onnx"
            result = export(name, out, weights=weights)
            return cls.open(
                out if len(result.files) > 1 else result.files[entry.parts[0].name], threads=threads
            )

    def predict(self, images: list[str | Path], labels: list[str] | None = None) -> list[Prediction]:
        """Results in input order; images are read and run in batches of ``BATCH``."""
        results: list[Prediction] = []
        for start in range(0, len(images), BATCH):
            paths = [Path(p) for p in images[start : start + BATCH]]
            prepared = self.entry.preprocess([read_image(p) for p in paths])
            first = self.entry.parts[0].name
            outputs = run(self.sessions[first], prepared.feed)
            if labels and "text" in self.sessions:  # CLIP zero-shot: embed the label prompts too
                ids = self.entry.tokenize([f"a photo of a {label}" for label in labels])  # type: ignore[attr-defined]
                outputs.update(run(self.sessions["text"], {"input_ids": ids}))
                prepared.meta = [{"labels": labels}]
            results.extend(
                Prediction(p, r)
                for p, r in zip(paths, self.entry.postprocess(outputs, prepared), strict=True)
            )
        return results


def _image_size(session: Any) -> int | None:
    """Spatial size of the first 4-D input, so the zoo entry preprocesses to what the file expects."""
    for inp in session.get_inputs():
        if len(inp.shape) == 4 and isinstance(inp.shape[-1], int):
            return int(inp.shape[-1])
    return None
