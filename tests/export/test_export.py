"""Export parity for every zoo family (random weights, small inputs), dynamic batch, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from modelkiln.errors import ExportError, ModelNotFound, ParityFailed
from modelkiln.export import export
from modelkiln.export.parity import Tolerance
from modelkiln.runtime.backends.onnxruntime import cpu_backend
from modelkiln.zoo import get

FAMILIES = {  # name -> small image size for fast tests
    "resnet50": 64,
    "efficientnet_lite0": 64,
    "yolov5n": 128,
    "clip-vit-b-32": 64,
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("zoo")
    results = {}
    for name, size in FAMILIES.items():
        target = out / name if name.startswith("clip") else out / f"{name}.onnx"
        results[name] = export(name, target, weights="random", image_size=size)
    return results


@pytest.mark.parametrize("name", list(FAMILIES))
def test_parity_with_torch(exported: dict, name: str) -> None:
    result = exported[name]
    assert result.passed
    assert {p.batch for p in result.parity} == {1, 3}
    for p in result.parity:
        assert p.cosine > 0.99999, p
        assert p.max_rel < 1e-4, p


def test_parity_records_name_every_output_and_keep_report_keys(exported: dict) -> None:
    """One record per (part, output, batch), judged against atol + rtol * max|torch| (>= atol);
    the JSON keeps the keys it had before the records were unified."""
    entry = get("clip-vit-b-32", image_size=FAMILIES["clip-vit-b-32"])
    result = exported["clip-vit-b-32"]
    want = {(part.name, spec.name, b) for part in entry.parts for spec in part.outputs for b in (1, 3)}
    assert {(p.part, p.name, p.batch) for p in result.parity} == want
    for p in result.parity:
        assert p.limit is not None and p.limit >= 1e-4 and p.max_abs <= p.limit and p.passed
    for d in result.to_dict()["parity"]:
        old_keys = {"part", "output", "batch", "max_abs", "max_rel", "cosine", "limit_abs", "passed"}
        assert old_keys <= set(d) and d["output"] == d["name"] and d["limit_abs"] == d["limit"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_exported_files_run_at_batch_1_and_3(exported: dict, name: str) -> None:
    entry = get(name, image_size=FAMILIES[name])
    for part, path in exported[name].files.items():
        backend = cpu_backend(path)
        spec = entry.part(part)
        assert [i.name for i in backend.input_metadata] == [s.name for s in spec.inputs]
        assert backend.input_metadata[0].shape[0] == "batch"
        for batch in (1, 3):
            out = backend.infer(entry.example_inputs(part, batch=batch))
            assert next(iter(out.values())).shape[0] == batch
        meta = backend.metadata
        assert meta["modelkiln.zoo"] == entry.name and meta["modelkiln.part"] == part


def test_clip_writes_one_file_per_part(exported: dict) -> None:
    files = exported["clip-vit-b-32"].files
    assert sorted(files) == ["image", "text"]
    assert {p.name for p in files.values()} == {"image.onnx", "text.onnx"}


def test_yolov5_layout_matches_official(exported: dict) -> None:
    model = onnx.load(exported["yolov5n"].files["model"])
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and out.name == "output0"
    dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert dims == ["batch", 3 * (16 * 16 + 8 * 8 + 4 * 4), 85]  # 128 px input: strides 8/16/32


def test_nms_export_gives_detection_rows(tmp_path: Path) -> None:
    path = tmp_path / "e2e.onnx"
    export("yolov5n", path, weights="random", image_size=64, nms=True)
    backend = cpu_backend(path)
    assert [o.name for o in backend.output_metadata] == ["detections"]
    images = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    rows = backend.infer({"images": images})["detections"]
    assert rows.ndim == 2 and rows.shape[1] == 7
    assert set(np.unique(rows[:, 0])) <= {0.0, 1.0}


def test_parity_failure_raises_and_writes_nothing(tmp_path: Path) -> None:
    impossible = Tolerance(atol=0.0, rtol=0.0, min_cosine=1.0)
    with pytest.raises(ParityFailed, match="differs from torch"):
        export(
            "efficientnet_lite0", tmp_path / "x.onnx", weights="random", image_size=32, tolerance=impossible
        )
    assert not list(tmp_path.iterdir())


def test_nms_on_classifier_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="detectors"):
        export("resnet50", tmp_path / "x.onnx", nms=True)


def test_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="unknown model 'yolov9'"):
        export("yolov9", tmp_path / "x.onnx")
