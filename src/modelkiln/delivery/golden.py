"""Golden sets: a few inputs, the FP32 reference outputs and each precision's own outputs, stored in
``.npz`` (``np.savez``; read with ``allow_pickle=False``, so a file holding Python objects is
refused), and the tolerances a target machine is held to.

**How tolerances are derived** (``derive_tolerances``), per model, precision and output, from what
was measured on the build machine. ``ref`` is the FP32 output, ``own`` the precision's output, both
on the golden inputs; ``scale`` is the largest ``|ref|``:

- measured drift: ``θ_m`` = the largest angle between ``own`` and ``ref`` over the golden inputs
  (cosine similarity = cos θ) and ``d_m`` = the largest absolute difference.
- against its **own** golden outputs a rerun must match tightly: angle ≤ ``SELF_FRACTION`` × θ_m +
  θ_floor and max-abs ≤ ``SELF_FRACTION`` × d_m + ``FLOAT_FLOOR`` × scale. A faithful run on another
  CPU differs from the build only by float rounding (FP32: ~1e-7 relative; an INT8 model whose
  float layers round differently on AVX2 and AVX-512 may move one int8 step here and there, a few
  percent of its quantization error), while a wrong one (an INT8 format whose int16 pair sums
  saturate on this CPU, a different model planted) errs by about as much as the whole quantization
  error or more. A quarter of the measured drift lies between the two; the floors cover float
  rounding of precisions with no drift (FP32 itself): θ_floor = acos(1 - ``COS_FLOOR``).
- against the **FP32** reference a rerun must stay within its measured drift with a margin:
  angle ≤ ``MARGIN`` × θ_m + θ_floor, max-abs ≤ ``MARGIN`` × d_m + ``FLOAT_FLOOR`` × scale. By the
  triangle inequality (angles and max-abs both obey it) a run that passes its own check passes this
  one; it is the check that still means something where a precision's own outputs cannot be
  matched (another backend, e.g. TensorRT, whose kernels differ from ONNX Runtime's CPU ones).
- **top-1** for classifiers (task "classification", float outputs ``[..., classes]``): rows whose
  golden top-2 gap is at most 2 × the self max-abs tolerance may flip without anything being wrong
  ("ambiguous"); every other row must keep its golden top-1, and agreement with FP32's top-1 must be
  at least the measured agreement less the ambiguous rows that agreed.

Outputs whose shape differs between the precision and FP32 on a golden input (e.g. a detector's
variable number of boxes) get no FP32 tolerance and a self tolerance of ``UNMEASURED`` floors
(cosine distance 1e-4, max-abs 1% of scale): only the self check applies to them.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.delivery.errors import GoldenError
from modelkiln.delivery.findings import Finding, Status
from modelkiln.delivery.manifest import OutputTolerance

GOLDEN_FORMAT = "modelkiln.golden/1"
INDEX_KEY = "__index__"
#: Share of the measured drift (angle, max-abs) a faithful rerun may differ from its own outputs.
SELF_FRACTION = 0.25
#: Multiple of the measured drift a rerun may differ from FP32.
MARGIN = 2.0
#: Float-rounding floor of max-abs tolerances, relative to the output's scale (largest |FP32 value|).
FLOAT_FLOOR = 1e-3
#: Float-rounding floor of cosine tolerances, as a cosine distance (1 - cosine).
COS_FLOOR = 1e-5
#: Outputs with no measurable drift vs FP32 (shapes differ): self tolerances are this many floors.
UNMEASURED = 10.0
#: The precision every other one is compared to.
REFERENCE = "fp32"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class GoldenSet:
    """One model's golden set: per golden input ("feed"), the inputs, FP32 reference outputs and
    each precision's own outputs (all by name)."""

    model: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    feeds: tuple[Feed, ...]
    reference: tuple[Feed, ...]
    precisions: dict[str, tuple[Feed, ...]]


