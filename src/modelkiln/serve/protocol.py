"""KServe v2 inference messages: JSON tensors and Triton's binary tensor extension.

A request body is a JSON header, optionally followed by raw tensor bytes; the header length is
given by ``Inference-Header-Content-Length``, and each binary input says its byte size in
``parameters.binary_data_size``. Outputs go back as JSON ``data`` or, when asked
(``binary_data`` per output, ``binary_data_output`` for all), as raw bytes after the header.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelkiln.errors import BadInput

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


@dataclass
class InferMessage:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool] | None = None  # requested output -> binary?
    binary_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def timeout_s(self) -> float | None:
        """Triton's per-request ``timeout`` parameter, in microseconds."""
        t = self.parameters.get("timeout")
        if t is None:
            return None
        if not isinstance(t, (int, float)) or isinstance(t, bool) or t <= 0:
            raise BadInput(f"parameter 'timeout' must be a positive number of microseconds, got {t!r}")
        return t / 1e6


def parse_request(body: bytes, header_length: int | None, model: str) -> InferMessage:
    """Decode an infer request; every problem is a BadInput naming the model and the input."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise BadInput(
            f"Inference-Header-Content-Length {header_length} does not fit a {len(body)}-byte body"
        )
    head = body[:header_length] if header_length is not None else body
    try:
        msg = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"model '{model}': request is not valid JSON: {exc}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("inputs"), list) or not msg["inputs"]:
        raise BadInput(f"model '{model}': request needs a non-empty 'inputs' list")
    params = msg.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadInput(f"model '{model}': 'parameters' must be an object")
    binary = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in msg["inputs"]:
        name, array, used = _input(spec, binary, offset, model)
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
            outputs[o["name"]] = bool(
                (o.get("parameters") or {}).get("binary_data", params.get("binary_data_output", False))
            )
    return InferMessage(msg.get("id"), inputs, outputs, bool(params.get("binary_data_output", False)), params)


def _input(spec: Any, binary: memoryview, offset: int, model: str) -> tuple[str, np.ndarray, int]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise BadInput(f"model '{model}': each input needs a 'name'")
    name = spec["name"]
    where = f"model '{model}': input '{name}'"
    datatype, shape = spec.get("datatype"), spec.get("shape")
    if datatype not in NP_TYPES:
        raise BadInput(f"{where}: datatype must be one of {sorted(NP_TYPES)}, got {datatype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadInput(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    dtype = np.dtype(NP_TYPES[datatype])
    count = math.prod(shape)
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize:
            raise BadInput(
                f"{where}: binary_data_size {size} != {count} x {dtype.itemsize} bytes for {datatype}{shape}"
            )
        if offset + size > len(binary):
            raise BadInput(f"{where}: binary data ends after {len(binary) - offset} of {size} bytes")
        return name, np.frombuffer(binary[offset : offset + size], dtype).reshape(shape), size
    if "data" not in spec:
        raise BadInput(f"{where}: has neither 'data' nor parameters.binary_data_size")
    try:
        array = np.asarray(spec["data"], dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise BadInput(f"{where}: data is not {datatype}: {exc}") from exc
    if array.size != count:
        raise BadInput(f"{where}: {array.size} values for shape {shape} ({count} expected)")
    return name, array.reshape(shape), 0


def encode_response(
    model: str, version: str, msg: InferMessage, outputs: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """Body and header length (None when the body is plain JSON)."""
    wanted = msg.outputs if msg.outputs is not None else {k: msg.binary_default for k in outputs}
    missing = sorted(set(wanted) - set(outputs))
    if missing:
        raise BadInput(f"model '{model}': unknown output(s) {missing}; it has {sorted(outputs)}")
    tensors, blobs = [], []
    for name, binary in wanted.items():
        arr = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": KS_TYPES[arr.dtype.name], "shape": list(arr.shape)}
        if binary:
            raw = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        tensors.append(entry)
    head = {"model_name": model, "model_version": version, "outputs": tensors}
    if msg.id is not None:
        head["id"] = msg.id
    header = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
