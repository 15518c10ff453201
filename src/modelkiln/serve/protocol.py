"""KServe v2 inference messages: JSON tensors and Triton's binary tensor extension.

A request body is a JSON header, optionally followed by raw tensor bytes; the header length is
given by ``Inference-Header-Content-Length``, and each binary input says its byte size in
``parameters.binary_data_size``. Outputs go back as JSON ``data`` or, when asked
(``binary_data`` per output, ``binary_data_output`` for all), as raw bytes after the header.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelkiln.errors import BadInput, PayloadTooLarge
from modelkiln.serve.config import PRIORITY_LEVELS
from modelkiln.serve.guard import ServeLimits, check_json_shape, finite_number, load_json, shown

NP_TYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
KS_TYPES = {np.dtype(v).name: k for k, v in NP_TYPES.items()}
MAX_DIMS = 16  # numpy allows 64; no served tensor has more than a handful
MAX_DIM = (1 << 31) - 1
MAX_TIMEOUT_US = 86_400e6  # a day
MAX_ID = 256  # characters of a request id (echoed in the response)
#: Characters of JSON per value, at most, by dtype kind (for the response-size check).
JSON_WIDTH = {"f": 24, "i": 20, "u": 20, "b": 5}
ENCODE_CHUNK = 1 << 14  # values turned into JSON text at a time (bounds each GIL-holding call)
PARSE_CHUNK = 1 << 16  # bytes of number text parsed at a time (a few ms each)
MIN_CUT = 1 << 16  # bodies and arrays smaller than this go through the JSON parser whole
_DATA_KEY = re.compile(rb'"data"\s*:\s*\[')
_NUMBER_CHARS = b"0123456789+-.eE, \t\r\n"  # all a flat array of plain JSON numbers holds
_INTEGER_CHARS = b"0123456789+-, \t\r\n"


DEFAULT_LIMITS = ServeLimits()


@dataclass
class InferMessage:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool] | None = None  # requested output -> binary?
    binary_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def timeout_s(self) -> float | None:
        """Triton's per-request ``timeout`` parameter, in microseconds (finite: a NaN or infinite
        deadline would never expire)."""
        t = self.parameters.get("timeout")
        if t is None:
            return None
        micros = finite_number(t, "parameter 'timeout' (microseconds)", 0.0, MAX_TIMEOUT_US)
        if micros <= 0:
            raise BadInput(f"parameter 'timeout' must be a positive number of microseconds, got {shown(t)}")
        return micros / 1e6

    def priority_level(self, model: str) -> int | None:
        """The level of Triton's ``priority`` parameter (see request_priority)."""
        return request_priority(self.parameters.get("priority"), model)


