"""Property tests: random and mutated KServe and OpenAI bodies never get a 500 (only 2xx, 4xx, 503
or 504), every error body is JSON naming no exception class, and the server answers the next good
request after each one."""

from __future__ import annotations

import http.client
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import Running
from modelkiln.errors import BadInput
from modelkiln.serve.guard import ServeLimits
from modelkiln.serve.protocol import NP_TYPES, cut_numeric_arrays, parse_request

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GOOD = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
ALLOWED = set(range(200, 300)) | set(range(400, 500)) | {503, 504}
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def fuzzed(repo: Path) -> Iterator[Running]:
    r = Running(repo, limits=ServeLimits(max_body_bytes=1 << 20, body_timeout_s=5.0))
    yield r
    r.stop()


class Client:
    """One keep-alive connection, reopened when the server closes it (after a 413, say)."""

    def __init__(self, port: int) -> None:
        self.port, self.conn = port, None

    def post(self, path: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.conn.request("POST", path, body, headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return resp.status, data
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def check(client: Client, path: str, body: bytes, headers: dict | None = None) -> None:
    status, data = client.post(path, body, headers)
    assert status in ALLOWED, (status, data[:300], body[:300])
    if status >= 400:
        error = json.loads(data)["error"]
        message = error["message"] if isinstance(error, dict) else error
        assert "Error:" not in message and "Traceback" not in message, message
    status, data = client.post("/v2/models/affine/infer", json.dumps(GOOD).encode())
    assert status == 200 and json.loads(data)["outputs"][0]["data"] == [4.0, 7.0, 10.0, 13.0]


def dumps(value: object) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")


@st.composite
def kserve_bodies(draw: st.DrawFn) -> dict:
    """A good request with some of its fields replaced by anything JSON can hold."""
    spec = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}
    for key in draw(st.sets(st.sampled_from(["name", "shape", "datatype", "data", "parameters"]))):
        spec[key] = draw(values | st.lists(st.integers(-3, 10), max_size=5))
    body: dict = {"inputs": draw(st.sampled_from([[spec], [spec, spec], spec, []]))}
    for key in draw(st.sets(st.sampled_from(["id", "parameters", "outputs"]))):
        body[key] = draw(values)
    return body


@st.composite
def mutated(draw: st.DrawFn, good: bytes) -> bytes:
    """Good JSON bytes with a few bytes flipped, dropped or inserted."""
    data = bytearray(good)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(["flip", "drop", "insert"]))
        if op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "drop" and data:
            del data[i]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@SETTINGS
@given(body=kserve_bodies(), header=st.none() | st.text(max_size=6))
def test_random_kserve_bodies_are_never_500(fuzzed, body: dict, header: str | None) -> None:
    client = Client(fuzzed.port)
    raw = dumps(body)
    headers = {}
    if header is not None and header.isprintable() and header.isascii():
        headers["Inference-Header-Content-Length"] = header
    check(client, "/v2/models/affine/infer", raw, headers)


@SETTINGS
@given(raw=mutated(dumps(GOOD)))
def test_mutated_kserve_bytes_are_never_500(fuzzed, raw: bytes) -> None:
    check(Client(fuzzed.port), "/v2/models/affine/infer", raw)


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict:
    part = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30) | values}),
        st.fixed_dictionaries(
            {
                "type": st.just("image_url"),
                "image_url": st.fixed_dictionaries(
                    {
                        "url": st.sampled_from(
                            ["data:image/png;base64,", "data:image/png;base64,iVBORw0KGgo=", "http://x/y.png"]
                        )
                        | st.text(max_size=20)
                    }
                )
                | values,
            }
        ),
        values,
    )
    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "tool"]) | values,
            "content": st.text(max_size=30) | st.lists(part, max_size=3) | values,
        }
    )
    body: dict = {
        "model": draw(st.sampled_from(["affine", "nope", ""]) | values),
        "messages": draw(st.lists(message, max_size=3) | values),
    }
    options = ["temperature", "top_p", "seed", "max_tokens", "stream", "n", "stream_options", "tools"]
    for key in draw(st.sets(st.sampled_from(options))):
        body[key] = draw(values)
    return body


@SETTINGS
@given(body=chat_bodies())
def test_random_chat_bodies_are_never_500(fuzzed, body: dict) -> None:
    check(Client(fuzzed.port), "/v1/chat/completions", dumps(body), {"Content-Type": "application/json"})


