"""Golden sets (.npz without pickle) and the tolerances derived from measured drift: a faithful
rerun passes, a wrong model fails."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from modelkiln.delivery.errors import GoldenError
from modelkiln.delivery.findings import Status
from modelkiln.delivery.golden import (
    COS_FLOOR,
    FLOAT_FLOOR,
    MARGIN,
    SELF_FRACTION,
    GoldenSet,
    check_outputs,
    cosine,
    derive_tolerances,
    load_golden,
    max_abs,
    save_golden,
)


def golden_set() -> GoldenSet:
    rng = np.random.default_rng(0)
    ref = tuple({"y": rng.standard_normal((4, 10)).astype(np.float32)} for _ in range(3))
    drift = tuple({"y": (r["y"] + 0.05 * rng.standard_normal((4, 10))).astype(np.float32)} for r in ref)
    feeds = tuple({"x": rng.standard_normal((4, 3)).astype(np.float32)} for _ in range(3))
    return GoldenSet("m", ("x",), ("y",), feeds, ref, {"fp32": ref, "int8": drift})


def test_round_trip(tmp_path: Path) -> None:
    g = golden_set()
    back = load_golden(save_golden(tmp_path / "g.npz", g))
    assert back.model == "m" and back.inputs == ("x",) and back.outputs == ("y",)
    assert set(back.precisions) == {"fp32", "int8"}
    assert np.array_equal(back.precisions["int8"][2]["y"], g.precisions["int8"][2]["y"])
    assert np.array_equal(back.feeds[1]["x"], g.feeds[1]["x"])


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, __index__=np.array("{}"), x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(GoldenError, match="pickled Python objects"):
        load_golden(path)
    with pytest.raises(GoldenError, match="not numeric"):
        save_golden(
            tmp_path / "g.npz", GoldenSet("m", ("x",), (), ({"x": np.array(["a"], object)},), ({},), {})
        )


def test_unknown_or_missing_arrays_are_refused(tmp_path: Path) -> None:
    path = save_golden(tmp_path / "g.npz", golden_set())
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    del arrays["reference/1/0"]
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(GoldenError, match="'reference/1/0' is missing"):
        load_golden(tmp_path / "missing.npz")
    np.savez(tmp_path / "junk.npz", junk=np.zeros(3))
    with pytest.raises(GoldenError, match="not a modelkiln golden set"):
        load_golden(tmp_path / "junk.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(GoldenError, match="not a readable"):
        load_golden(tmp_path / "bad.npz")


def test_metrics() -> None:
    a = np.array([1.0, 2.0, 3.0])
    assert cosine(a, a) == pytest.approx(1.0) and cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0 and cosine(a, np.array([np.nan, 0, 0])) == 0.0
    assert max_abs(a, a + 0.5) == 0.5
    assert max_abs(np.array([np.nan]), np.array([np.nan])) == 0.0
    assert max_abs(np.array([np.nan]), np.array([1.0])) == math.inf


def test_tolerances_follow_the_measured_drift() -> None:
    g = golden_set()
    [t] = derive_tolerances(g.reference, g.precisions["int8"], ("y",))
    d_m = max(max_abs(o["y"], r["y"]) for o, r in zip(g.precisions["int8"], g.reference, strict=True))
    scale = max(float(np.abs(r["y"]).max()) for r in g.reference)
    assert t.measured_max_abs == pytest.approx(d_m)
    assert t.self_max_abs == pytest.approx(SELF_FRACTION * d_m + FLOAT_FLOOR * scale)
    assert t.fp32_max_abs == pytest.approx(MARGIN * d_m + FLOAT_FLOOR * scale)
    assert t.self_cosine_min > t.fp32_cosine_min > 0.99  # type: ignore[operator]
    [ref] = derive_tolerances(g.reference, g.reference, ("y",), is_reference=True)
    assert ref.self_cosine_min == pytest.approx(1 - COS_FLOOR) and ref.fp32_max_abs is None


def test_faithful_rerun_passes_and_wrong_outputs_fail() -> None:
    g = golden_set()
    tolerances = derive_tolerances(g.reference, g.precisions["int8"], ("y",), classifier=True)
    rng = np.random.default_rng(5)
    own = g.precisions["int8"]
    faithful = [
        {"y": (o["y"] * (1 + 1e-6 * rng.standard_normal(o["y"].shape))).astype(np.float32)} for o in own
    ]
    assert all(f.status is Status.PASS for f in check_outputs("m", "int8", faithful, g, tolerances))
    wrong = [{"y": (o["y"] + 0.05 * rng.standard_normal(o["y"].shape)).astype(np.float32)} for o in own]
    found = check_outputs("m", "int8", wrong, g, tolerances)
    [bad] = [f for f in found if f.failed and f.check == "golden"]
    assert bad.model == "m" and bad.precision == "int8" and "'y'" in bad.message
    assert bad.expected and bad.got and "max-abs" in bad.got


def test_missing_output_and_shape_change_fail() -> None:
    g = golden_set()
    tolerances = derive_tolerances(g.reference, g.precisions["int8"], ("y",))
    [f] = check_outputs("m", "int8", [{"z": o["y"]} for o in g.precisions["int8"]], g, tolerances)
    assert f.failed and "no output 'y'" in f.message
    short = [{"y": o["y"][:2]} for o in g.precisions["int8"]]
    assert any(
        f.failed and f.got == "shape (2, 10)" for f in check_outputs("m", "int8", short, g, tolerances)
    )


def test_outputs_whose_shape_varies_get_only_a_self_tolerance() -> None:
    ref = ({"boxes": np.ones((3, 6), np.float32)},)
    own = ({"boxes": np.ones((4, 6), np.float32)},)
    [t] = derive_tolerances(ref, own, ("boxes",))
    assert t.fp32_max_abs is None and t.self_max_abs > 0
