"""KServe v2 over gRPC: Triton's ``GRPCInferenceService``, as ``tritonclient.grpc`` speaks it, on a
second port beside the HTTP server (``kiln serve REPO --grpc-port N``).

Same model table, same checks, same errors as serve/http.py: a failure becomes the status Triton
gives it (INVALID_ARGUMENT for a bad request, NOT_FOUND for an unknown model, UNAVAILABLE for a
full queue or an expired timeout, RESOURCE_EXHAUSTED for a size limit) with the message HTTP
would send, never a traceback.

The server is grpc's synchronous server on a thread pool, not ``grpc.aio``: measured on small
requests (benchmarks/grpc_vs_http.py) the aio server's per-RPC machinery (its completion-queue
poller thread waking the event loop, the Cython coroutine plumbing) cost ~40 % more server CPU per
request than uvicorn, and made gRPC slower than HTTP. Each inference RPC instead runs on a worker
thread that decodes the raw tensors (views of the message's bytes), queues the request and waits
for its batch; health, metadata and model control run on a small pool of their own, so they are
answered while every inference worker waits. grpcio and the generated protos (shipped by
tritonclient[grpc]) are imported only when a gRPC server starts: ``pip install 'modelkiln[grpc]'``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from starlette.datastructures import Headers

from modelkiln import __version__
from modelkiln.errors import BadInput, MissingDependency, PayloadTooLarge, PoolExhausted
from modelkiln.serve.context import Context, status_of
from modelkiln.serve.guard import ServeLimits, shown
from modelkiln.serve.metrics import ServerMetrics
from modelkiln.serve.protocol import MAX_DIM, MAX_DIMS, MAX_ID, MAX_TIMEOUT_US, NP_TYPES, request_priority
from modelkiln.serve.security import Security, key_matches
from modelkiln.serve.server import ModelServer

log = logging.getLogger(__name__)

#: KServe v2 datatype -> numpy dtype, little-endian as the protocol's raw bytes are.
GRPC_TYPES: dict[str, np.dtype[Any]] = {
    **{k: np.dtype(v).newbyteorder("<") for k, v in NP_TYPES.items()},
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
}
_OUT_TYPES = {dt.newbyteorder("=").name: k for k, dt in GRPC_TYPES.items()}
#: The ``InferTensorContents`` field each datatype's typed values travel in (FP16: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LENGTH = struct.Struct("<I")
#: gRPC status names by the HTTP status serve/context.py gives an error (Triton's choices).
GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",  # Triton: "Request timeout expired" is UNAVAILABLE
}
HEADER_SLACK = 1 << 20  # bytes of a response beyond its tensors (names, shapes) the send limit allows
DEFAULT_GRACE_S = 30.0
#: Inference RPCs in progress at once (each a thread, mostly waiting for its batch). Beyond it RPCs
#: wait in grpc's own queue for a worker; it is above the default max_queue_size (64) of a model so
#: a full queue is still refused at once ("queue full", UNAVAILABLE) as over HTTP.
DEFAULT_WORKERS = 128
#: Threads for health, metadata and model control (never blocked by inference).
CONTROL_WORKERS = 4


def require_grpc() -> None:
    """Raise MissingDependency naming the ``grpc`` extra unless grpcio and the protos import."""
    for module in ("grpc", "tritonclient.grpc.service_pb2_grpc"):
        try:
            __import__(module)
        except ImportError as exc:
            raise MissingDependency(module.split(".")[0], "grpc", "kiln serve --grpc-port") from exc


# --- tensor codec ---------------------------------------------------------------------------------
def _shape(shape: Sequence[int], where: str) -> list[int]:
    dims = list(shape)
    if len(dims) > MAX_DIMS or not all(0 <= d <= MAX_DIM for d in dims):
        raise BadInput(
            f"{where}: shape must have at most {MAX_DIMS} dimensions in [0, {MAX_DIM}], got {shown(dims)}"
        )
    return dims


def _dtype(datatype: str, where: str) -> np.dtype[Any] | None:
    """The numpy dtype of a KServe datatype (None for BYTES); BadInput for anything else."""
    if datatype == "BYTES":
        return None
    dtype = GRPC_TYPES.get(datatype)
    if dtype is None:
        raise BadInput(
            f"{where}: datatype must be one of {sorted([*GRPC_TYPES, 'BYTES'])}, got {shown(datatype)}"
        )
    return dtype


def decode_raw(raw: bytes | memoryview, datatype: str, shape: Sequence[int], where: str) -> np.ndarray:
    """An input from its raw bytes (little-endian; BYTES: each element a 4-byte length then its
    bytes). The byte count must be exactly what the shape and datatype say."""
    dims = _shape(shape, where)
    count = math.prod(dims)
    dtype = _dtype(datatype, where)
    if dtype is None:
        return decode_bytes(raw, dims, where)
    want = count * dtype.itemsize
    if len(raw) != want:
        raise BadInput(
            f"{where}: raw_input_contents holds {len(raw)} bytes, expected {want} ({datatype} {dims})"
        )
    return np.frombuffer(raw, dtype).reshape(dims)


def decode_bytes(raw: bytes | memoryview, shape: list[int], where: str) -> np.ndarray:
    """A BYTES tensor (object array of ``bytes``) from its length-prefixed serialization."""
    count = math.prod(shape)
    if count > len(raw) // _LENGTH.size:  # each element takes 4 bytes at least
        raise BadInput(f"{where}: {len(raw)} bytes cannot hold {count} BYTES elements {shape}")
    items: list[bytes] = []
    pos = 0
    view = memoryview(raw)
    for i in range(count):
        if pos + _LENGTH.size > len(raw):
            raise BadInput(f"{where}: BYTES data ends at element {i} of {count}")
        (size,) = _LENGTH.unpack_from(raw, pos)
        pos += _LENGTH.size
        if pos + size > len(raw):
            raise BadInput(f"{where}: BYTES element {i} claims {size} bytes, {len(raw) - pos} remain")
        items.append(bytes(view[pos : pos + size]))
        pos += size
    if pos != len(raw):
        raise BadInput(f"{where}: {len(raw) - pos} bytes after the {count} BYTES elements of shape {shape}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def encode_bytes(array: np.ndarray) -> bytes:
    """The length-prefixed serialization of a BYTES tensor (``str`` elements as UTF-8)."""
    parts: list[bytes] = []
    for item in array.ravel(order="C"):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts += [_LENGTH.pack(len(data)), data]
    return b"".join(parts)


def decode_contents(contents: Any, datatype: str, shape: Sequence[int], where: str) -> np.ndarray:
    """An input from ``InferTensorContents`` (typed values: ``fp32_contents`` for FP32...)."""
    dims = _shape(shape, where)
    count = math.prod(dims)
    dtype = _dtype(datatype, where)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise BadInput(f"{where}: {datatype} travels only as raw_input_contents, not typed contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise BadInput(f"{where}: {field} holds {len(values)} values, expected {count} ({datatype} {dims})")
    if dtype is None:
        array = np.empty(count, dtype=object)
        array[:] = [bytes(v) for v in values]
        return array.reshape(dims)
    if dtype.kind in "iu" and dtype.itemsize < 8 and count:
        wide = np.asarray(values, np.int64)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise BadInput(f"{where}: values outside the {datatype} range [{info.min}, {info.max}]")
        return wide.astype(dtype).reshape(dims)
    return np.asarray(values, dtype).reshape(dims)


def encode_output(array: np.ndarray, model: str, name: str) -> tuple[str, list[int], bytes]:
    """(datatype, shape, raw bytes) of one output."""
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES", list(array.shape), encode_bytes(array)
    datatype = _OUT_TYPES.get(array.dtype.newbyteorder("=").name)
    if datatype is None:
        raise BadInput(
            f"model '{model}': output '{name}' has dtype {array.dtype}, which KServe v2 cannot carry"
        )
    return datatype, list(array.shape), np.ascontiguousarray(array, GRPC_TYPES[datatype]).tobytes()


def _parameter(param: Any) -> Any:
    """The value of an ``InferParameter`` (whichever of its fields is set)."""
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def decode_request(
    request: Any, limits: ServeLimits, raw_contents: Sequence[bytes | memoryview] | None = None
) -> tuple[dict[str, np.ndarray], float | None]:
    """The feed and the ``timeout`` parameter (seconds) of a ``ModelInferRequest``;
    ``raw_contents``: its raw_input_contents when they were cut out of the message before parsing
    (split_infer_request), else the message's own."""
    model = request.model_name
    if len(request.id) > MAX_ID:
        raise BadInput(f"model '{model}': 'id' must be at most {MAX_ID} characters")
    if not request.inputs:
        raise BadInput(f"model '{model}': request needs at least one input")
    raw = request.raw_input_contents if raw_contents is None else raw_contents
    if raw and len(raw) != len(request.inputs):
        raise BadInput(
            f"model '{model}': {len(raw)} raw_input_contents for {len(request.inputs)} inputs "
            "(raw contents must be given for every input or none)"
        )
    raw = list(raw)  # each element access of a message copies its bytes out: once only
    feed: dict[str, np.ndarray] = {}
    for i, spec in enumerate(request.inputs):
        name = spec.name
        if name in feed:
            raise BadInput(f"model '{model}': input '{name}' given twice")
        array = _plain_raw(raw[i], spec) if raw else None
        if array is None:  # anything but a well-formed raw numeric tensor: checked in full
            where = f"model '{model}': input {shown(name)}"
            if "shared_memory_region" in spec.parameters:
                raise BadInput(f"{where}: shared memory is not supported by this server")
            if raw:
                array = decode_raw(raw[i], spec.datatype, spec.shape, where)
            else:
                array = decode_contents(spec.contents, spec.datatype, spec.shape, where)
        feed[name] = array
    timeout_s = None
    if "timeout" in request.parameters:
        micros = _parameter(request.parameters["timeout"])
        if (
            isinstance(micros, bool)
            or not isinstance(micros, (int, float))
            or not 0 < micros <= MAX_TIMEOUT_US
        ):
            raise BadInput(
                f"model '{model}': parameter 'timeout' must be a positive number of microseconds "
                f"(at most {MAX_TIMEOUT_US:.0f}), got {shown(micros)}"
            )
        timeout_s = micros / 1e6
    return feed, timeout_s


