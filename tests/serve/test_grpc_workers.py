"""The gRPC front end's threads (grpc's sync server): an inference RPC holds a worker while its batch
waits, at most ``workers`` of them reach the queues at once and the rest wait their turn, and
health, metadata and readiness keep being answered while every inference worker waits. A stand-in
model server (every inference waits until the test answers it) makes this deterministic.

Also the decoding fast path for what tritonclient sends (raw numeric tensors, no parameters): the
same arrays as the checked path, and anything else still checked in full; and the request's bytes
read by the server itself (tensors cut out as views, the rest parsed by protobuf), which must equal
what protobuf parses, in any field order, and refuse malformed messages."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelkiln.errors import BadInput, ModelNotFound
from modelkiln.serve.batcher import InferResponse
from modelkiln.serve.grpc import GrpcFrontEnd, GrpcOptions, decode_raw, decode_request, split_infer_request
from modelkiln.serve.guard import ServeLimits

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2


class Gate:
    """A model server for model 'm' (y = 2x) whose inferences wait until ``answer`` is called."""

    def __init__(self) -> None:
        self.arrived = threading.Semaphore(0)
        self.waiting: list[tuple[Future[InferResponse], dict[str, np.ndarray]]] = []
        self.repository = SimpleNamespace(root=Path("/nonexistent-repository"))
        self.memory = None
        self.model = SimpleNamespace(version=1, metadata=lambda: {"name": "m", "versions": ["1"]})

    def has(self, name: str) -> bool:
        return name == "m"

    def get(self, name: str, version: Any = None) -> Any:
        if name != "m":
            raise ModelNotFound(f"unknown model '{name}'")
        return SimpleNamespace(model=self.model)

    def ready(self, name: str, version: Any = None) -> bool:
        return name == "m"

    def loaded(self) -> list[Any]:
        return [self.model]

    def infer(self, name: str, feed: dict[str, np.ndarray], *_: Any) -> Future[InferResponse]:
        future: Future[InferResponse] = Future()
        self.waiting.append((future, feed))
        self.arrived.release()
        return future

    def answer(self, i: int) -> None:
        future, feed = self.waiting[i]
        future.set_result(InferResponse({"y": feed["x"] * 2}, 0.0, 0.0, 1))


def start_infer(c: Any, x: np.ndarray, request_id: str) -> dict[str, Any]:
    """An inference on its own thread; the returned dict gets 'result' or 'error'."""
    out: dict[str, Any] = {}

    def run() -> None:
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        try:
            out["result"] = c.infer("m", [inp], request_id=request_id, client_timeout=30)
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            out["error"] = exc

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def test_control_rpcs_answer_while_every_inference_worker_waits() -> None:
    gate = Gate()
    front = GrpcFrontEnd.standalone(gate, GrpcOptions(0, workers=1, grace_s=5)).start()  # type: ignore[arg-type]
    try:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{front.port}")
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        first = start_infer(c, x, "first")
        assert gate.arrived.acquire(timeout=30), "the first inference never reached the server"
        # the one inference worker is taken: control RPCs run on their own threads
        assert c.is_server_live(client_timeout=10) and c.is_server_ready(client_timeout=10)
        assert c.is_model_ready("m", client_timeout=10) and not c.is_model_ready("nope", client_timeout=10)
        assert c.get_server_metadata(client_timeout=10).name == "modelkiln"
        second = start_infer(c, x + 1, "second")
        # at most `workers` inferences reach the queues: the second waits for the worker
        assert not gate.arrived.acquire(timeout=1.0)
        gate.answer(0)
        first["thread"].join(30)
        assert first["result"].get_response().id == "first"
        np.testing.assert_array_equal(first["result"].as_numpy("y"), x * 2)
        assert gate.arrived.acquire(timeout=30), "the second inference never reached the server"
        gate.answer(1)
        second["thread"].join(30)
        assert "error" not in second, second.get("error")
        assert second["result"].get_response().id == "second"
        np.testing.assert_array_equal(second["result"].as_numpy("y"), (x + 1) * 2)
    finally:
        for future, _ in gate.waiting:
            if not future.done():
                future.set_exception(RuntimeError("test over"))
        front.stop()


def test_workers_must_be_positive() -> None:
    with pytest.raises(BadInput, match="workers must be at least 1"):
        GrpcFrontEnd.standalone(Gate(), GrpcOptions(0, workers=0))  # type: ignore[arg-type]


def _request(x: np.ndarray, datatype: str = "FP32") -> Any:
    from tritonclient.grpc._utils import _get_inference_request

    inp = grpcclient.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return _get_inference_request(
        model_name="m",
        inputs=[inp],
        model_version="",
        request_id="",
        outputs=None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )


@pytest.mark.parametrize(
    ("dtype", "datatype"),
    [
        (np.float32, "FP32"),
        (np.float16, "FP16"),
        (np.int64, "INT64"),
        (np.uint8, "UINT8"),
        (np.bool_, "BOOL"),
    ],
)
def test_fast_path_equals_the_checked_decode(dtype: Any, datatype: str) -> None:
    x = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    request = _request(x, datatype)
    feed, timeout_s = decode_request(request, ServeLimits())
    checked = decode_raw(request.raw_input_contents[0], datatype, [2, 3, 4], "t")
    assert timeout_s is None and feed["x"].dtype == checked.dtype and feed["x"].shape == (2, 3, 4)
    assert feed["x"].tobytes() == checked.tobytes() == x.tobytes()


def test_what_the_fast_path_declines_is_still_checked() -> None:
    x = np.ones((2, 4), np.float32)
    request = _request(x)
    request.raw_input_contents[0] = x.tobytes()[:-4]
    with pytest.raises(
        BadInput, match=r"model 'm': input 'x': raw_input_contents holds 28 bytes, expected 32"
    ):
        decode_request(request, ServeLimits())
    request = _request(x)
    request.inputs[0].parameters["shared_memory_region"].string_param = "region"
    with pytest.raises(BadInput, match="input 'x': shared memory is not supported"):
        decode_request(request, ServeLimits())
    request = _request(x)
    request.inputs[0].datatype = "FP8"
    with pytest.raises(BadInput, match="datatype must be one of"):
        decode_request(request, ServeLimits())
    bare = service_pb2.ModelInferRequest(model_name="m")
    bare.inputs.add(name="x", datatype="FP32", shape=[2])
    bare.inputs.add(name="x", datatype="FP32", shape=[2])
    bare.raw_input_contents.extend([b"\0" * 8, b"\0" * 8])
    with pytest.raises(BadInput, match="input 'x' given twice"):
        decode_request(bare, ServeLimits())


# --- the request's tensors are cut out of the message, not parsed into it ------------------------------
@settings(max_examples=80, deadline=None)
@given(
    tensors=st.lists(st.binary(max_size=300), min_size=0, max_size=4),
    request_id=st.text(max_size=20),
    timeout=st.one_of(st.none(), st.integers(1, 10**9)),
    raw_first=st.booleans(),
)
def test_split_request_equals_what_protobuf_parses(
    tensors: list[bytes], request_id: str, timeout: int | None, raw_first: bool
) -> None:
    full = service_pb2.ModelInferRequest(model_name="m", id=request_id)
    for i, raw in enumerate(tensors):
        full.inputs.add(name=f"x{i}", datatype="UINT8", shape=[len(raw)])
        full.raw_input_contents.append(raw)
    if timeout is not None:
        full.parameters["timeout"].int64_param = timeout
    full.outputs.add(name="y")
    data = full.SerializeToString()
    if raw_first:  # protobuf allows any field order: raw contents before the rest
        head = service_pb2.ModelInferRequest()
        head.CopyFrom(full)
        del head.raw_input_contents[:]
        only_raw = service_pb2.ModelInferRequest(raw_input_contents=tensors)
        data = only_raw.SerializeToString() + head.SerializeToString()
    head_bytes, raws = split_infer_request(data)
    assert [bytes(r) for r in raws] == tensors
    parsed = service_pb2.ModelInferRequest.FromString(head_bytes)
    assert not parsed.raw_input_contents
    parsed.raw_input_contents.extend(tensors)
    assert parsed == full


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x3a\x10abc", "claims 16 bytes, 3 remain"),  # raw_input_contents longer than the message
        (b"\x0a", "varint runs past its end"),  # a field with no length
        (b"\x0b", "wire type 3"),  # groups are not in this proto
        (b"\x0d\x00\x00", "runs past its end"),  # a fixed32 cut short
    ],
)
def test_malformed_requests_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(BadInput, match=why):
        split_infer_request(data)


def test_raw_messages_over_the_wire() -> None:
    """The server reads a request's bytes itself and writes its response's: a malformed request is
    INVALID_ARGUMENT (not grpc's INTERNAL deserialization failure), and the response bytes are a
    ModelInferResponse protobuf reads back, raw outputs included."""
    import grpc

    gate = Gate()
    front = GrpcFrontEnd.standalone(gate, GrpcOptions(0, grace_s=5)).start()  # type: ignore[arg-type]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            with pytest.raises(grpc.RpcError) as err:
                call(b"\x3a\x10abc", timeout=30)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "not a well-formed ModelInferRequest" in err.value.details()
            x = np.arange(6, dtype=np.float32).reshape(2, 3)
            request = service_pb2.ModelInferRequest(model_name="m", id="r-7")
            request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
            request.raw_input_contents.append(x.tobytes())
            pending = call.future(request.SerializeToString(), timeout=30)
            assert gate.arrived.acquire(timeout=30)
            gate.answer(0)
            response = service_pb2.ModelInferResponse.FromString(pending.result())
        assert (response.model_name, response.model_version, response.id) == ("m", "1", "r-7")
        assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("y", "FP32", [2, 3])]
        np.testing.assert_array_equal(
            np.frombuffer(response.raw_output_contents[0], np.float32), x.ravel() * 2
        )
    finally:
        front.stop()
