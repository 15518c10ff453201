"""A hostile client against kiln serve: every malformed, oversized or odd request is a 400/413 (or
404/408) whose message names the field and the limit, never a 500, never a file path or an
exception class; the server answers the next good request; real 500s are logged with their
traceback; NaN goes out as valid JSON; metrics only label loaded models; a client leaving
mid-upload is an info line, not an error; idle and slow connections are closed."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import resource
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from conftest import Running
from modelkiln.errors import PayloadTooLarge
from modelkiln.serve.guard import ServeLimits, check_json_shape, json_depth
from modelkiln.serve.protocol import InferMessage, encode_response

LIMITS = ServeLimits(
    max_body_bytes=4 << 20,
    max_output_bytes=600,
    max_image_pixels=20_000_000,
    max_request_pixels=40_000_000,
    max_images=8,
    max_prompt_bytes=64 << 10,
    body_timeout_s=1.0,
    header_timeout_s=0.5,
    keep_alive_s=2.0,
)
GOOD = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@pytest.fixture(scope="module")
def hostile(repo: Path) -> Iterator[Running]:
    r = Running(repo, limits=LIMITS)
    yield r
    r.stop()


def send(
    running: Running, path: str, body: bytes | dict | None = None, headers: dict | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
    try:
        conn.request("POST" if data is not None else "GET", path, data, headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def assert_serves(running: Running) -> None:
    status, _, body = send(running, "/v2/models/affine/infer", GOOD)
    assert status == 200, body
    assert json.loads(body)["outputs"][0]["data"] == [4.0, 7.0, 10.0, 13.0]


def assert_clean(message: str, running: Running) -> None:
    """No repository path, no exception class, bounded."""
    root = str(running.server.repository.root)
    assert root not in message and "Error:" not in message and "Traceback" not in message
    assert len(message) < 2100


def infer_body(**spec) -> dict:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4], **spec}]}


def binary_case(size: float) -> tuple[bytes, dict]:
    spec = {"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": size}}
    head = json.dumps({"inputs": [spec]}).encode()
    return head + bytes(16), {"Inference-Header-Content-Length": str(len(head))}


KSERVE_CASES = [
    pytest.param(b"[" * 100_000 + b"]" * 100_000, {}, 400, "max_json_depth", id="nested-100000"),
    pytest.param(
        b'{"inputs": [{"name": "x", "data": [' + b"7" * 5000 + b"]}]}",
        {},
        400,
        "max_number_digits",
        id="5000-digits",
    ),
    pytest.param(
        json.dumps(GOOD).encode(),
        {"Inference-Header-Content-Length": "²"},
        400,
        "Inference-Header-Content-Length",
        id="superscript-two",
    ),
    pytest.param(
        json.dumps(GOOD).encode(),
        {"Inference-Header-Content-Length": "99999"},
        400,
        "does not fit",
        id="header-too-long",
    ),
    pytest.param(*binary_case(16.0), 400, "binary_data_size must be an integer", id="binary-size-float"),
    pytest.param(
        *binary_case(602112.0), 400, "binary_data_size must be an integer", id="binary-size-602112.0"
    ),
    pytest.param({**GOOD, "parameters": [1, 2]}, {}, 400, "'parameters' must be an object", id="params-list"),
    pytest.param(
        {**GOOD, "parameters": "timeout"}, {}, 400, "'parameters' must be an object", id="params-str"
    ),
    pytest.param(
        infer_body(parameters=[]), {}, 400, "'parameters' must be an object", id="input-params-list"
    ),
    pytest.param(
        {**GOOD, "outputs": [{"name": "y", "parameters": "x"}]},
        {},
        400,
        "'parameters' must be an object",
        id="output-params-str",
    ),
    pytest.param(
        b'{"parameters": {"timeout": 1e400}, ' + json.dumps(GOOD).encode()[1:],
        {},
        400,
        "timeout",
        id="timeout-1e400",
    ),
    pytest.param(
        b'{"parameters": {"timeout": NaN}, ' + json.dumps(GOOD).encode()[1:],
        {},
        400,
        "timeout",
        id="timeout-nan",
    ),
    pytest.param({**GOOD, "parameters": {"timeout": -5}}, {}, 400, "timeout", id="timeout-negative"),
    pytest.param({**GOOD, "id": {"a": 1}}, {}, 400, "'id' must be a string", id="id-object"),
    pytest.param(infer_body(shape=[1] * 40, data=[1]), {}, 400, "at most 16 integers", id="40-dims"),
    pytest.param(infer_body(shape=[0, 2**40], data=[]), {}, 400, "shape must be", id="huge-dim"),
    pytest.param(
        infer_body(datatype="INT64", data=[2**70, 1, 2, 3]), {}, 400, "data is not INT64", id="int-overflow"
    ),
    pytest.param(infer_body(datatype=["FP32"]), {}, 400, "datatype must be one of", id="datatype-list"),
    pytest.param(b"\xff\xfe{", {}, 400, "not valid JSON", id="not-utf8"),
    pytest.param(
        b'{"inputs": [{"name": "\\ud800", "shape": [1], "datatype": "FP32", "data": [1]}]}',
        {},
        400,
        "expected inputs",
        id="lone-surrogate-name",
    ),
]


@pytest.mark.parametrize(("body", "headers", "status", "message"), KSERVE_CASES)
def test_bad_kserve_requests_are_4xx_naming_the_field(hostile, body, headers, status, message) -> None:
    code, _, raw = send(hostile, "/v2/models/affine/infer", body, headers)
    error = json.loads(raw)["error"]
    assert code == status and message in error, (code, error)
    assert_clean(error, hostile)
    assert_serves(hostile)


def test_load_of_a_long_or_odd_name_is_404_without_the_repository(hostile) -> None:
    assert send(hostile, "/v2/repository/models/..%2F..%2Fetc/load", b"{}")[0] == 404  # no route
    for name in ("a" * 300, quote("ü" * 120), "%00x", "..", "a%5Cb", ".hidden"):
        code, _, raw = send(hostile, f"/v2/repository/models/{name}/load", b"{}")
        error = json.loads(raw)["error"]
        assert code == 404 and "is not in the repository" in error, (name, code, error)
        assert_clean(error, hostile)
        assert "affine" not in error and "slow" not in error  # no list of the other models
    code, _, raw = send(hostile, "/v2/models/nope/infer", GOOD)
    assert code == 404 and "affine" not in json.loads(raw)["error"]
    assert_serves(hostile)


def test_nan_and_infinity_go_out_as_valid_json(hostile) -> None:
    body = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [NaN, Infinity, -Infinity, 1]}]}'
    code, _, raw = send(hostile, "/v2/models/affine/infer", body)
    assert code == 200

    def strict(token: str) -> None:
        raise AssertionError(f"bare {token} in the response")

    out = json.loads(raw, parse_constant=strict)["outputs"][0]["data"]
    assert out[:3] == ["NaN", "Infinity", "-Infinity"] and out[3] == 4.0
    np.testing.assert_array_equal(np.asarray(out, np.float32), [np.nan, np.inf, -np.inf, 4.0])


def test_tritonclient_reads_nan_back() -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.http._infer_result import InferResult

    msg = InferMessage(None, {}, {"y": False})
    payload, _ = encode_response("m", "1", msg, {"y": np.array([np.nan, 1.5, -np.inf], np.float32)})
    result = InferResult.from_response_body(payload)
    assert httpclient and np.array_equal(
        result.as_numpy("y"), np.array([np.nan, 1.5, -np.inf], np.float32), equal_nan=True
    )


def test_responses_over_the_output_limit_are_refused_before_encoding(hostile) -> None:
    big = {"inputs": [{"name": "x", "shape": [8, 4], "datatype": "FP32", "data": [1.0] * 32}]}
    code, _, raw = send(hostile, "/v2/models/affine/infer", big)
    assert code == 413 and "max_output_bytes" in json.loads(raw)["error"]
    big["outputs"] = [{"name": "y", "parameters": {"binary_data": True}}]  # 128 bytes in binary
    code, headers, raw = send(hostile, "/v2/models/affine/infer", big)
    assert code == 200 and int(headers["inference-header-content-length"]) < len(raw)
    msg = InferMessage(None, {}, None)
    with pytest.raises(PayloadTooLarge, match="max_output_bytes"):
        encode_response("m", "1", msg, {"y": np.zeros(1000, np.float32)}, max_bytes=1000)


def test_json_shape_checks() -> None:
    limits = ServeLimits(max_json_depth=3, max_number_digits=5)
    check_json_shape(b'{"a": [[1]], "b": "[[[[[[ 1234567890"}', limits, "x")  # in strings: fine
    with pytest.raises(Exception, match="deeper than 3 levels"):
        check_json_shape(b'{"a": [[[1]]]}', limits, "x")
    with pytest.raises(Exception, match="more than 5 digits"):
        check_json_shape(b'{"a": 123456}', limits, "x")
    assert json_depth(b'{"a": [[], [[]]], "b": {}}') == 4


# --- chat bodies (parsed before the model is looked up: no generative model needed) ----------


def png_header(width: int, height: int) -> bytes:
    """A small PNG that declares ``width`` x ``height`` (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (1 + width * 3) * 4)
    head = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def real_png(width: int, height: int) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", np.zeros((height, width, 3), np.uint8))
    assert ok
    return data.tobytes()


