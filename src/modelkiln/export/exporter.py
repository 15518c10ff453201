"""Export a zoo model to ONNX with a dynamic batch axis and prove it matches torch.

Files are written to a temporary name and moved into place only after the parity check passes,
so a failed export never leaves a file that looks usable.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from modelkiln import zoo
from modelkiln._deps import require
from modelkiln.errors import ExportError, ParityFailed
from modelkiln.export.nms import append_nms
from modelkiln.export.parity import check_parity
from modelkiln.numerics import TensorDiff, Tolerance, worst
from modelkiln.onnx_io import save_model
from modelkiln.zoo.base import Task

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
LARGE_BYTES = 1_800_000_000  # above this a model is checked and run from its file (protobuf's 2 GB)


@dataclass
class ExportResult:
    """What an export wrote and how closely each file matches torch."""

    model: str
    files: dict[str, Path]
    parity: list[TensorDiff] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.parity)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "files": {k: str(v) for k, v in self.files.items()},
            "passed": self.passed,
            # "output" and "limit_abs": the keys these records had before TensorDiff
            "parity": [{**p.to_dict(), "output": p.name, "limit_abs": p.limit} for p in self.parity],
        }


def output_paths(entry: zoo.ZooModel, out: str | Path) -> dict[str, Path]:
    """One file per part: ``out`` itself for single-part models, ``out/<part>.onnx`` otherwise."""
    out = Path(out)
    if len(entry.parts) == 1:
        if out.suffix != ".onnx":
            out = out / f"{entry.name}.onnx" if out.is_dir() else out.with_suffix(".onnx")
        return {entry.parts[0].name: out}
    if out.suffix == ".onnx":
        raise ExportError(f"{entry.name} has {len(entry.parts)} parts; give -o a folder, not {out}")
    return {p.name: out / f"{p.name}.onnx" for p in entry.parts}


def export(
    model: str | zoo.ZooModel,
    out: str | Path,
    weights: str | None = None,
    opset: int = DEFAULT_OPSET,
    image_size: int | None = None,
    nms: bool = False,
    tolerance: Tolerance | None = None,
) -> ExportResult:
    """Export zoo ``model`` (a name, or an entry configured in code) to ``out`` and check it against
    torch; raises ParityFailed on mismatch (and writes nothing)."""
    entry = model if isinstance(model, zoo.ZooModel) else zoo.get(model, image_size)
    if nms and entry.task != Task.DETECTION:
        raise ExportError(f"--nms applies to detectors; {entry.name} is a {entry.task} model")
    torch = require("torch", "export")
    modules = entry.build(weights if weights is not None else entry.default_weights)
    paths = output_paths(entry, out)
    result = ExportResult(entry.name, paths)
    for part in entry.parts:
        with tempfile.TemporaryDirectory() as tmp:
            traced = Path(tmp) / "model.onnx"
            proto = _trace(torch, entry, part, modules[part.name], opset, traced)
            source = traced if _large(proto) else proto.SerializeToString()
            checks = check_parity(torch, entry, part, modules[part.name], source, tolerance or Tolerance())
        result.parity.extend(checks)
        if not all(c.passed for c in checks):
            bad = worst(checks)
            raise ParityFailed(
                f"{entry.name}/{part.name}: ONNX output {bad.name!r} differs from torch at batch "
                f"{bad.batch}: max abs {bad.max_abs:.3g} > {bad.limit or 0.0:.3g} or cosine "
                f"{bad.cosine:.6f} too low; no file written"
            )
        if nms:
            proto = append_nms(proto)
        _set_metadata(proto, entry, part.name, weights)
        save_model(proto, paths[part.name])
        log.info("wrote %s (%s)", paths[part.name], part.name)
    if len(paths) > 1:
        entry.write_assets(Path(out))
    return result


def _large(proto: onnx.ModelProto) -> bool:
    """Over protobuf's 2 GB limit once serialized (weights counted, as loaded into memory)."""
    return sum(len(t.raw_data) for t in proto.graph.initializer) > LARGE_BYTES


def _trace(
    torch: Any, entry: zoo.ZooModel, part: zoo.Part, module: Any, opset: int, path: Path
) -> onnx.ModelProto:
    """torch.onnx (TorchScript tracer) export to ``path`` (weights beside it when over 2 GB), loaded
    into memory, then onnx.checker (on the file for large models, which cannot be serialized)."""
    example = entry.example_inputs(part.name, batch=1)
    args = tuple(torch.from_numpy(example[s.name]) for s in part.inputs)
    try:
        with torch.no_grad(), _exportable_attention(torch), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about constants are expected here
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[s.name for s in part.inputs],
                output_names=[s.name for s in part.outputs],
                dynamic_axes=part.dynamic_axes(),
                do_constant_folding=True,
            )
        proto = onnx.load(str(path))
        _declare_output_shapes(proto, part)
        onnx.checker.check_model(str(path) if _large(proto) else proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"{entry.name}/{part.name}: export failed: {type(exc).__name__}: {exc}") from exc
    return proto


def _declare_output_shapes(proto: onnx.ModelProto, part: zoo.Part) -> None:
    """Write the part's output shapes into the graph: the tracer names every dim of an output with a
    dynamic axis symbolically, but tools (and YOLOv5's own) expect e.g. [batch, 25200, 85]."""
    specs = {s.name: s for s in part.outputs}
    for out in proto.graph.output:
        spec = specs.get(out.name)
        if spec is None:
            continue
        dims = out.type.tensor_type.shape.dim
        if len(dims) != len(spec.shape):
            raise ExportError(
                f"{part.name}: output {out.name} has rank {len(dims)}, expected {len(spec.shape)}"
            )
        for dim, want in zip(dims, spec.shape, strict=True):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


@contextlib.contextmanager
def _exportable_attention(torch: Any) -> Iterator[None]:
    """Disable nn.MultiheadAttention's fused fast path, which has no ONNX symbolic."""
    mha = torch.backends.mha
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


def _set_metadata(proto: onnx.ModelProto, entry: zoo.ZooModel, part: str, weights: str | None) -> None:
    meta = zoo.export_metadata(entry, part, weights)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "modelkiln"
