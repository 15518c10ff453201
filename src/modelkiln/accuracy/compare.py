"""``compare``: two backends on the same inputs, per output and (optionally) per layer.

Either side may be any runtime (ONNX Runtime, TensorRT): ``compare`` takes loaded ``Backend``s.
Per layer, intermediate tensors are exposed as extra outputs (``cpu_backend(model, expose=...)``)
and matched by name; in a QDQ model the value its consumers see is the dequantized one
(``<name>_dq``), so that is what is compared. The first layer in execution order whose SNR falls
below ``collapse_db`` is named: that is usually where to look. ``compare_models`` is the
convenience for callers holding model files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from modelkiln._deps import require
from modelkiln.errors import BadInput, ConfigError, ModelNotFound
from modelkiln.numerics import DiffAccumulator, TensorDiff, Tolerance, cosine, max_abs_error, snr_db
from modelkiln.runtime.backends import load_backend
from modelkiln.runtime.backends.base import Backend, BackendKind, ModelSource, source_name
from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend

COLLAPSE_DB = 15.0
MIN_COSINE = 0.99  # an output passes when its cosine to the reference is at least this
TOPK = (1, 5)

Feed = dict[str, npt.NDArray[Any]]


@dataclass
class CompareResult:
    reference: str
    candidate: str
    samples: int
    outputs: list[TensorDiff]
    layers: list[TensorDiff] = field(default_factory=list)  # execution order
    first_collapse: str | None = None
    min_cosine: float = MIN_COSINE

    @property
    def passed(self) -> bool:
        """Every output's cosine to the reference is at least ``min_cosine`` (its ``passed``)."""
        return all(o.passed for o in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


@dataclass(frozen=True)
class LoadedPair:
    """Reference and candidate loaded for ``compare``, with the layer pairs they expose."""

    reference: Backend
    candidate: Backend
    layers: tuple[tuple[str, str], ...] = ()


class _TopK:
    """Per-sample top-k agreement of a classifier output (rows of the batch axis)."""

    def __init__(self) -> None:
        self.agree: dict[int, list[float]] = {k: [] for k in TOPK}

    def add(self, reference: npt.NDArray[Any], candidate: npt.NDArray[Any]) -> None:
        if reference.ndim != 2:
            return
        for k, found in self.agree.items():
            top_r = np.argsort(-reference, 1)[:, :k]
            top_c = np.argsort(-candidate, 1)[:, :k]
            found.extend(len(set(a) & set(b)) / k for a, b in zip(top_r, top_c, strict=True))

    def result(self) -> dict[str, float] | None:
        return {f"top{k}": float(np.mean(v)) for k, v in self.agree.items() if v} or None


def layer_pairs(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> list[tuple[str, str]]:
    """(reference tensor, candidate tensor) pairs in the reference's execution order."""
    cand_names = {o for n in candidate.graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for node in reference.graph.node:
        for inp in node.input:
            readers.setdefault(inp, []).append(node.op_type)
    pairs = []
    for node in reference.graph.node:
        for out in node.output:
            if readers.get(out) in (["Relu"], ["Clip"]):
                continue  # quantized to the activation's range on purpose: compare after the activation
            if f"{out}_dq" in cand_names:
                pairs.append((out, f"{out}_dq"))
            elif out in cand_names:
                pairs.append((out, out))
    return pairs


def _graph(model: ModelSource) -> onnx.ModelProto:
    """The model's graph for matching tensor names; weights in external files are not read."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, Path)) and not Path(model).is_file():
        raise ModelNotFound(f"model file not found: {model}")
    try:
        if isinstance(model, bytes):
            return onnx.load_from_string(model)
        return onnx.load(str(model), load_external_data=False)
    except Exception as exc:
        raise BadInput(f"{source_name(model)} is not an ONNX model: {type(exc).__name__}") from exc


def load_pair(
    reference: ModelSource,
    candidate: ModelSource,
    per_layer: bool = False,
    reference_backend: BackendKind | str = BackendKind.ONNXRUNTIME,
    candidate_backend: BackendKind | str = BackendKind.ONNXRUNTIME,
) -> LoadedPair:
    """Load both models for ``compare``. ONNX Runtime runs on the CPU with basic graph
    optimisations (fusions would hide the tensors compared per layer); ``per_layer`` exposes
    every tensor the two graphs share by name, and needs ONNX Runtime on both sides."""
    kinds = BackendKind(reference_backend), BackendKind(candidate_backend)
    if not per_layer:
        return LoadedPair(_load(reference, kinds[0], ()), _load(candidate, kinds[1], ()))
    if kinds != (BackendKind.ONNXRUNTIME, BackendKind.ONNXRUNTIME):
        raise ConfigError(
            f"per-layer comparison exposes intermediate tensors, which needs onnxruntime on both "
            f"sides; got {kinds[0].value} and {kinds[1].value}"
        )
    ref_graph, cand_graph = _graph(reference), _graph(candidate)
    outputs = [o.name for o in ref_graph.graph.output]
    layers = tuple(p for p in layer_pairs(ref_graph, cand_graph) if p[0] not in outputs)
    return LoadedPair(
        _load(reference, kinds[0], (*outputs, *(a for a, _ in layers))),
        _load(candidate, kinds[1], (*outputs, *(b for _, b in layers))),
        layers,
    )


def _load(model: ModelSource, kind: BackendKind, expose: tuple[str, ...]) -> Backend:
    if kind is BackendKind.ONNXRUNTIME:
        return cpu_backend(model, optimization=GraphOptimization.BASIC, expose=expose)
    if kind is BackendKind.TORCH:
        raise ConfigError("compare runs ONNX models: choose onnxruntime or tensorrt")
    return load_backend(model, kind)


def compare(
    reference: Backend,
    candidate: Backend,
    feeds: Iterable[Feed],
    *,
    layers: Sequence[tuple[str, str]] = (),
    classifier: bool = False,
    collapse_db: float = COLLAPSE_DB,
    min_cosine: float = MIN_COSINE,
    names: tuple[str, str] | None = None,
    per_layer: bool = False,
) -> CompareResult:
    """Run both backends on every feed; accumulate per-output and per-layer error statistics.

    Outputs are the reference's outputs other than the reference names in ``layers`` (pairs of
    (reference tensor, candidate tensor) that both backends expose, see ``load_pair``).
    ``names`` label the two sides in the result (default: the backends' model names). For model
    files, ``compare_models`` loads the pair."""
    if not isinstance(reference, Backend) or not isinstance(candidate, Backend):
        raise ConfigError("compare() takes two loaded backends; for model files use compare_models()")
    if per_layer and not layers:
        raise ConfigError("per_layer needs the models: use load_pair(..., per_layer=True) or compare_models")
    layer_names = {a for a, _ in layers}
    out_names = [m.name for m in reference.output_metadata if m.name not in layer_names]
    pairs = [(n, n) for n in out_names] + list(layers)
    acc = {a: DiffAccumulator(a) for a, _ in pairs}
    topk = {n: _TopK() for n in out_names} if classifier else {}
    samples = 0
    for feed in feeds:
        ref, cand = reference.infer(feed), candidate.infer(feed)
        for a, b in pairs:
            if a not in ref:
                raise BadInput(f"{reference.model_name} does not expose tensor {a!r} (see load_pair)")
            if b not in cand:
                raise BadInput(f"{candidate.model_name} has no tensor {b!r} to compare with {a!r}")
            r, c = ref[a], cand[b]
            if r.shape == c.shape and np.issubdtype(r.dtype, np.floating):
                acc[a].add(c, r)
                if a in topk:
                    topk[a].add(np.asarray(r, np.float64), np.asarray(c, np.float64))
        samples += next(iter(feed.values())).shape[0]
    judge = Tolerance(atol=None, rtol=0.0, min_cosine=min_cosine)
    outputs = [
        acc[n].result(judge, topk_agreement=topk[n].result() if n in topk else None) for n in out_names
    ]
    layer_diffs = [acc[a].result() for a, _ in layers if acc[a].count]
    collapse = next((d.name for d in layer_diffs if d.snr_db < collapse_db), None)
    ref_name, cand_name = names or (reference.model_name, candidate.model_name)
    return CompareResult(ref_name, cand_name, samples, outputs, layer_diffs, collapse, min_cosine)


def compare_models(
    reference: ModelSource,
    candidate: ModelSource,
    feeds: Iterable[Feed],
    *,
    per_layer: bool = False,
    classifier: bool = False,
    collapse_db: float = COLLAPSE_DB,
    min_cosine: float = MIN_COSINE,
    reference_backend: BackendKind | str = BackendKind.ONNXRUNTIME,
    candidate_backend: BackendKind | str = BackendKind.ONNXRUNTIME,
) -> CompareResult:
    """``compare`` for callers holding models (files, bytes, protos): loads them (``load_pair``)
    and names them by their paths in the result."""
    pair = load_pair(reference, candidate, per_layer, reference_backend, candidate_backend)
    return compare(
        pair.reference,
        pair.candidate,
        feeds,
        layers=pair.layers,
        classifier=classifier,
        collapse_db=collapse_db,
        min_cosine=min_cosine,
        names=(label(reference), label(candidate)),
    )


def label(model: ModelSource) -> str:
    """How a result names a model: its path as given, or a placeholder for in-memory models."""
    return str(model) if isinstance(model, (str, Path)) else source_name(model)


def plot_layers(result: CompareResult, path: str | Path) -> Path:
    """SNR per layer in execution order (PNG), the collapse threshold as a line."""
    mpl = require("matplotlib", "compare plots")
    mpl.use("Agg")
    plt = require("matplotlib.pyplot", "compare plots")
    snr = [min(layer.snr_db, 80.0) for layer in result.layers]
    fig, ax = plt.subplots(figsize=(max(8, len(snr) * 0.06), 4))
    ax.plot(range(len(snr)), snr, marker=".", lw=1)
    ax.axhline(COLLAPSE_DB, color="tab:red", ls="--", lw=1, label=f"{COLLAPSE_DB:g} dB")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("SNR vs reference (dB, capped at 80)")
    ax.set_title(f"{Path(result.candidate).name} vs {Path(result.reference).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_cosines(
    reference: Backend, candidate: Backend, feeds: Iterable[Feed], output: int = 0
) -> npt.NDArray[np.float64]:
    """Cosine of candidate to reference per sample of one output (embeddings: the figure users
    rank by), over every feed; samples are rows of the batch axis."""
    name = reference.output_metadata[output].name
    cos: list[float] = []
    for feed in feeds:
        ref = reference.infer(feed)[name]
        cand = candidate.infer(feed)[name]
        cos.extend(cosine(c, r) for r, c in zip(ref, cand, strict=True))
    return np.asarray(cos, np.float64)


# keep the pure metrics importable from here for callers comparing single arrays
__all__ = [
    "COLLAPSE_DB",
    "CompareResult",
    "LoadedPair",
    "TensorDiff",
    "compare",
    "compare_models",
    "cosine",
    "label",
    "layer_pairs",
    "load_pair",
    "max_abs_error",
    "plot_layers",
    "sample_cosines",
    "snr_db",
]