def chat(*images: bytes, text: str = "hi", **extra) -> dict:
    parts: list[dict] = [{"type": "text", "text": text}]
    parts += [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(i).decode()}}
        for i in images
    ]
    return {"model": "affine", "messages": [{"role": "user", "content": parts}], **extra}


CHAT_CASES = [
    pytest.param(chat(png_header(16000, 16000)), 413, "max_image_pixels", id="png-256MP"),
    pytest.param(chat(png_header(60000, 60000)), 413, "60000x60000 pixels; the limit is", id="png-3600MP"),
    pytest.param(chat(*[png_header(4000, 4000)] * 9), 413, "max_images", id="9-images"),
    pytest.param(chat(*[png_header(4000, 4000)] * 3), 413, "max_request_pixels", id="48MP-together"),
    pytest.param(chat(text="x" * (70 << 10)), 413, "max_prompt_bytes", id="70KiB-prompt"),
    pytest.param(chat(b"GIF89a" + bytes(20)), 400, "image messages[0].content[1]", id="gif-as-png"),
    pytest.param(chat(b"\x89PNG\r\n\x1a\n" + bytes(30)), 400, "cannot decode image", id="broken-png"),
    pytest.param(chat(temperature=float("nan")), 400, "'temperature'", id="temperature-nan"),
    pytest.param(chat(temperature=1e-320), 400, "'temperature'", id="temperature-1e-320"),
    pytest.param(chat(temperature=5), 400, "'temperature'", id="temperature-5"),
    pytest.param(chat(top_p=float("inf")), 400, "'top_p'", id="top-p-inf"),
    pytest.param(chat(seed=-1), 400, "'seed'", id="seed-negative"),
    pytest.param(chat(seed=2**80), 400, "'seed'", id="seed-huge"),
    pytest.param(chat(text="a\ud800b"), 400, "lone surrogate", id="lone-surrogate"),
    pytest.param({**chat(), "model": "\ud800" * 3}, 404, "unknown model", id="surrogate-model"),
    pytest.param({**chat(), "model": "m" * 100_000}, 404, "unknown model", id="long-model"),
    pytest.param({**chat(), "n": "x" * 100_000}, 400, "only n=1", id="long-n"),
    pytest.param(chat(max_tokens=10**30), 400, "not a generative model", id="huge-max-tokens"),
]