@SETTINGS
@given(
    raw=mutated(
        dumps({"model": "affine", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5})
    )
)
def test_mutated_chat_bytes_are_never_500(fuzzed, raw: bytes) -> None:
    check(Client(fuzzed.port), "/v1/chat/completions", raw)


header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@SETTINGS
@given(
    host=st.none() | header_text,
    origin=st.none() | header_text | st.sampled_from(["null", "http://[::1", "http://127.0.0.1"]),
    site=st.none() | st.sampled_from(["cross-site", "same-site", "same-origin", "none"]) | header_text,
    auth=st.none() | header_text,
)
def test_random_security_headers_are_never_500(fuzzed, host, origin, site, auth) -> None:
    headers = {"Host": host, "Origin": origin, "Sec-Fetch-Site": site, "Authorization": auth}
    headers = {k: v.strip() for k, v in headers.items() if v is not None and v.strip()}
    status, data = Client(fuzzed.port).post("/v2/models/affine/infer", json.dumps(GOOD).encode(), headers)
    assert status in {200, 400, 403}, (status, data[:200], headers)


# --- large JSON tensors: the numpy fast path must read exactly what the JSON parser reads -------

N_VALUES = 20_000  # 80 KB of text or more: over the size where data arrays are cut out for numpy


def big_body(text: bytes, shape: list[int], datatype: str = "FP32") -> bytes:
    head = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": "@"}]})
    return head.encode().replace(b'"@"', b"[" + text + b"]")


def reference(body: bytes, datatype: str) -> np.ndarray | None:
    """What the plain JSON path makes of ``body`` (None: it refuses it)."""
    try:
        data = json.loads(body)["inputs"][0]["data"]
        with np.errstate(over="ignore"):
            return np.asarray(data, dtype=NP_TYPES[datatype])
    except (ValueError, TypeError, OverflowError):
        return None


def random_values(seed: int, kind: str) -> list:
    """N_VALUES numbers as a client would send them (float32 values, doubles, big ints, tiny)."""
    rng = np.random.default_rng(seed)
    if kind == "ints":
        return rng.integers(-(2**53), 2**53, N_VALUES).tolist()
    if kind == "bytes":
        return rng.integers(0, 256, N_VALUES).tolist()
    scale = {"float32": 1.0, "doubles": 1e6, "tiny": 1e-30, "huge": 1e30}[kind]
    values = rng.standard_normal(N_VALUES) * scale
    return (values.astype(np.float32) if kind == "float32" else values).tolist()


@settings(SETTINGS, max_examples=60)
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["float32", "doubles", "tiny", "huge", "ints", "bytes"]),
    edits=st.lists(
        st.tuples(
            st.integers(0, 10**9),
            st.sampled_from(
                [b" ", b",", b"", b"-", b".", b"e", b"x", b"1 ", b"+", b"999", b"9" * 20, b",-0,", b"-0.0"]
            ),
        ),
        max_size=3,
    ),
    datatype=st.sampled_from(["FP32", "FP64", "FP16", "INT64", "INT32", "UINT8", "BOOL"]),
)
def test_large_json_tensors_read_exactly_as_the_json_parser_reads_them(seed, kind, edits, datatype) -> None:
    text = bytearray(json.dumps(random_values(seed, kind))[1:-1].encode())
    assert cut_numeric_arrays(big_body(bytes(text), [1]))[1]  # the numpy path is the one tested
    for at, insert in edits:  # replace one byte (or drop it)
        i = at % len(text)
        text[i : i + 1] = insert
    expected = reference(big_body(bytes(text), [1]), datatype)
    shape = [1, int(expected.size)] if expected is not None and expected.ndim == 1 else [1, N_VALUES]
    body = big_body(bytes(text), shape, datatype)
    try:
        got = parse_request(body, None, "m").inputs["x"]
    except BadInput:
        assert expected is None or expected.ndim != 1 or expected.size != math.prod(shape)
        return
    if expected is None:  # only numpy's leniency ("+1", "1.", "01") may get through
        assert not set(bytes(text)) - set(b"0123456789+-.eE, "), text
        return
    assert got.dtype == expected.dtype and np.array_equal(
        got.reshape(-1).view(np.uint8), expected.reshape(-1).view(np.uint8)
    )
