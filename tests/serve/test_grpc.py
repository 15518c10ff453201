"""kiln serve over KServe v2 gRPC, through Triton's own ``tritonclient.grpc``: the same numbers as
HTTP for the same input, metadata, health, repository control and its refusal, request ids, the
status codes Triton gives (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, RESOURCE_EXHAUSTED,
UNAUTHENTICATED, PERMISSION_DENIED) with messages that name the model and the input, the API key
as metadata, shutdown with the HTTP server; and the tensor codec as a property."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import Running, free_port
from modelkiln.errors import (
    BadInput,
    DeadlineExceeded,
    MissingDependency,
    ModelNotFound,
    ModelUnavailable,
    PayloadTooLarge,
    PoolExhausted,
    QueueFull,
)
from modelkiln.serve.grpc import (
    GRPC_TYPES,
    GrpcFrontEnd,
    GrpcOptions,
    decode_contents,
    decode_raw,
    encode_bytes,
    encode_output,
    grpc_code,
    require_grpc,
)
from modelkiln.serve.security import Security

grpcclient = pytest.importorskip("tritonclient.grpc")
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

KEY = "k3y-for-tests-0123456789"
ADMIN = "adm1n-for-tests-0123456789"


class Both(Running):
    """``Running`` (HTTP on a free port) with the gRPC front end started by the app's lifespan, as
    ``kiln serve --grpc-port`` starts it."""

    def __init__(self, repo: Path, security: Security | None = None, max_body: int = 1 << 20) -> None:
        from modelkiln.serve import http

        self.grpc_port = free_port()
        original = http.create_app

        def with_grpc(*args, **kwargs):
            return original(*args, **kwargs, grpc=GrpcOptions(self.grpc_port, grace_s=5))

        http.create_app = with_grpc  # Running imports create_app from the module when it starts
        try:
            super().__init__(repo, max_body=max_body, security=security)
        finally:
            http.create_app = original
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"


@pytest.fixture(scope="module")
def both(repo: Path) -> Iterator[Both]:
    r = Both(repo)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def locked(repo: Path) -> Iterator[Both]:
    r = Both(repo, security=Security(api_key=KEY, admin_key=ADMIN))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def sealed(repo: Path) -> Iterator[Both]:
    r = Both(repo, security=Security(model_control=False))
    yield r
    r.stop()


def client(r: Both) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(r.grpc_url)


def grpc_infer(c, model: str, x: np.ndarray, version: str = "", **kw):
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return c.infer(model, [inp], model_version=version, **kw)


def refusal(fn) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as err:
        fn()
    return str(err.value.status()), err.value.message()


# --- against a server -------------------------------------------------------------------------------
def test_health_metadata_and_config(both: Both) -> None:
    c = client(both)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("affine") and c.is_model_ready("affine", "1") and not c.is_model_ready("nope")
    meta = c.get_model_metadata("affine", as_json=True)
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert meta["versions"] == ["2"] and meta["platform"] == "onnxruntime_onnx"
    config = c.get_model_config("affine", as_json=True)["config"]
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["4"]}]
    assert c.get_server_metadata(as_json=True)["name"] == "modelkiln"
    assert refusal(lambda: c.get_model_metadata("nope"))[0] == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("version", ["", "1"])
def test_infer_equals_http_binary(both: Both, version: str) -> None:
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    got = grpc_infer(client(both), "affine", x, version).as_numpy("y")
    h = httpclient.InferenceServerClient(both.url)
    inp = httpclient.InferInput("x", [3, 4], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    want = h.infer("affine", [inp], model_version=version).as_numpy("y")
    assert got.dtype == np.float32 and got.shape == (3, 4)
    np.testing.assert_array_equal(got, want)  # the same model run: bit-identical
    np.testing.assert_allclose(got, x * (2 if version == "1" else 3) + 1, rtol=1e-6)


def test_typed_contents_and_request_id(both: Both) -> None:
    """fp32_contents instead of raw bytes, through the bare stub; the id comes back."""
    import grpc

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with grpc.insecure_channel(both.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name="affine", id="req-42")
        tensor = req.inputs.add(name="x", datatype="FP32", shape=[2, 4])
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        resp = stub.ModelInfer(req)
        assert resp.id == "req-42" and resp.model_version == "2"
        y = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 4)
        np.testing.assert_array_equal(y, x * 3 + 1)

        tensor.contents.fp32_contents.append(1.0)  # 9 values for [2, 4]
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'x'" in err.value.details() and "9 values, expected 8" in err.value.details()

        req = service_pb2.ModelInferRequest(model_name="affine")
        req.inputs.add(name="x", datatype="FP32", shape=[2, 4])
        req.raw_input_contents.append(x.tobytes()[:-4])  # 28 bytes for 32
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "holds 28 bytes, expected 32 (FP32 [2, 4])" in err.value.details()
    assert grpc_infer(client(both), "affine", x, request_id="r1").get_response().id == "r1"


def test_bad_requests_get_triton_codes_and_name_what_is_wrong(both: Both) -> None:
    c = client(both)
    x = np.ones((2, 4), np.float32)
    code, message = refusal(lambda: grpc_infer(c, "nope", x))
    assert code == "StatusCode.NOT_FOUND" and "nope" in message
    code, message = refusal(lambda: grpc_infer(c, "affine", x, version="9"))
    assert code == "StatusCode.NOT_FOUND" and "no version" in message

    wrong = grpcclient.InferInput("x", [2, 4], "INT64")
    wrong.set_data_from_numpy(x.astype(np.int64))
    code, message = refusal(lambda: c.infer("affine", [wrong]))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert message == "model 'affine': input 'x' expects FP32, got INT64"

    code, message = refusal(lambda: grpc_infer(c, "affine", np.ones((2, 5), np.float32)))
    assert code == "StatusCode.INVALID_ARGUMENT" and "expects shape [-1, 4], got [2, 5]" in message
    code, message = refusal(lambda: grpc_infer(c, "affine", np.ones((9, 4), np.float32)))
    assert "batch 9 is outside 1..8" in message

    text = grpcclient.InferInput("x", [2], "BYTES")  # a BYTES input where FP32 is expected
    text.set_data_from_numpy(np.array([b"a", b"bc"], dtype=object))
    code, message = refusal(lambda: c.infer("affine", [text]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "input 'x' expects FP32" in message

    out = grpcclient.InferRequestedOutput("z")
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    code, message = refusal(lambda: c.infer("affine", [inp], outputs=[out]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "unknown output(s) ['z']" in message

    code, message = refusal(lambda: grpc_infer(c, "slow", np.ones((1, 4), np.float32), timeout=1))
    assert code == "StatusCode.UNAVAILABLE" and "timed out" in message  # 1 us: expires in the queue

    big = np.zeros((8, 40_000), np.float32)  # 1.28 MB raw: over the test server's 1 MiB body limit
    code, message = refusal(lambda: grpc_infer(c, "affine", big))
    assert code == "StatusCode.RESOURCE_EXHAUSTED" and "larger than max" in message
    np.testing.assert_allclose(grpc_infer(c, "affine", x).as_numpy("y"), x * 3 + 1)  # still serving


def test_repository_index_unload_and_load(both: Both) -> None:
    c = client(both)
    index = c.get_model_repository_index(as_json=True)["models"]
    assert {"name": "affine", "version": "2", "state": "READY"} in index
    c.unload_model("affine")
    try:
        assert not c.is_model_ready("affine")
        code, message = refusal(lambda: grpc_infer(c, "affine", np.ones((1, 4), np.float32)))
        assert code == "StatusCode.UNAVAILABLE" and "not loaded" in message
    finally:
        c.load_model("affine")
    assert c.is_model_ready("affine")
    code, message = refusal(lambda: c.load_model("nope"))
    assert code == "StatusCode.NOT_FOUND"
    code, message = refusal(lambda: c.load_model("affine", config='{"max_batch_size": 1}'))
    assert code == "StatusCode.INVALID_ARGUMENT" and "not supported" in message


def test_model_control_refused_when_disabled(sealed: Both) -> None:
    c = client(sealed)
    for call in (
        lambda: c.unload_model("affine"),
        lambda: c.load_model("affine"),
        c.get_model_repository_index,
    ):
        code, message = refusal(call)
        assert code == "StatusCode.PERMISSION_DENIED" and "disabled" in message
    assert c.is_model_ready("affine")


def test_api_key_and_admin_key_as_metadata(locked: Both) -> None:
    c = client(locked)
    x = np.ones((1, 4), np.float32)
    assert c.is_server_live() and c.is_server_ready()  # health needs no key, as over HTTP
    code, message = refusal(lambda: grpc_infer(c, "affine", x))
    assert code == "StatusCode.UNAUTHENTICATED" and KEY not in message
    assert (
        refusal(lambda: grpc_infer(c, "affine", x, headers={"authorization": "Bearer wrong-key-123"}))[0]
        == "StatusCode.UNAUTHENTICATED"
    )
    assert refusal(lambda: c.get_model_metadata("affine"))[0] == "StatusCode.UNAUTHENTICATED"
    ok = {"authorization": f"Bearer {KEY}"}
    np.testing.assert_allclose(grpc_infer(c, "affine", x, headers=ok).as_numpy("y"), x * 3 + 1)
    assert c.get_model_metadata("affine", headers=ok).name == "affine"
    code, _ = refusal(lambda: c.unload_model("affine", headers=ok))  # the API key is not the admin key
    assert code == "StatusCode.PERMISSION_DENIED"
    admin = {"authorization": f"Bearer {ADMIN}"}
    assert c.get_model_repository_index(headers=admin).models
    c.load_model("affine", headers=admin)
    assert c.is_model_ready("affine", headers=ok)


def test_grpc_stops_with_the_http_server(repo: Path) -> None:
    r = Both(repo)
    c = client(r)
    assert c.is_server_live()
    r.stop()
    assert refusal(lambda: c.is_server_live())[0] == "StatusCode.UNAVAILABLE"


def test_standalone_front_end_and_port_in_use(both: Both) -> None:
    front = GrpcFrontEnd.standalone(both.server, GrpcOptions(0)).start()
    try:
        assert front.port > 0 and client_at(front.port).is_model_ready("affine")
    finally:
        front.stop()
    with pytest.raises(OSError, match="cannot listen for gRPC"):
        GrpcFrontEnd.standalone(both.server, GrpcOptions(both.grpc_port)).start()


def client_at(port: int) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(f"127.0.0.1:{port}")


# --- without a server ------------------------------------------------------------------------------
def test_status_codes_follow_triton() -> None:
    assert grpc_code(BadInput("x")) == "INVALID_ARGUMENT"
    assert grpc_code(ModelNotFound("x")) == "NOT_FOUND"
    assert grpc_code(QueueFull("x")) == "UNAVAILABLE"
    assert grpc_code(ModelUnavailable("x")) == "UNAVAILABLE"
    assert grpc_code(DeadlineExceeded("x")) == "UNAVAILABLE"
    assert grpc_code(PayloadTooLarge("x")) == "RESOURCE_EXHAUSTED"
    assert grpc_code(PoolExhausted("x")) == "RESOURCE_EXHAUSTED"
    assert grpc_code(RuntimeError("x")) == "INTERNAL"


def test_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc now raises ImportError
    with pytest.raises(MissingDependency, match=r"modelkiln\[grpc\]"):
        require_grpc()


def test_bytes_codec() -> None:
    """No served model takes text, so BYTES is checked here: Triton's 4-byte length prefixes."""
    arr = np.array([[b"", b"hello"], ["caf\u00e9", b"\x00\xff"]], dtype=object)
    raw = encode_bytes(arr)
    assert raw[:4] == b"\x00\x00\x00\x00" and raw[4:13] == b"\x05\x00\x00\x00hello"
    back = decode_raw(raw, "BYTES", [2, 2], "t")
    assert back.shape == (2, 2) and back[1, 0] == "café".encode() and back[1, 1] == b"\x00\xff"
    assert encode_output(arr, "m", "o")[0] == "BYTES"
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    ours = decode_raw(serialize_byte_tensor(np.array([b"ab", b"c"], dtype=object)).item(), "BYTES", [2], "t")
    assert list(ours) == [b"ab", b"c"]
    assert list(deserialize_bytes_tensor(encode_bytes(np.array([b"x", b"yz"], dtype=object)))) == [
        b"x",
        b"yz",
    ]
    for bad, why in [
        (raw + b"\x00", "bytes after"),
        (raw[:-1], "claims"),
        (raw[:6], "cannot hold"),
    ]:
        with pytest.raises(BadInput, match=why):
            decode_raw(bad, "BYTES", [2, 2], "t")
    contents = service_pb2.InferTensorContents(bytes_contents=[b"a", b"b"])
    assert list(decode_contents(contents, "BYTES", [2], "t")) == [b"a", b"b"]


