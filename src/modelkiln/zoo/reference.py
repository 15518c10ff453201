"""The zoo's side of the torch backend: a zoo name or an exported file -> the torch module to run.

``zoo`` installs ``torch_model`` into ``runtime.backends.torch`` when it is imported, so
``load_backend(path, "torch")`` runs the very family, part and weights an export recorded.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from modelkiln.errors import BadInput, ModelNotFound, WeightsError
from modelkiln.runtime.backends.base import TensorMeta
from modelkiln.runtime.backends.torch import TorchModel, TorchOptions
from modelkiln.zoo.base import Part, TensorSpec, ZooModel
from modelkiln.zoo.registry import PART_KEY, WEIGHTS_KEY, entry_from_metadata, export_metadata, get
from modelkiln.zoo.registry import input_image_size as image_size_of
from modelkiln.zoo.weights import is_path


def torch_model(source: str | Path, options: TorchOptions) -> TorchModel:
    """Build the torch module ``source`` names: a zoo name (its first part, default weights unless
    ``options`` say otherwise) or an exported .onnx file (the family, part and weights it records)."""
    path = Path(source)
    if path.suffix == ".onnx" or path.is_file():
        entry, part_name, weights = _from_file(path, options)
    else:
        entry = get(str(source), options.image_size)
        part_name = options.part
        weights = options.weights if options.weights is not None else entry.default_weights
    modules = entry.build(weights)  # before parts: some families learn their shapes from the weights
    part = _part(entry, part_name or entry.parts[0].name)
    module = modules[part.name]
    return TorchModel(
        module,
        f"{entry.name}/{part.name} (torch)",
        _metas(part.inputs),
        _metas(part.outputs),
        export_metadata(entry, part.name, weights),  # after build: settings the weights brought
    )


def _from_file(path: Path, options: TorchOptions) -> tuple[ZooModel, str | None, str | None]:
    if not path.is_file():
        raise ModelNotFound(f"model file not found: {path}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise BadInput(f"{path} is not an ONNX model: {type(exc).__name__}: {str(exc)[:200]}") from exc
    metadata = {p.key: p.value for p in proto.metadata_props}
    initializers = {t.name for t in proto.graph.initializer}
    shapes = [
        [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in proto.graph.input
        if i.name not in initializers
    ]
    entry = entry_from_metadata(metadata, options.image_size or image_size_of(shapes))
    if entry is None:
        raise BadInput(f"{path} carries no modelkiln metadata; the torch backend needs a zoo export or name")
    part = options.part or metadata.get(PART_KEY)
    weights = options.weights if options.weights is not None else _recorded(path, metadata.get(WEIGHTS_KEY))
    return entry, part, weights


def _recorded(model: Path, weights: str | None) -> str | None:
    """The weights an export recorded, as something ``build`` can load: a release name or 'random'
    as it is; a file name (exports keep only the name) found beside the model or here."""
    if weights is None or not is_path(weights):
        return weights
    for candidate in (model.parent / weights, Path(weights)):
        if candidate.is_file():
            return str(candidate)
    raise WeightsError(
        f"{model} was exported from weights file {weights!r}, which is neither beside it nor here; "
        "give the torch backend its weights"
    )


def _part(entry: ZooModel, name: str) -> Part:
    for part in entry.parts:
        if part.name == name:
            return part
    raise BadInput(f"{entry.name} has no part {name!r}; parts: {[p.name for p in entry.parts]}")


def _metas(specs: tuple[TensorSpec, ...]) -> tuple[TensorMeta, ...]:
    return tuple(TensorMeta(s.name, s.dtype, s.shape) for s in specs)