@pytest.mark.parametrize(("body", "status", "message"), CHAT_CASES)
def test_bad_chat_requests_are_4xx_naming_the_field(hostile, body, status, message) -> None:
    data = json.dumps(body).encode()  # NaN as a bare token, lone surrogates as \ud800: both JSON.loads-able
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _, raw = send(hostile, "/v1/chat/completions", data, {"Content-Type": "application/json"})
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    error = json.loads(raw)["error"]
    assert code == status and message in error["message"], (code, error)
    assert error["type"] == "invalid_request_error" and grown_mb < 200
    assert_clean(error["message"], hostile)
    assert_serves(hostile)


def test_images_within_the_limits_decode(hostile) -> None:
    """The same checks let a normal image through (the request then fails on the model only)."""
    code, _, raw = send(hostile, "/v1/chat/completions", chat(real_png(640, 480), real_png(64, 64)))
    assert code == 400 and "not a generative model" in json.loads(raw)["error"]["message"]


# --- failures, logs and metrics ---------------------------------------------------------------


def test_real_500s_are_logged_with_a_traceback_on_every_route(hostile, monkeypatch, caplog) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("secret detail /srv/models")

    monkeypatch.setattr(hostile.server, "infer", boom)
    monkeypatch.setattr(hostile.server, "chat", boom)
    caplog.set_level(logging.INFO)
    for path, body in (("/v2/models/affine/infer", GOOD), ("/v1/chat/completions", chat())):
        code, _, raw = send(hostile, path, body)
        text = raw.decode()
        assert code == 500 and "internal error (ref " in text, text
        assert "RuntimeError" not in text and "secret detail" not in text
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all(r.exc_info and r.exc_info[0] is RuntimeError for r in errors)
    assert {"infer", "chat"} == {r.getMessage().split()[0] for r in errors}
    monkeypatch.undo()
    assert_serves(hostile)


def metrics_text(running: Running) -> str:
    return send(running, "/metrics")[2].decode()


def test_metrics_only_label_loaded_models(hostile) -> None:
    before = len(metrics_text(hostile))
    for i in range(200):
        send(hostile, f"/v2/models/junk{i}{'x' * 500}/infer", GOOD)
        send(hostile, "/v1/chat/completions", {**chat(), "model": f"junk{i}"})
    text = metrics_text(hostile)
    assert "junk" not in text and 'model="unknown"' in text
    assert len(text) < before + 4000  # a fixed set of series, however many names were tried


