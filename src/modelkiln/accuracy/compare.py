"""``compare``: two models on the same inputs, per output and (optionally) per layer.

Per layer, tensors are matched by name; in a QDQ model the value its consumers see is the
dequantized one (``<name>_dq``), so that is what is compared. The first layer in execution order
whose SNR falls below ``collapse_db`` is named: that is usually where to look.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelkiln.accuracy.metrics import cosine, max_abs_error, snr_db
from modelkiln.runtime.session import expose_outputs, ort_session

COLLAPSE_DB = 15.0


@dataclass
class TensorDiff:
    name: str
    max_abs: float
    mean_abs: float
    cosine: float
    snr_db: float
    topk_agreement: dict[str, float] | None = None


@dataclass
class CompareResult:
    reference: str
    candidate: str
    samples: int
    outputs: list[TensorDiff]
    layers: list[TensorDiff] = field(default_factory=list)  # execution order
    first_collapse: str | None = None
    min_cosine: float = 0.99

    @property
    def passed(self) -> bool:
        return all(o.cosine >= self.min_cosine for o in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


class _Accumulator:
    """Streaming error statistics of one tensor over batches (bounded memory)."""

    def __init__(self, name: str) -> None:
        self.name, self.max_abs, self.abs_sum, self.n = name, 0.0, 0.0, 0
        self.dot = self.ref_sq = self.cand_sq = self.noise_sq = 0.0
        self.topk: dict[int, list[float]] = {1: [], 5: []}

    def add(self, ref: np.ndarray, cand: np.ndarray, classifier: bool) -> None:
        r, c = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
        diff = c - r
        self.max_abs = max(self.max_abs, float(np.abs(diff).max()) if diff.size else 0.0)
        self.abs_sum += float(np.abs(diff).sum())
        self.n += diff.size
        self.dot += float((r * c).sum())
        self.ref_sq += float((r * r).sum())
        self.cand_sq += float((c * c).sum())
        self.noise_sq += float((diff * diff).sum())
        if classifier and r.ndim == 2:
            for k in self.topk:
                top_r = np.argsort(-r, 1)[:, :k]
                top_c = np.argsort(-c, 1)[:, :k]
                self.topk[k].extend(len(set(a) & set(b)) / k for a, b in zip(top_r, top_c, strict=True))

    def result(self, classifier: bool) -> TensorDiff:
        cos = (
            self.dot / np.sqrt(self.ref_sq * self.cand_sq)
            if self.ref_sq and self.cand_sq
            else float(self.ref_sq == self.cand_sq)
        )
        snr = (
            float("inf")
            if self.noise_sq == 0
            else 10 * np.log10(self.ref_sq / self.noise_sq)
            if self.ref_sq
            else -np.inf
        )
        topk = {f"top{k}": float(np.mean(v)) for k, v in self.topk.items() if v} if classifier else None
        return TensorDiff(
            self.name, self.max_abs, self.abs_sum / max(self.n, 1), float(cos), float(snr), topk or None
        )


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


def compare(
    reference: str | Path,
    candidate: str | Path,
    feeds: Iterable[dict[str, np.ndarray]],
    per_layer: bool = False,
    classifier: bool = False,
    collapse_db: float = COLLAPSE_DB,
) -> CompareResult:
    """Run both models on every feed; accumulate per-output (and per-layer) error statistics."""
    ref_model, cand_model = onnx.load(reference), onnx.load(candidate)
    out_names = [o.name for o in ref_model.graph.output]
    pairs = [(n, n) for n in out_names]
    if per_layer:
        pairs += [p for p in layer_pairs(ref_model, cand_model) if p[0] not in out_names]
    ref_sess = ort_session(
        expose_outputs(ref_model, [a for a, _ in pairs]).SerializeToString(), optimization="basic"
    )
    cand_sess = ort_session(
        expose_outputs(cand_model, [b for _, b in pairs]).SerializeToString(), optimization="basic"
    )
    acc = {a: _Accumulator(a) for a, _ in pairs}
    samples = 0
    for feed in feeds:
        ref = dict(zip([a for a, _ in pairs], ref_sess.run(None, feed), strict=True))
        cand = dict(zip([a for a, _ in pairs], cand_sess.run(None, feed), strict=True))
        for a, _ in pairs:
            if ref[a].shape == cand[a].shape and np.issubdtype(ref[a].dtype, np.floating):
                acc[a].add(ref[a], cand[a], classifier and a in out_names)
        samples += next(iter(feed.values())).shape[0]
    outputs = [acc[n].result(classifier) for n in out_names]
    layers = [acc[a].result(False) for a, _ in pairs[len(out_names) :] if acc[a].n]
    collapse = next((layer.name for layer in layers if layer.snr_db < collapse_db), None)
    return CompareResult(str(reference), str(candidate), samples, outputs, layers, collapse)


def plot_layers(result: CompareResult, path: str | Path) -> Path:
    """SNR per layer in execution order (PNG), the collapse threshold as a line."""
    from modelkiln._deps import require

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


# keep the pure metrics importable from here for callers comparing single arrays
__all__ = [
    "CompareResult",
    "TensorDiff",
    "compare",
    "cosine",
    "layer_pairs",
    "max_abs_error",
    "plot_layers",
    "sample_cosines",
    "snr_db",
]


def sample_cosines(
    reference: str | Path, candidate: str | Path, feeds: Iterable[dict[str, np.ndarray]], output: int = 0
) -> np.ndarray:
    """Cosine of candidate to reference per sample of one output (embeddings: the figure users
    rank by), over every feed; samples are rows of the batch axis."""
    ref_sess, cand_sess = ort_session(str(reference)), ort_session(str(candidate))
    name = ref_sess.get_outputs()[output].name
    cos: list[float] = []
    for feed in feeds:
        ref = ref_sess.run([name], feed)[0]
        cand = cand_sess.run([name], feed)[0]
        cos.extend(cosine(c, r) for r, c in zip(ref, cand, strict=True))
    return np.asarray(cos)
