"""The Qwen2-VL / Qwen2.5-VL vision encoder built from the weights (export/builder/vision.py): one
graph for any patch grid against transformers' encoder on square, wide, tall and odd grids (FP32,
atol 1e-4; measured ~1e-7), the grid tables computed in numpy against transformers' own, the same
graph from safetensors shards, W8/FP16 weights, the export's checks, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelkiln.errors import BadInput, ConfigError
from modelkiln.export.builder.layers import Precision

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

#: Patch grids (t, rows, columns): square, 3:1, 1:3, odd block counts, one block, a larger one.
GRIDS = ((1, 8, 8), (1, 4, 12), (1, 12, 4), (1, 6, 10), (1, 2, 2), (1, 10, 14), (1, 18, 26))
FAMILIES = ("qwen2-vl", "qwen2.5-vl")
TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    """(family, tiny model, vision config shape, built graph path) per family."""
    from modelkiln.export.builder.tensors import StateDict
    from modelkiln.export.builder.vision import VisionShape, build_vision
    from modelkiln.zoo.qwen_vl import build_tiny

    family = request.param
    model, _ = build_tiny(family=family)
    folder = tmp_path_factory.mktemp(family)
    path = build_vision(model.config.vision_config, family, StateDict(model.state_dict()), folder)
    return family, model, VisionShape.of(model.config.vision_config, family), path


def _pixels(grid: tuple[int, int, int], width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((int(np.prod(grid)), width)).astype(np.float32)


def test_one_graph_matches_transformers_on_every_grid(built) -> None:
    from modelkiln.export.builder.vision import vision_feed, vision_inputs
    from modelkiln.runtime.backends.onnxruntime import cpu_backend
    from modelkiln.zoo.qwen_vl import vision_reference

    family, model, shape, path = built
    backend = cpu_backend(path)  # optimised as the chat engine runs it
    assert [i.name for i in backend.input_metadata] == list(vision_inputs(family))
    assert all(isinstance(d, str) for i in backend.input_metadata for d in i.shape[:1])  # no fixed grid
    for seed, grid in enumerate(GRIDS):
        pixels = _pixels(grid, shape.patch_width, seed)
        got = backend.infer(vision_feed(pixels, grid, shape.to_dict()))["image_embeds"]
        ref = vision_reference(model.model.visual, pixels, grid)
        assert got.shape == ref.shape == (int(np.prod(grid)) // 4, shape.out)
        assert np.abs(got - ref).max() < TOL, (family, grid)


def test_grid_tables_are_transformers_own() -> None:
    """position_ids and Qwen2.5-VL's window order/ids, computed in numpy, against transformers'
    ``get_vision_position_ids`` / ``get_vision_window_index`` (windows of 112 px and 56 px)."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    from modelkiln.export.builder.vision import position_ids, window_layout

    for grid in (*GRIDS, (1, 30, 46), (1, 16, 16)):
        thw = torch.tensor([grid])
        assert np.array_equal(position_ids(grid, 2), get_vision_position_ids(thw, 2).numpy())
        for window in (112, 56):
            index, ids = window_layout(grid, 2, window, 14)
            ref_index, cu = get_vision_window_index(thw, 2, window, 14)
            assert np.array_equal(index, ref_index.numpy())
            # ids change exactly at the window boundaries transformers gives (cu is in patches)
            bounds = np.flatnonzero(np.diff(ids)) + 1
            assert np.array_equal(np.concatenate([[0], bounds, [len(ids)]]) * 4, cu.numpy())


def test_built_from_shards_is_the_same_graph(built, tmp_path: Path) -> None:
    """From a saved weights folder (safetensors, one tensor at a time) the graph computes the same."""
    from modelkiln.export.builder.tensors import SafetensorsFolder
    from modelkiln.export.builder.vision import build_vision, vision_feed
    from modelkiln.runtime.backends.onnxruntime import cpu_backend

    family, model, shape, path = built
    model.save_pretrained(tmp_path / "weights")
    again = build_vision(
        model.config.vision_config, family, SafetensorsFolder(tmp_path / "weights"), tmp_path / "out"
    )
    feed = vision_feed(_pixels((1, 6, 10), shape.patch_width), (1, 6, 10), shape.to_dict())
    a = cpu_backend(path).infer(feed)["image_embeds"]
    b = cpu_backend(again).infer(feed)["image_embeds"]
    assert np.array_equal(a, b)


@pytest.mark.parametrize(("precision", "min_cosine"), [(Precision.FP16, 0.9999), (Precision.W8, 0.999)])
def test_lower_precision_weights_stay_close(built, tmp_path: Path, precision, min_cosine) -> None:
    from modelkiln.export.builder.tensors import StateDict
    from modelkiln.export.builder.vision import build_vision, vision_feed
    from modelkiln.runtime.backends.onnxruntime import cpu_backend

    family, model, shape, path = built
    low = build_vision(
        model.config.vision_config, family, StateDict(model.state_dict()), tmp_path, precision=precision
    )
    kinds = {n.op_type for n in __import__("onnx").load(low).graph.node}
    assert ("MatMulNBits" in kinds) == (precision is Precision.W8)
    for grid in GRIDS[:4]:
        feed = vision_feed(_pixels(grid, shape.patch_width), grid, shape.to_dict())
        a = cpu_backend(path).infer(feed)["image_embeds"].ravel()
        b = cpu_backend(low).infer(feed)["image_embeds"].ravel()
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > min_cosine


def test_export_checks_the_encoder_on_square_wide_tall_and_odd_grids(tmp_path: Path) -> None:
    from modelkiln.export import export
    from modelkiln.zoo.qwen_vl import VISION_GRIDS

    result = export("qwen2.5-vl-tiny", tmp_path)
    checks = [p for p in result.parity if p.part == "vision"]
    assert len(checks) == len(VISION_GRIDS) == 4 and all(c.max_abs < 1e-5 for c in checks)
    assert (tmp_path / "vision.onnx").is_file() and not list(tmp_path.glob("vision_*.onnx"))


def test_errors_name_what_was_expected() -> None:
    from modelkiln.export.builder.vision import VisionShape, vision_feed
    from modelkiln.zoo.qwen_vl import build_tiny

    model, _ = build_tiny()
    vision = model.config.vision_config
    vision.hidden_act = "gelu"
    with pytest.raises(ConfigError, match="activation 'gelu' \\(quick_gelu expected\\)"):
        VisionShape.of(vision, "qwen2-vl")
    config = {"family": "qwen2-vl", "patch": 14, "merge": 2, "window": 0}
    with pytest.raises(BadInput, match="grid \\(1, 5, 8\\) is not one image of whole 2x2 patch blocks"):
        vision_feed(np.zeros((40, 1176), np.float32), (1, 5, 8), config)
    with pytest.raises(BadInput, match="grid \\(1, 4, 8\\) needs 32 patch rows, got \\(30, 1176\\)"):
        vision_feed(np.zeros((30, 1176), np.float32), (1, 4, 8), config)