def test_a_client_leaving_mid_upload_is_an_info_line_not_a_failure(hostile, caplog) -> None:
    caplog.set_level(logging.INFO)
    sock = socket.create_connection(("127.0.0.1", hostile.port), timeout=5)
    sock.sendall(
        b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"
        + b"{" * 100
    )
    time.sleep(0.2)
    sock.close()
    deadline = time.time() + 5
    while 'kiln_client_disconnects_total{route="infer"} 1.0' not in (text := metrics_text(hostile)):
        assert time.time() < deadline, text
        time.sleep(0.05)
    assert "ClientGone" not in text  # not counted as a failure
    gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert gone and all(r.levelno == logging.INFO for r in gone)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_slow_body_is_cut_off_with_408(hostile) -> None:
    sock = socket.create_connection(("127.0.0.1", hostile.port), timeout=10)
    try:
        sock.sendall(
            b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{"
        )
        start = time.time()
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
        assert 0.8 < time.time() - start < 5
        assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in reply
    finally:
        sock.close()
    assert_serves(hostile)


@pytest.mark.parametrize("sent", [b"", b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: 127"])
def test_idle_and_slowloris_connections_are_closed(hostile, sent: bytes) -> None:
    sock = socket.create_connection(("127.0.0.1", hostile.port), timeout=10)
    try:
        sock.sendall(sent)
        start = time.time()
        assert sock.recv(100) == b""  # closed by the server, header_timeout_s = 0.5
        assert time.time() - start < 3
    finally:
        sock.close()
    assert_serves(hostile)


def test_parsing_decoding_and_encoding_run_off_the_event_loop(hostile, monkeypatch) -> None:
    """Each heavy step made to take 1 s (sleeping, as a GIL-releasing decoder would): health
    probes sent meanwhile are answered at once, so the step did not run on the event loop."""
    from concurrent.futures import ThreadPoolExecutor

    from modelkiln.serve import context, http, openai

    def slow(fn):
        def wrapper(*args, **kwargs):
            time.sleep(1.0)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(context, "INLINE_BYTES", 0)  # offload even small work
    monkeypatch.setattr(http, "parse_request", slow(http.parse_request))
    monkeypatch.setattr(http, "encode_response", slow(http.encode_response))
    monkeypatch.setattr(openai, "read_chat", slow(openai.read_chat))
    for path, body, status in (
        ("/v2/models/affine/infer", GOOD, 200),  # parse + encode: 2 s
        ("/v1/chat/completions", chat(real_png(64, 64)), 400),  # parse + decode, then "not generative"
    ):
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(send, hostile, path, body)
            time.sleep(0.2)
            probes = []
            while not pending.done() and len(probes) < 40:
                start = time.perf_counter()
                assert send(hostile, "/v2/health/live")[0] == 200
                probes.append(time.perf_counter() - start)
                time.sleep(0.05)
            assert pending.result()[0] == status
        assert len(probes) >= 5 and max(probes) < 0.6, probes  # on the loop: >= 0.8 s


def test_onnx_runtime_refusing_the_values_is_a_400(hostile, monkeypatch) -> None:
    """ONNX Runtime's INVALID_ARGUMENT (checks inside the model) is the request's fault."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    def refuse(*args, **kwargs):
        raise InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions")

    monkeypatch.setattr(hostile.server, "infer", refuse)
    code, _, raw = send(hostile, "/v2/models/affine/infer", GOOD)
    assert code == 400 and "invalid dimensions" in json.loads(raw)["error"]
    monkeypatch.undo()
    assert_serves(hostile)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "8", 2.5])
def test_limits_must_be_positive_finite_numbers(bad) -> None:
    from modelkiln.errors import ConfigError

    with pytest.raises(ConfigError, match="max_images"):
        ServeLimits(max_images=bad)


def test_serving_beyond_loopback_without_a_key_warns(caplog) -> None:
    from modelkiln.serve.http import _warn_if_exposed
    from modelkiln.serve.security import Security

    caplog.set_level(logging.WARNING)
    for host in ("127.0.0.1", "localhost", "::1"):
        _warn_if_exposed(host, Security())
    _warn_if_exposed("0.0.0.0", Security(api_key="a-long-enough-key"))
    assert not caplog.records
    _warn_if_exposed("0.0.0.0", Security())
    assert "without an API key" in caplog.records[0].getMessage()


def test_large_json_outputs_are_chunked_and_exact() -> None:
    values = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)
    values[[0, 70_000, 199_999]] = [np.nan, np.inf, -np.inf]
    msg = InferMessage("req-1", {}, {"y": False})
    payload, head_len = encode_response("m", "1", msg, {"y": values}, max_bytes=1 << 30)
    body = json.loads(payload)
    assert head_len is None and body["id"] == "req-1"
    np.testing.assert_array_equal(np.asarray(body["outputs"][0]["data"], np.float32), values)