NUMERIC = sorted(GRPC_TYPES)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datatype=st.sampled_from(NUMERIC), data=st.data())
def test_raw_codec_round_trips_and_refuses_wrong_sizes(datatype: str, data: st.DataObject) -> None:
    dtype = GRPC_TYPES[datatype]
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    array = data.draw(hnp.arrays(dtype, shape))
    raw = array.tobytes()
    back = decode_raw(raw, datatype, list(shape), "model 'm': input 'x'")
    assert back.dtype == dtype and back.shape == shape
    assert back.tobytes() == raw  # bit-exact (NaN payloads included)
    out_type, out_shape, out_raw = encode_output(back, "m", "y")
    assert (out_type, out_shape, out_raw) == (datatype, list(shape), raw)
    extra = data.draw(st.integers(1, 2 * dtype.itemsize + 3))
    for wrong in (raw + b"\x00" * extra, raw[: max(len(raw) - extra, 0)]):
        if len(wrong) != len(raw):
            with pytest.raises(
                BadInput, match=r"model 'm': input 'x': raw_input_contents holds \d+ bytes, expected"
            ):
                decode_raw(wrong, datatype, list(shape), "model 'm': input 'x'")
    dims = data.draw(st.lists(st.integers(0, 3), min_size=17, max_size=20))
    with pytest.raises(BadInput, match="at most 16 dimensions"):
        decode_raw(raw, datatype, dims, "t")
    with pytest.raises(BadInput, match="shape must"):
        decode_raw(raw, datatype, [-1, *shape], "t")