def save_golden(path: Path, golden: GoldenSet) -> Path:
    """Write ``golden`` as ``.npz``: ``__index__`` (a JSON string: names and counts) and one array per
    ``input/<feed>/<i>``, ``reference/<feed>/<k>`` and ``output/<precision>/<feed>/<k>`` (indices into
    the index's input and output names, so tensor names never become file names)."""
    arrays: dict[str, np.ndarray] = {}
    for p in golden.precisions:
        if not _NAME.match(p):
            raise GoldenError(f"precision name {p!r}: letters, digits, '_', '.', '-' only")
    for f, feed in enumerate(golden.feeds):
        for i, name in enumerate(golden.inputs):
            arrays[f"input/{f}/{i}"] = _plain(feed, name, f"golden input {f}")
        for k, name in enumerate(golden.outputs):
            arrays[f"reference/{f}/{k}"] = _plain(golden.reference[f], name, f"reference output {f}")
            for p, outs in golden.precisions.items():
                arrays[f"output/{p}/{f}/{k}"] = _plain(outs[f], name, f"{p} output {f}")
    index = {
        "format": GOLDEN_FORMAT,
        "model": golden.model,
        "inputs": list(golden.inputs),
        "outputs": list(golden.outputs),
        "feeds": len(golden.feeds),
        "precisions": list(golden.precisions),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    savez: Any = np.savez  # numpy's stub types **kwds as its own keyword options
    with path.open("wb") as fh:
        savez(fh, **{INDEX_KEY: np.array(json.dumps(index))}, **arrays)
    return path


def _plain(feed: Mapping[str, Any], name: str, what: str) -> np.ndarray:
    if name not in feed:
        raise GoldenError(f"{what}: no tensor named '{name}'")
    a = np.asarray(feed[name])
    if a.dtype.kind not in "biufc":
        raise GoldenError(f"{what} '{name}': dtype {a.dtype} is not numeric (golden sets hold numbers only)")
    return a


def load_golden(path: Path) -> GoldenSet:
    """Read a golden set; refuses pickled objects, unknown or missing keys, non-numeric arrays."""
    if not zipfile.is_zipfile(path):
        raise GoldenError(f"{path}: not a readable .npz (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise GoldenError(
                f"{path}: holds pickled Python objects; golden sets hold numbers only"
            ) from None
        raise GoldenError(f"{path}: not a readable .npz ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise GoldenError(f"{path}: not a readable .npz ({exc})") from None
    if INDEX_KEY not in data or data[INDEX_KEY].dtype.kind != "U" or data[INDEX_KEY].ndim != 0:
        raise GoldenError(f"{path}: no '{INDEX_KEY}' string (not a modelkiln golden set)")
    try:
        index = json.loads(str(data.pop(INDEX_KEY)))
        fmt, model = index["format"], str(index["model"])
        inputs = tuple(str(n) for n in index["inputs"])
        outputs = tuple(str(n) for n in index["outputs"])
        count, precisions = int(index["feeds"]), [str(p) for p in index["precisions"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise GoldenError(f"{path}: '{INDEX_KEY}' is not a golden index ({exc!r})") from None
    if fmt != GOLDEN_FORMAT:
        raise GoldenError(f"{path}: format '{fmt}', this modelkiln reads '{GOLDEN_FORMAT}'")

    def take(key: str) -> np.ndarray:
        if key not in data:
            raise GoldenError(f"{path}: array '{key}' is missing")
        a: np.ndarray = data.pop(key)
        if a.dtype.kind not in "biufc":
            raise GoldenError(f"{path}: array '{key}' has dtype {a.dtype}; golden sets hold numbers only")
        return a

    feeds = tuple({n: take(f"input/{f}/{i}") for i, n in enumerate(inputs)} for f in range(count))
    reference = tuple({n: take(f"reference/{f}/{k}") for k, n in enumerate(outputs)} for f in range(count))
    own = {
        p: tuple({n: take(f"output/{p}/{f}/{k}") for k, n in enumerate(outputs)} for f in range(count))
        for p in precisions
    }
    if data:
        raise GoldenError(f"{path}: unexpected arrays {sorted(data)[:5]}")
    return GoldenSet(model, inputs, outputs, feeds, reference, own)


# --- metrics ---------------------------------------------------------------------------------


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two tensors flattened, in float64 (1.0 for two all-zero tensors; 0.0
    when either holds NaN or infinity)."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return 0.0
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return float(np.clip(np.dot(x, y) / (nx * ny), -1.0, 1.0))


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference in float64; NaN or infinity where the other is not counts as
    infinite, the same non-finite value on both sides as equal."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    same = (x == y) | (np.isnan(x) & np.isnan(y))
    diff = np.where(same, 0.0, np.abs(x - y))
    diff = np.where(np.isnan(diff), np.inf, diff)
    return float(diff.max()) if diff.size else 0.0


def angle(cos: float) -> float:
    return math.acos(min(1.0, max(-1.0, cos)))


def is_class_scores(a: np.ndarray) -> bool:
    """A float output with a class axis last: [..., classes] with more than one class."""
    return a.dtype.kind == "f" and a.ndim >= 2 and a.shape[-1] > 1


def _rows(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float64).reshape(-1, a.shape[-1])


def top1(a: np.ndarray) -> np.ndarray:
    return np.asarray(_rows(a).argmax(axis=1))


def top2_gap(a: np.ndarray) -> np.ndarray:
    """Per row, the gap between the largest and second-largest score."""
    part = np.sort(_rows(a), axis=1)
    return np.asarray(part[:, -1] - part[:, -2])


# --- tolerances ------------------------------------------------------------------------------


def _scale(outs: Sequence[np.ndarray]) -> float:
    values = [float(np.abs(np.asarray(o, np.float64)).max()) for o in outs if np.asarray(o).size]
    finite = [v for v in values if math.isfinite(v)]
    return max(finite, default=0.0) or 1e-12


def derive_tolerances(
    reference: Sequence[Mapping[str, np.ndarray]],
    own: Sequence[Mapping[str, np.ndarray]],
    outputs: Sequence[str],
    classifier: bool = False,
    is_reference: bool = False,
) -> tuple[OutputTolerance, ...]:
    """Tolerances per output of one precision (module docstring: how). ``reference`` and ``own``
    are the FP32 and the precision's outputs per golden input, measured on the build machine;
    ``is_reference`` for the FP32 precision itself (no drift: floors only)."""
    theta_floor = angle(1.0 - COS_FLOOR)
    found = []
    for name in outputs:
        refs = [r[name] for r in reference]
        mine = [o[name] for o in own]
        comparable = all(r.shape == m.shape for r, m in zip(refs, mine, strict=True))
        scale = _scale(refs if comparable else mine)
        floor = FLOAT_FLOOR * scale
        if is_reference:
            theta_m, d_m = 0.0, 0.0
        elif comparable:
            theta_m = max(angle(cosine(m, r)) for r, m in zip(refs, mine, strict=True))
            d_m = max(max_abs(m, r) for r, m in zip(refs, mine, strict=True))
        else:
            theta_m, d_m = None, None
        if theta_m is None or d_m is None or not (math.isfinite(theta_m) and math.isfinite(d_m)):
            # no drift to scale by: ten times the floors (cosine distance and max-abs)
            found.append(
                OutputTolerance(
                    name,
                    1.0 - UNMEASURED * COS_FLOOR,
                    UNMEASURED * floor,
                    None,
                    None,
                    None,
                    None,
                    scale=scale,
                )
            )
            continue
        self_theta = SELF_FRACTION * theta_m + theta_floor
        self_abs = SELF_FRACTION * d_m + floor
        fp32_theta = min(math.pi, MARGIN * theta_m + theta_floor)
        top1_min = measured_top1 = None
        if classifier and all(is_class_scores(m) for m in mine):
            measured_top1, top1_min = _top1_figures(refs, mine, self_abs)
        found.append(
            OutputTolerance(
                name,
                self_cosine_min=math.cos(self_theta),
                self_max_abs=self_abs,
                fp32_cosine_min=None if is_reference else math.cos(fp32_theta),
                fp32_max_abs=None if is_reference else MARGIN * d_m + floor,
                measured_cosine=math.cos(theta_m),
                measured_max_abs=d_m,
                top1_min=top1_min,
                measured_top1=measured_top1,
                scale=scale,
            )
        )
    return tuple(found)


def _top1_figures(
    refs: Sequence[np.ndarray], mine: Sequence[np.ndarray], self_abs: float
) -> tuple[float, float]:
    """(measured agreement with FP32, least agreement allowed): agreeing rows that are ambiguous
    (top-2 gap ≤ 2 × self max-abs) may flip on a faithful target, so they are not counted on."""
    agree = np.concatenate([top1(m) == top1(r) for r, m in zip(refs, mine, strict=True)])
    ambiguous = np.concatenate([top2_gap(m) <= 2 * self_abs for m in mine])
    rows = max(agree.size, 1)
    return float(agree.sum()) / rows, float((agree & ~ambiguous).sum()) / rows


# --- checks ----------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def check_outputs(
    model: str,
    precision: str,
    got: Sequence[Mapping[str, np.ndarray]],
    golden: GoldenSet,
    tolerances: Sequence[OutputTolerance],
    self_check: bool = True,
) -> list[Finding]:
    """Findings of outputs ``got`` (one per golden input) against the precision's own golden outputs
    (check "golden", when ``self_check``) and the FP32 reference (check "golden-fp32", for other
    precisions), with top-1 checks where the tolerances carry them (check "top1")."""
    own = golden.precisions.get(precision)
    if own is None:
        return [_fail("golden", model, precision, "the golden set has no outputs for this precision")]
    found: list[Finding] = []
    by_name = {t.output: t for t in tolerances}
    for name in golden.outputs:
        tol = by_name.get(name)
        if tol is None:
            found.append(
                _fail("golden", model, precision, f"no tolerance for output '{name}' in the manifest")
            )
            continue
        mine = [g.get(name) for g in got]
        if any(m is None for m in mine):
            found.append(_fail("golden", model, precision, f"the model has no output '{name}'"))
            continue
        outs = [m for m in mine if m is not None]
        if self_check:
            found.append(
                _compare(
                    "golden",
                    model,
                    precision,
                    name,
                    outs,
                    [o[name] for o in own],
                    tol.self_cosine_min,
                    tol.self_max_abs,
                    "its own golden outputs",
                )
            )
            if tol.top1_min is not None:
                found.append(
                    _self_top1(model, precision, name, outs, [o[name] for o in own], tol.self_max_abs)
                )
        if precision != REFERENCE and tol.fp32_cosine_min is not None and tol.fp32_max_abs is not None:
            found.append(
                _compare(
                    "golden-fp32",
                    model,
                    precision,
                    name,
                    outs,
                    [r[name] for r in golden.reference],
                    tol.fp32_cosine_min,
                    tol.fp32_max_abs,
                    "the FP32 reference",
                )
            )
            if tol.top1_min is not None:
                found.append(
                    _fp32_top1(model, precision, name, outs, [r[name] for r in golden.reference], tol)
                )
    return found


def _fail(check: str, model: str, precision: str, message: str) -> Finding:
    return Finding(check, Status.FAIL, message, model, precision)


def _compare(
    check: str,
    model: str,
    precision: str,
    output: str,
    got: Sequence[np.ndarray],
    want: Sequence[np.ndarray],
    cos_min: float,
    abs_max: float,
    against: str,
) -> Finding:
    expected = f"cosine >= {_fmt(cos_min)}, max-abs <= {_fmt(abs_max)}"
    worst_cos, worst_abs, worst_feed = 1.0, 0.0, 0
    for f, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape:
            return Finding(
                check,
                Status.FAIL,
                f"output '{output}' on golden input {f}: shape differs from {against}",
                model,
                precision,
                f"shape {w.shape}",
                f"shape {g.shape}",
            )
        c, d = cosine(g, w), max_abs(g, w)
        if c < worst_cos or d > worst_abs:
            worst_feed = f
        worst_cos, worst_abs = min(worst_cos, c), max(worst_abs, d)
    got_text = f"cosine {_fmt(worst_cos)}, max-abs {_fmt(worst_abs)}"
    ok = worst_cos >= cos_min and worst_abs <= abs_max
    where = f"output '{output}' vs {against}" + ("" if ok else f" (worst on golden input {worst_feed})")
    return Finding(check, Status.PASS if ok else Status.FAIL, where, model, precision, expected, got_text)


def _self_top1(
    model: str,
    precision: str,
    output: str,
    got: Sequence[np.ndarray],
    own: Sequence[np.ndarray],
    self_abs: float,
) -> Finding:
    if any(g.shape != o.shape for g, o in zip(got, own, strict=True)):
        return _fail("top1", model, precision, f"output '{output}': shape differs from its golden outputs")
    same = np.concatenate([top1(g) == top1(o) for g, o in zip(got, own, strict=True)])
    decisive = np.concatenate([top2_gap(o) > 2 * self_abs for o in own])
    changed = int((~same & decisive).sum())
    ok = changed == 0
    return Finding(
        "top1",
        Status.PASS if ok else Status.FAIL,
        f"output '{output}': top-1 vs its own golden outputs ({int((~decisive).sum())} near-tie rows not counted)",
        model,
        precision,
        f"all {int(decisive.sum())} decisive rows keep their top-1",
        f"{changed} changed",
    )


def _fp32_top1(
    model: str,
    precision: str,
    output: str,
    got: Sequence[np.ndarray],
    refs: Sequence[np.ndarray],
    tol: OutputTolerance,
) -> Finding:
    if any(g.shape != r.shape for g, r in zip(got, refs, strict=True)):
        return _fail("top1", model, precision, f"output '{output}': shape differs from the FP32 reference")
    agree = np.concatenate([top1(g) == top1(r) for g, r in zip(got, refs, strict=True)])
    share = float(agree.mean()) if agree.size else 1.0
    least = tol.top1_min if tol.top1_min is not None else 0.0
    ok = share >= least - 1e-12
    measured = "" if tol.measured_top1 is None else f" (build machine: {tol.measured_top1:.3f})"
    return Finding(
        "top1",
        Status.PASS if ok else Status.FAIL,
        f"output '{output}': top-1 agreement with FP32{measured}",
        model,
        precision,
        f">= {least:.3f}",
        f"{share:.3f} ({int(agree.sum())}/{agree.size} rows)",
    )