def _plain_raw(raw: bytes | memoryview, spec: Any) -> np.ndarray | None:
    """What tritonclient sends (raw little-endian numbers, no parameters), decoded without building
    the error context; None when any check fails (decode_raw then says what is wrong)."""
    dtype = GRPC_TYPES.get(spec.datatype)
    if dtype is None or spec.parameters:
        return None
    dims = list(spec.shape)
    if len(dims) > MAX_DIMS or not all(0 <= d <= MAX_DIM for d in dims):
        return None
    if len(raw) != math.prod(dims) * dtype.itemsize:
        return None
    return np.frombuffer(raw, dtype).reshape(dims)


#: Field numbers in KServe's grpc_service.proto.
RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6  # ModelInferResponse.raw_output_contents
_LENGTH_DELIMITED = 2


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise BadInput("the request is not a well-formed ModelInferRequest (a varint runs past its end)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def split_infer_request(data: bytes) -> tuple[bytes, list[memoryview]]:
    """A serialized ``ModelInferRequest`` in two parts without copying its tensors: the bytes of
    every field but raw_input_contents (small, for protobuf to parse) and a view of each
    raw_input_contents element (for np.frombuffer). Parsing the whole message would copy the
    tensors into protobuf's arena, and reading them back out would copy them again: for a 4.8 MB
    image batch that was a third of the server's time per request. Only the top level is walked
    (a tag and a length per field); anything malformed is BadInput."""
    view = memoryview(data)
    kept: list[memoryview] = []
    raws: list[memoryview] = []
    pos, size, kept_from = 0, len(data), 0
    while pos < size:
        start = pos
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == _LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            end = pos + length
            if end > size:
                raise BadInput(
                    f"the request is not a well-formed ModelInferRequest (field {key >> 3} claims "
                    f"{length} bytes, {size - pos} remain)"
                )
            if key >> 3 == RAW_INPUT_FIELD:
                kept.append(view[kept_from:start])
                raws.append(view[pos:end])
                kept_from = end
            pos = end
        elif wire == 0:
            _, pos = _varint(data, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise BadInput(f"the request is not a well-formed ModelInferRequest (wire type {wire})")
    if pos != size:
        raise BadInput(
            "the request is not a well-formed ModelInferRequest (its last field runs past its end)"
        )
    kept.append(view[kept_from:size])
    return b"".join(kept), raws


_RAW_OUTPUT_TAG = encode_varint(RAW_OUTPUT_FIELD << 3 | _LENGTH_DELIMITED)


def _raise(exc: BaseException) -> NoReturn:
    raise exc


def decode_priority(request: Any) -> int | None:
    """The level of a ``ModelInferRequest``'s ``priority`` parameter (tritonclient.grpc sends it
    as a uint64; Triton's numbering, serve/protocol.request_priority)."""
    if "priority" not in request.parameters:
        return None
    return request_priority(_parameter(request.parameters["priority"]), request.model_name)


def requested_outputs(request: Any, outputs: dict[str, np.ndarray]) -> list[str]:
    """Names of the outputs to send: those asked for, in their order, else all."""
    model = request.model_name
    if not request.outputs:
        return list(outputs)
    names = []
    for out in request.outputs:
        if "shared_memory_region" in out.parameters or "classification" in out.parameters:
            raise BadInput(
                f"model '{model}': output {shown(out.name)}: shared memory and classification are not supported"
            )
        names.append(out.name)
    missing = sorted(set(names) - set(outputs))
    if missing:
        raise BadInput(f"model '{model}': unknown output(s) {shown(missing)}; it has {sorted(outputs)}")
    return names


def grpc_code(exc: BaseException, status: int | None = None) -> str:
    """The gRPC status name of an error (``status``: its HTTP status, if already known)."""
    if isinstance(exc, PoolExhausted):  # memory, not a queue: Triton says RESOURCE_EXHAUSTED
        return "RESOURCE_EXHAUSTED"
    return GRPC_CODES.get(status_of(exc) if status is None else status, "INTERNAL")


# --- the service ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GrpcOptions:
    """Where and how the gRPC front end listens (``port`` 0: any free port)."""

    port: int
    host: str = "127.0.0.1"
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    #: Seconds in-flight RPCs get to finish at shutdown.
    grace_s: float = DEFAULT_GRACE_S
    #: Inference RPCs served at once (threads); more wait for a worker in grpc's queue.
    workers: int = DEFAULT_WORKERS


class _Refused(Exception):
    """An RPC refused before it ran (status name, message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Service:
    """The RPCs (names as the proto has them), each ``(request, context) -> response`` on a worker
    thread of grpc's server; the rest answer UNIMPLEMENTED."""

    def __init__(self, ctx: Context, security: Security, pb: Any, config_pb: Any, grpc: Any) -> None:
        self.ctx, self.security, self.pb, self.config_pb, self.grpc = ctx, security, pb, config_pb, grpc
        self.server: ModelServer = ctx.server
        self._series: dict[tuple[str, str], tuple[Any, ...]] = {}

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if not name[:1].isupper():
            raise AttributeError(name)

        def unimplemented(_: Any, context: Any) -> NoReturn:
            context.abort(self.grpc.StatusCode.UNIMPLEMENTED, f"{name} is not supported by this server")
            raise AssertionError("abort raises")  # pragma: no cover

        return unimplemented

    # --- plumbing
    def _check(self, context: Any, control: bool = False) -> None:
        """API key (or, for model control, the admin key) from the ``authorization`` metadata."""
        sec = self.security
        if sec.api_key is None and (not control or (sec.model_control and sec.admin_key is None)):
            return  # nothing to check: skip reading the metadata
        headers = Headers({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
        if control:
            if not sec.model_control:
                raise _Refused(
                    "PERMISSION_DENIED",
                    "model control (load, unload, repository index) is disabled on this server",
                )
            key = sec.admin_key or sec.api_key
            if key is not None and not key_matches(headers, key):
                raise _Refused(
                    "PERMISSION_DENIED", "model control needs the admin key: authorization: Bearer <key>"
                )
        elif sec.api_key is not None and not key_matches(headers, sec.api_key):
            raise _Refused("UNAUTHENTICATED", "missing or wrong API key: send authorization: Bearer <key>")

    def _fail(self, context: Any, exc: BaseException, name: str, route: str) -> NoReturn:
        if isinstance(exc, _Refused):
            code, message = exc.code, str(exc)
        else:
            status, message = self.ctx.fail(exc, name, f"grpc-{route}")
            code = grpc_code(exc, status)
        context.abort(getattr(self.grpc.StatusCode, code), message)
        raise AssertionError("abort raises")  # pragma: no cover

    def _guarded(self, context: Any, name: str, route: str, control: bool, fn: Callable[[], Any]) -> Any:
        try:
            self._check(context, control)
            return fn()
        except Exception as exc:  # noqa: BLE001 - every failure is answered with a status, none a traceback
            error = exc
        self._fail(context, error, name, route)  # outside the except: abort raises grpc's own exception

    # --- health and metadata (method names are the proto's)
    def ServerLive(self, request: Any, context: Any) -> Any:
        return self.pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return self.pb.ServerReadyResponse(ready=bool(self.server.loaded()))

    def ModelReady(self, request: Any, context: Any) -> Any:
        def ready() -> Any:
            return self.pb.ModelReadyResponse(ready=self.server.ready(request.name, request.version or None))

        return self._guarded(context, request.name, "ready", False, ready)

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        def meta() -> Any:
            return self.pb.ServerMetadataResponse(
                name="modelkiln", version=__version__, extensions=["model_repository"]
            )

        return self._guarded(context, "", "metadata", False, meta)

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        def meta() -> Any:
            m = self.server.get(request.name, request.version or None).model.metadata()
            tensor = self.pb.ModelMetadataResponse.TensorMetadata
            return self.pb.ModelMetadataResponse(
                name=m["name"],
                versions=m.get("versions", []),
                platform=m.get("platform", ""),
                inputs=[
                    tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                    for t in m.get("inputs", [])
                ],
                outputs=[
                    tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                    for t in m.get("outputs", [])
                ],
            )

        return self._guarded(context, request.name, "metadata", False, meta)

    def ModelConfig(self, request: Any, context: Any) -> Any:
        def config() -> Any:
            model = self.server.get(request.name, request.version or None).model
            m, cfg = model.metadata(), model.config
            batched = cfg.max_batch_size > 0
            pb = self.config_pb

            def dims(shape: list[int]) -> list[int]:
                return shape[1:] if batched else shape

            def dtype(datatype: str) -> int:
                return int(pb.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"))

            return self.pb.ModelConfigResponse(
                config=pb.ModelConfig(
                    name=cfg.name,
                    platform=m.get("platform", "onnxruntime_onnx"),
                    max_batch_size=cfg.max_batch_size,
                    input=[
                        pb.ModelInput(name=t["name"], data_type=dtype(t["datatype"]), dims=dims(t["shape"]))
                        for t in m.get("inputs", [])
                    ],
                    output=[
                        pb.ModelOutput(name=t["name"], data_type=dtype(t["datatype"]), dims=dims(t["shape"]))
                        for t in m.get("outputs", [])
                    ],
                )
            )

        return self._guarded(context, request.name, "config", False, config)

    # --- inference
    def ModelInfer(self, data: bytes, context: Any) -> Any:
        """``data``: the serialized request (registered without a deserializer: see
        split_infer_request); the answer: the serialized response (see _response)."""
        start = time.perf_counter()
        try:
            head, raws = split_infer_request(data)
            request = self.pb.ModelInferRequest.FromString(head)
        except Exception as exc:  # noqa: BLE001 - a malformed message is the client's: INVALID_ARGUMENT
            bad = (
                exc
                if isinstance(exc, BadInput)
                else BadInput(f"the request is not a ModelInferRequest: {exc}")
            )
            return self._guarded(context, "", "infer", False, functools.partial(_raise, bad))
        name = request.model_name
        inflight = self.ctx.metrics.inflight.labels(self.ctx.label(name))
        inflight.inc()
        try:
            return self._guarded(
                context, name, "infer", False, lambda: self._infer(request, raws, context, start)
            )
        finally:
            inflight.dec()

    def _infer(self, request: Any, raws: list[memoryview], context: Any, start: float) -> bytes:
        name = request.model_name
        # Raw contents decode as views of the received bytes; typed values become arrays value by
        # value (this worker thread's own time: no event loop waits for it).
        feed, timeout_s = decode_request(request, self.ctx.limits, raws)
        priority = decode_priority(request)
        remaining = context.time_remaining()  # the client's own deadline bounds the queue wait
        if remaining is not None and (timeout_s is None or remaining < timeout_s):
            timeout_s = max(remaining, 1e-6)
        item = self.server.get(name, request.model_version or None)
        version = str(item.model.version)  # pin the version that runs
        # The batcher answers every request it took (result, error, or its timeout), so this wait
        # ends; the worker thread is what holds the RPC meanwhile.
        result = self.server.infer(name, feed, version, timeout_s, priority).result()
        outputs = result.outputs
        names = requested_outputs(request, outputs)
        total = sum(getattr(outputs[n], "nbytes", 0) for n in names)
        limit = self.ctx.limits.max_output_bytes
        if total > limit:
            raise PayloadTooLarge(
                f"model '{name}': the response would be {total} bytes; the limit is {limit} bytes (max_output_bytes)"
            )
        response = self._response(request, version, outputs, names)
        success, queue, compute, batch, latency = self._series_of(name, version)
        success.inc()
        queue.observe(result.queue_s)
        compute.observe(result.compute_s)
        batch.observe(result.batch_size)
        latency.observe(time.perf_counter() - start)
        return response

    def _series_of(self, name: str, version: str) -> tuple[Any, ...]:
        """The metric series of a served (model, version), looked up once: prometheus_client's
        ``labels()`` costs ~2 us a call, five a request. Only loaded models get here (a bounded
        set), and series are never removed, so keeping them is safe."""
        series = self._series.get((name, version))
        if series is None:
            m = self.ctx.metrics
            series = tuple(
                metric.labels(name, version) for metric in (m.success, m.queue, m.compute, m.batch, m.request)
            )
            self._series[(name, version)] = series
        return series

    def _response(self, request: Any, version: str, outputs: dict[str, Any], names: list[str]) -> bytes:
        """The serialized ``ModelInferResponse``: protobuf writes the small fields, the raw output
        tensors are appended as raw_output_contents fields (valid wire format: a repeated field may
        come after the others), so they are not copied into a message and out again."""
        tensor = self.pb.ModelInferResponse.InferOutputTensor
        specs, parts = [], []
        for out_name in names:
            datatype, shape, raw = encode_output(np.asarray(outputs[out_name]), request.model_name, out_name)
            specs.append(tensor(name=out_name, datatype=datatype, shape=shape))
            parts += [_RAW_OUTPUT_TAG, encode_varint(len(raw)), raw]
        head = self.pb.ModelInferResponse(
            model_name=request.model_name, model_version=version, id=request.id, outputs=specs
        ).SerializeToString()
        return b"".join([head, *parts])

    # --- repository
    def RepositoryIndex(self, request: Any, context: Any) -> Any:
        def index() -> Any:
            rows = self.server.index()
            entry = self.pb.RepositoryIndexResponse.ModelIndex
            return self.pb.RepositoryIndexResponse(
                models=[
                    entry(
                        name=r["name"],
                        version=r["version"],
                        state=r["state"],
                        reason=self.ctx.redact(r.get("reason", "")),
                    )
                    for r in rows
                    if not request.ready or r["state"] == "READY"
                ]
            )

        return self._guarded(context, "", "repository", True, index)

    def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        def load() -> Any:
            if request.parameters:
                raise BadInput(
                    f"model {shown(request.model_name)}: load parameters {sorted(request.parameters)} are not "
                    "supported (the repository's config.yaml and files are what load)"
                )
            self.server.load(request.model_name)
            return self.pb.RepositoryModelLoadResponse()

        return self._guarded(context, request.model_name, "repository", True, load)

    def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        def unload() -> Any:
            self.server.unload(request.model_name)
            return self.pb.RepositoryModelUnloadResponse()

        return self._guarded(context, request.model_name, "repository", True, unload)


def add_service(server: Any, service: _Service, control: concurrent.futures.ThreadPoolExecutor) -> None:
    """Register every RPC of ``GRPCInferenceService`` (from the proto's descriptor) on ``server``:
    ModelInfer on the server's own (inference) pool, taking and returning serialized bytes;
    every other RPC on the ``control`` pool (grpc's per-handler ``experimental_thread_pool``;
    where a grpc version ignores it they share the inference pool, which still works)."""
    grpc, pb = service.grpc, service.pb
    descriptor = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in descriptor.methods:
        behaviour = functools.partial(getattr(service, method.name))
        request_type, response_type = (
            getattr(pb, method.input_type.name),
            getattr(pb, method.output_type.name),
        )
        raw = method.name == "ModelInfer"
        if not raw:
            behaviour.experimental_thread_pool = control  # type: ignore[attr-defined]
        make = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming or method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            behaviour,
            request_deserializer=None if raw else request_type.FromString,
            response_serializer=None if raw else response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))


class GrpcFrontEnd:
    """The gRPC server on its own worker threads; ``start`` returns once it listens (the bound
    port in ``port``), ``stop`` lets in-flight RPCs finish within ``grace_s``."""

    def __init__(self, ctx: Context, security: Security, options: GrpcOptions) -> None:
        require_grpc()
        if options.workers < 1:
            raise BadInput(f"gRPC workers must be at least 1, got {options.workers}")
        self.ctx, self.security, self.options = ctx, security, options
        self.port = options.port
        self._server: Any = None
        self._pools: list[concurrent.futures.ThreadPoolExecutor] = []

    @classmethod
    def standalone(
        cls,
        server: ModelServer,
        options: GrpcOptions,
        limits: ServeLimits | None = None,
        security: Security | None = None,
    ) -> GrpcFrontEnd:
        """A front end with its own metrics (when no HTTP server shares them)."""
        ctx = Context(server, limits or ServeLimits(), ServerMetrics())
        if server.memory is not None:
            ctx.metrics.watch_memory(server, server.memory.budget)
        return cls(ctx, security or Security(), options)

    def start(self) -> GrpcFrontEnd:
        import grpc
        from tritonclient.grpc import model_config_pb2, service_pb2

        opts, limits = self.options, self.ctx.limits
        infer_pool = concurrent.futures.ThreadPoolExecutor(opts.workers, thread_name_prefix="kiln-grpc")
        control_pool = concurrent.futures.ThreadPoolExecutor(
            CONTROL_WORKERS, thread_name_prefix="kiln-grpc-ctl"
        )
        self._pools = [infer_pool, control_pool]
        server = grpc.server(
            infer_pool,
            options=[
                ("grpc.max_receive_message_length", limits.max_body_bytes),
                ("grpc.max_send_message_length", limits.max_output_bytes + HEADER_SLACK),
                ("grpc.so_reuseport", 0),
            ],
        )
        service = _Service(self.ctx, self.security, service_pb2, model_config_pb2, grpc)
        add_service(server, service, control_pool)
        host = f"[{opts.host}]" if ":" in opts.host and not opts.host.startswith("[") else opts.host
        address = f"{host}:{opts.port}"
        try:
            if opts.ssl_certfile and opts.ssl_keyfile:
                creds = grpc.ssl_server_credentials(
                    [(Path(opts.ssl_keyfile).read_bytes(), Path(opts.ssl_certfile).read_bytes())]
                )
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            self._shutdown_pools()
            raise OSError(f"cannot listen for gRPC on {address}: {exc}") from None
        if not port:
            self._shutdown_pools()
            raise OSError(f"cannot listen for gRPC on {address} (port in use?)")
        self.port = port
        server.start()
        self._server = server
        log.info("serving KServe v2 gRPC on %s:%d", opts.host, port)
        return self

    def stop(self) -> None:
        """Stop accepting RPCs, let in-flight ones finish (``grace_s``); idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop(self.options.grace_s).wait(self.options.grace_s + 10)
        self._shutdown_pools()

    def _shutdown_pools(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=False)
        self._pools = []