@settings(max_examples=60, deadline=None)
@given(
    datatype=st.sampled_from([t for t in NUMERIC if t != "FP16"]),
    count=st.integers(0, 12),
    data=st.data(),
)
def test_typed_contents_match_raw(datatype: str, count: int, data: st.DataObject) -> None:
    dtype = GRPC_TYPES[datatype]
    array = data.draw(hnp.arrays(dtype, (count,), elements=hnp.from_dtype(dtype, allow_nan=False)))
    field = {
        "b": "bool_contents",
        "f": "fp32_contents" if dtype.itemsize == 4 else "fp64_contents",
    }.get(dtype.kind)
    if field is None:
        field = (
            ("int64_contents" if dtype.itemsize == 8 else "int_contents")
            if dtype.kind == "i"
            else ("uint64_contents" if dtype.itemsize == 8 else "uint_contents")
        )
    contents = service_pb2.InferTensorContents(**{field: array.tolist()})
    got = decode_contents(contents, datatype, [count], "t")
    np.testing.assert_array_equal(got, decode_raw(array.tobytes(), datatype, [count], "t"))
    with pytest.raises(BadInput, match=f"{field} holds {count} values, expected {count + 1}"):
        decode_contents(contents, datatype, [count + 1], "t")


def test_typed_contents_refuse_out_of_range_and_fp16() -> None:
    contents = service_pb2.InferTensorContents(int_contents=[300])
    with pytest.raises(BadInput, match=r"outside the INT8 range"):
        decode_contents(contents, "INT8", [1], "t")
    with pytest.raises(BadInput, match="raw_input_contents"):
        decode_contents(service_pb2.InferTensorContents(), "FP16", [0], "t")
    with pytest.raises(BadInput, match="datatype must be one of"):
        decode_raw(b"", "FP8", [0], "t")
