"""model_feeds: one way from sample files to a model's feeds; the model's real inputs name the
tensors (not weights an old exporter listed as inputs), folders or file lists, limits, and clear
errors for folders that are missing or hold nothing usable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelkiln.data.feeds import list_samples, model_feeds
from modelkiln.errors import BadInput, CalibrationError
from modelkiln.onnx_io import input_names


def _two_inputs(weights_as_input: bool) -> onnx.ModelProto:
    """y = a + b * w; with ``weights_as_input`` w is also listed as a graph input (old exporters)."""
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 3]),
    ]
    if weights_as_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [3]))
    graph = helper.make_graph(
        [helper.make_node("Mul", ["b", "w"], ["m"]), helper.make_node("Add", ["a", "m"], ["y"])],
        "two",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.ones(3, np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _npz_folder(folder: Path, count: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        np.savez(
            folder / f"{i:02d}.npz",
            a=rng.standard_normal((1, 3)).astype(np.float32),
            b=rng.standard_normal((1, 3)).astype(np.float32),
        )
    return folder


def test_input_names_skip_initializers_listed_as_inputs() -> None:
    assert input_names(_two_inputs(weights_as_input=True)) == ["a", "b"]
    assert input_names(_two_inputs(weights_as_input=False)) == ["a", "b"]


def test_feeds_from_a_folder_are_batched_for_the_model(tmp_path: Path) -> None:
    folder = _npz_folder(tmp_path / "s", 5)
    model = _two_inputs(weights_as_input=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    from_proto = list(model_feeds(model, folder, None, batch_size=2))
    from_file = list(model_feeds(path, folder, None, batch_size=2))
    assert [f["a"].shape[0] for f in from_proto] == [2, 2, 1]
    assert all(set(f) == {"a", "b"} for f in from_proto)
    for x, y in zip(from_proto, from_file, strict=True):
        assert np.array_equal(x["a"], y["a"]) and np.array_equal(x["b"], y["b"])
    limited = list(model_feeds(model, folder, None, batch_size=8, limit=3))
    assert [f["b"].shape[0] for f in limited] == [3]
    files = list_samples(folder)[3:]
    assert sum(f["a"].shape[0] for f in model_feeds(model, files, None, batch_size=8)) == 2


def test_missing_and_empty_folders_fail_before_any_feed_is_read(tmp_path: Path) -> None:
    model = _two_inputs(weights_as_input=False)
    with pytest.raises(CalibrationError, match="not found"):
        model_feeds(model, tmp_path / "missing", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no images"):
        model_feeds(model, tmp_path / "empty", None)


def test_tensor_keys_must_match_the_model_inputs(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    np.save(folder / "0.npy", np.zeros((1, 3), np.float32))  # one tensor, two inputs
    with pytest.raises(BadInput, match="use .npz"):
        list(model_feeds(_two_inputs(weights_as_input=False), folder, None))
