"""Backends: metadata, validation errors that name model/input/expected/got, I/O binding with the pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from modelkiln.errors import BackendError, BadInput, ModelNotFound
from modelkiln.runtime.backends import load_backend
from modelkiln.runtime.backends.onnxruntime import GraphOptimization, OrtOptions, cpu_backend
from modelkiln.runtime.backends.tensorrt import available as trt_available
from modelkiln.runtime.memory_pool import MemoryPool
from modelkiln.runtime.timing import interleaved_latency_ms


def _feed(batch: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.ones((batch, 4), np.float32), "scale": np.array([0.5], np.float32)}


def test_metadata_and_infer(tiny: Path) -> None:
    backend = load_backend(tiny)
    assert [(m.name, m.dtype, m.shape) for m in backend.input_metadata] == [
        ("x", "float32", ("batch", 4)),
        ("scale", "float32", (1,)),
    ]
    assert backend.output_metadata[0].shape == ("batch", 3)
    y = backend.infer(_feed())["y"]
    # column sums of arange(12).reshape(4, 3) are 18, 22, 26; times scale 0.5
    np.testing.assert_allclose(y, np.full((2, 3), [18, 22, 26], np.float32) * 0.5)
    assert backend.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({"x": np.ones((2, 4), np.float32)}, r"missing \['scale'\]"),
        ({**_feed(), "z": np.ones(1)}, r"unexpected \['z'\]"),
        (
            {**_feed(), "x": np.ones((2, 4), np.int64)},
            r"input 'x' expects float32\[batch, 4\], got int64\[2, 4\] \(dtype",
        ),
        ({**_feed(), "x": np.ones((2, 4, 1), np.float32)}, r"input 'x' .* \(rank 3 instead of 2\)"),
        ({**_feed(), "x": np.ones((2, 5), np.float32)}, r"input 'x' .* \(dim 1 is 5 instead of 4\)"),
        ({**_feed(), "scale": [0.5]}, r"input 'scale' .* \(not a numpy array\)"),
    ],
)
def test_bad_feeds_name_model_input_expected_and_got(tiny: Path, feed: dict, message: str) -> None:
    with pytest.raises(BadInput, match=message) as info:
        load_backend(tiny).infer(feed)
    assert str(info.value).startswith("tiny.onnx:")


def test_io_binding_puts_outputs_in_pool_buffers(tiny: Path) -> None:
    pool = MemoryPool()
    backend = load_backend(
        tiny, options=OrtOptions(io_binding=True, memory_pool=pool, optimization=GraphOptimization.BASIC)
    )
    plain = load_backend(tiny).infer(_feed(3))["y"]
    for _ in range(5):
        out = backend.infer(_feed(3))["y"]
        np.testing.assert_array_equal(out, plain)
        assert out.ctypes.data % 64 == 0
        out.release()
    stats = pool.stats()
    assert stats.misses == 1 and stats.hits == 4 and stats.outstanding == 0


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        OrtOptions(intra_op_threads=0)
    with pytest.raises(ValueError, match="io_binding"):
        OrtOptions(memory_pool=MemoryPool())
    with pytest.raises(TypeError):
        OrtOptions(optimization="all")  # type: ignore[arg-type]


def test_unavailable_provider_is_a_clear_error(tiny: Path) -> None:
    with pytest.raises(BackendError, match="CUDAExecutionProvider"):
        load_backend(tiny, options=OrtOptions(providers=("CUDAExecutionProvider",)))


def test_unknown_backend(tiny: Path) -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        load_backend(tiny, "openvino")


def test_torch_backend_matches_onnxruntime(tmp_path: Path) -> None:
    from modelkiln.export import export
    from modelkiln.runtime.backends.torch import TorchOptions

    path = tmp_path / "lite.onnx"
    export("efficientnet_lite0", path, weights="random", image_size=32)
    ref = load_backend("efficientnet_lite0", "torch", TorchOptions(weights="random", image_size=32))
    ort = load_backend(path)
    x = {"input": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    # random weights differ between builds, so compare shapes and validation, not values
    assert ref.infer(x)["logits"].shape == ort.infer(x)["logits"].shape == (2, 1000)
    with pytest.raises(BadInput, match="efficientnet_lite0/model"):
        ref.infer({"input": x["input"][:, :2]})


@pytest.mark.gpu
@pytest.mark.skipif(not trt_available(), reason="TensorRT and a CUDA GPU are not available here")
def test_tensorrt_matches_onnxruntime(tiny: Path) -> None:
    trt = load_backend(tiny, "tensorrt")
    np.testing.assert_allclose(trt.infer(_feed())["y"], load_backend(tiny).infer(_feed())["y"], rtol=1e-3)


# -- one way into ONNX Runtime: files, bytes and in-memory models, exposed tensors, metadata ------


def test_file_bytes_and_proto_load_alike_and_are_named(tiny: Path) -> None:
    proto = onnx.load(tiny)
    outputs = [cpu_backend(m).infer(_feed())["y"] for m in (tiny, tiny.read_bytes(), proto)]
    for y in outputs[1:]:
        np.testing.assert_array_equal(y, outputs[0])
    assert cpu_backend(tiny).model_name == "tiny.onnx"
    assert cpu_backend(proto).model_name == "<in-memory model>"


def test_expose_makes_intermediate_tensors_the_outputs(tiny: Path) -> None:
    backend = cpu_backend(tiny, optimization=GraphOptimization.DISABLE, expose=("m", "y"))
    assert [m.name for m in backend.output_metadata] == ["m", "y"]
    out = backend.infer(_feed())
    np.testing.assert_allclose(out["m"], np.full((2, 3), [18, 22, 26], np.float32))
    np.testing.assert_allclose(out["y"], out["m"] * 0.5)


def test_metadata_props_are_read_from_the_model(tiny: Path, tmp_path: Path) -> None:
    proto = onnx.load(tiny)
    onnx.helper.set_model_props(proto, {"modelkiln.family": "toy", "classes": "a,b"})
    assert load_backend(proto).metadata == {"modelkiln.family": "toy", "classes": "a,b"}
    assert load_backend(tiny).metadata == {}


def test_unknown_backend_kind_lists_the_known_ones(tiny: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'onnx'.*onnxruntime.*tensorrt.*torch"):
        load_backend(tiny, "onnx")


def test_missing_file_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="absent.onnx"):
        load_backend(tmp_path / "absent.onnx")


def test_interleaved_latency_times_every_backend(tiny: Path) -> None:
    class Counting:
        def __init__(self) -> None:
            self.inner, self.calls = cpu_backend(tiny), 0

        def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            self.calls += 1
            return self.inner.infer(feed)

    a, b = Counting(), Counting()
    times = interleaved_latency_ms({"a": a, "b": b}, _feed(), rounds=2, iterations=3)  # type: ignore[dict-item]
    assert set(times) == {"a", "b"} and a.calls == b.calls == 1 + 2 * 3
    assert all(0 < t["min"] <= t["median"] for t in times.values())