def request_priority(value: Any, model: str) -> int | None:
    """A request's ``priority`` as Triton numbers it, turned into our level: 0 (or absent) is the
    model's own priority (None), 1 the most urgent .. PRIORITY_LEVELS the least (level value-1).
    tritonclient sends ``priority=N`` as this parameter, over HTTP and gRPC alike."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= PRIORITY_LEVELS:
        raise BadInput(
            f"model {shown(model)}: parameter 'priority' must be an integer 0..{PRIORITY_LEVELS} "
            f"(0: the model's own priority; 1 most urgent, as in Triton), got {shown(value)}"
        )
    return None if value == 0 else value - 1


def header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as an int ("²" is a digit to str.isdigit)."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise BadInput(f"Inference-Header-Content-Length must be a byte count, got {shown(value)}")
    return int(value)


def parse_request(
    body: bytes, header_length: int | None, model: str, limits: ServeLimits = DEFAULT_LIMITS
) -> InferMessage:
    """Decode an infer request; every problem is a BadInput naming the model and the input."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise BadInput(
            f"Inference-Header-Content-Length {header_length} does not fit a {len(body)}-byte body"
        )
    head = bytes(body[:header_length]) if header_length is not None else body
    check_json_shape(head, limits, f"model '{model}': request")
    skeleton, arrays = cut_numeric_arrays(head)
    msg = load_json(skeleton, limits, f"model '{model}': request")
    if not isinstance(msg, dict) or not isinstance(msg.get("inputs"), list) or not msg["inputs"]:
        raise BadInput(f"model '{model}': request needs a non-empty 'inputs' list")
    params = _parameters(msg, f"model '{model}'")
    request_id = msg.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_ID):
        raise BadInput(f"model '{model}': 'id' must be a string of at most {MAX_ID} characters")
    binary = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in msg["inputs"]:
        name, array, used = _input(spec, binary, offset, model, arrays, limits)
        if name in inputs:
            raise BadInput(f"model '{model}': input '{name}' given twice")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise BadInput(
            f"model '{model}': {len(binary) - offset} bytes of binary data are not claimed by any input"
        )
    outputs = None
    if msg.get("outputs") is not None:
        if not isinstance(msg["outputs"], list):
            raise BadInput(f"model '{model}': 'outputs' must be a list")
        outputs = {}
        for o in msg["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise BadInput(f"model '{model}': each requested output needs a 'name'")
            own = _parameters(o, f"model '{model}': output {shown(o['name'])}")
            outputs[o["name"]] = bool(own.get("binary_data", params.get("binary_data_output", False)))
    return InferMessage(request_id, inputs, outputs, bool(params.get("binary_data_output", False)), params)


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """An object's ``parameters`` (absent or null: none); BadInput when it is not an object."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadInput(f"{where}: 'parameters' must be an object, got {type(params).__name__}")
    return params


def _input(
    spec: Any,
    binary: memoryview,
    offset: int,
    model: str,
    arrays: dict[str, NumericSpan],
    limits: ServeLimits,
) -> tuple[str, np.ndarray, int]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise BadInput(f"model '{model}': each input needs a 'name'")
    name = spec["name"]
    where = f"model '{model}': input {shown(name)}"
    datatype, shape = spec.get("datatype"), spec.get("shape")
    if not isinstance(datatype, str) or datatype not in NP_TYPES:
        raise BadInput(f"{where}: datatype must be one of {sorted(NP_TYPES)}, got {shown(datatype)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise BadInput(
            f"{where}: shape must be a list of at most {MAX_DIMS} integers in [0, {MAX_DIM}], got {shown(shape)}"
        )
    dtype = np.dtype(NP_TYPES[datatype])
    count = math.prod(shape)
    size = _parameters(spec, where).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool):
            raise BadInput(f"{where}: binary_data_size must be an integer byte count, got {shown(size)}")
        if size != count * dtype.itemsize:
            raise BadInput(
                f"{where}: binary_data_size {size} != {count} x {dtype.itemsize} bytes for {datatype}{shape}"
            )
        if offset + size > len(binary):
            raise BadInput(f"{where}: binary data ends after {len(binary) - offset} of {size} bytes")
        return name, np.frombuffer(binary[offset : offset + size], dtype).reshape(shape), size
    if "data" not in spec:
        raise BadInput(f"{where}: has neither 'data' nor parameters.binary_data_size")
    data = spec["data"]
    cut = arrays.get(data) if isinstance(data, str) else None
    array = cut.parse(dtype) if cut is not None else None
    if array is not None:
        data = None
    elif cut is not None:  # not plain numbers for this dtype: the JSON parser says what is wrong
        data = load_json(cut.text(), limits, f"{where}: data")
    try:
        array = np.asarray(data, dtype=dtype) if array is None else array
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadInput(f"{where}: data is not {datatype}: {shown(str(exc), 200)}") from None
    if array.size != count:
        raise BadInput(f"{where}: {array.size} values for shape {shape} ({count} expected)")
    return name, array.reshape(shape), 0


@dataclass(frozen=True)
class NumericSpan:
    """A flat array of plain JSON numbers cut out of a request body (offsets into ``body``)."""

    body: bytes
    start: int
    end: int

    def text(self) -> bytes:
        return b"[" + self.body[self.start : self.end] + b"]"

    def parse(self, dtype: np.dtype) -> np.ndarray | None:
        """The numbers as ``dtype``, a chunk of text at a time so the GIL is let go between
        chunks; None when the text is not plainly comma-separated numbers of that kind (the
        caller then lets the JSON parser read it, or say what is wrong)."""
        if dtype.kind not in "fiu":
            return None
        body, end = self.body, self.end
        wide = np.float64 if dtype.kind == "f" else np.int64
        parts, pos = [], self.start
        while pos < end:
            cut = body.find(b",", min(pos + PARSE_CHUNK, end), end)
            stop = end if cut < 0 else cut
            chunk = body[pos:stop]
            if dtype.kind != "f" and chunk.translate(None, _INTEGER_CHARS):
                return None  # 1.0 or 1e3 for an integer tensor: the JSON path decides
            try:
                part = _numbers(chunk, wide)
            except (ValueError, OverflowError):  # "1 2", "1,,2", "." and the like
                return None
            if part.size != chunk.count(b",") + 1:  # "1,2," reads as two numbers
                return None
            parts.append(part)
            pos = stop + 1
        if not parts:
            return None
        values = np.concatenate(parts)
        if dtype.kind != "f" and values.size:
            info = np.iinfo(dtype)
            if values.min() < info.min or values.max() > info.max:
                return None  # out of range: the JSON path refuses it with numpy's message
        with np.errstate(over="ignore"):  # 1e300 as FP16 is inf, as the JSON path makes it
            return values.astype(dtype, copy=False)


def _numbers(text: bytes, wide: type) -> np.ndarray:
    """Comma-separated numbers, strictly: numpy's C parser for floats (it raises on anything it
    cannot read to the end); for integers the split-and-cast path, which raises on overflow where
    the C parser would saturate."""
    if wide is not np.float64:
        return np.array(text.split(b","), np.bytes_).astype(wide)
    values = np.fromstring(text, dtype=np.float64, sep=",")
    negative_zeros = np.flatnonzero((values == 0) & np.signbit(values))
    if negative_zeros.size:  # JSON's -0 is the integer 0 (+0.0); only -0.0 or -0e0 keep the sign
        tokens = text.split(b",")
        for i in negative_zeros.tolist():
            if not tokens[i].strip().translate(None, b"-0"):
                values[i] = 0.0
    return values


def cut_numeric_arrays(head: bytes) -> tuple[bytes, dict[str, NumericSpan]]:
    """Replace each large flat ``"data": [numbers]`` of a JSON request with a token string.

    Python's JSON parser makes an object per number and holds the GIL for the whole body (a
    60 MB body stalls every thread for seconds); numpy parses the cut-out text in chunks, in a
    fraction of the time and memory. The rest of the JSON is parsed as before."""
    if len(head) < MIN_CUT:
        return head, {}
    pieces: list[bytes] = []
    arrays: dict[str, NumericSpan] = {}
    pos, after = 0, 0
    while (match := _DATA_KEY.search(head, after)) is not None:
        start = match.end()
        end = head.find(b"]", start)
        if end < 0:
            break
        after = end + 1  # the next search starts past this array, never scans its numbers
        if end - start < MIN_CUT or not _only(head, start, end, _NUMBER_CHARS):
            continue
        token = f"\u0000kiln-data-{len(arrays)}"
        arrays[token] = NumericSpan(head, start, end)
        pieces += [head[pos : start - 1], json.dumps(token).encode()]
        pos = end + 1
    if not arrays:
        return head, {}
    pieces.append(head[pos:])
    return b"".join(pieces), arrays


def _only(data: bytes, start: int, end: int, allowed: bytes) -> bool:
    """Whether ``data[start:end]`` holds only ``allowed`` bytes (a window at a time: each C call
    short, so other threads get the GIL between windows)."""
    return not any(
        data[i : min(i + PARSE_CHUNK, end)].translate(None, allowed) for i in range(start, end, PARSE_CHUNK)
    )


def encode_response(
    model: str,
    version: str,
    msg: InferMessage,
    outputs: dict[str, np.ndarray],
    max_bytes: int = DEFAULT_LIMITS.max_output_bytes,
) -> tuple[bytes, int | None]:
    """Body and header length (None when the body is plain JSON). The size is checked before
    anything is encoded; NaN and infinities go out as the strings "NaN", "Infinity" and
    "-Infinity" (bare NaN is not JSON; numpy and tritonclient read the strings back)."""
    wanted = msg.outputs if msg.outputs is not None else {k: msg.binary_default for k in outputs}
    missing = sorted(set(wanted) - set(outputs))
    if missing:
        raise BadInput(f"model '{model}': unknown output(s) {shown(missing)}; it has {sorted(outputs)}")
    arrays = {name: np.ascontiguousarray(outputs[name]) for name in wanted}
    size = sum(
        a.nbytes if wanted[n] else a.size * JSON_WIDTH.get(a.dtype.kind, 24) for n, a in arrays.items()
    )
    if size > max_bytes:
        raise PayloadTooLarge(
            f"model '{model}': the response would be up to {size} bytes; the limit is {max_bytes} bytes "
            "(max_output_bytes; binary outputs are smaller)"
        )
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    texts: dict[str, Any] = {}
    for name, arr in arrays.items():
        entry: dict[str, Any] = {"name": name, "datatype": KS_TYPES[arr.dtype.name], "shape": list(arr.shape)}
        if wanted[name]:
            raw = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = placeholder = f"\x00{len(texts)}\x00"
            texts[json.dumps(placeholder)] = json_values(arr)
        tensors.append(entry)
    head = {"model_name": model, "model_version": version, "outputs": tensors}
    if msg.id is not None:
        head["id"] = msg.id
    header = json.dumps(head, separators=(",", ":"), allow_nan=False)
    for placeholder, values in texts.items():
        header = header.replace(placeholder, values, 1)
    encoded = header.encode()
    if not blobs:
        return encoded, None
    return b"".join([encoded, *blobs]), len(encoded)


def json_values(arr: np.ndarray) -> str:
    """A tensor's values as a JSON array, a chunk at a time (each chunk one short C call, so a
    worker thread encoding a large tensor lets the event loop run between chunks)."""
    flat = arr.ravel()
    pieces = []
    for start in range(0, flat.size, ENCODE_CHUNK):
        chunk = flat[start : start + ENCODE_CHUNK]
        values = chunk.tolist()
        if chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            for i in np.flatnonzero(~np.isfinite(chunk)).tolist():
                values[i] = (
                    "NaN" if values[i] != values[i] else ("Infinity" if values[i] > 0 else "-Infinity")
                )
        pieces.append(json.dumps(values, separators=(",", ":"))[1:-1])
    return "[" + ",".join(p for p in pieces if p) + "]"
