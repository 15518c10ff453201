"""kiln serve through Triton's own client: JSON and binary tensors give the model's numbers; health,
metadata, versions, repository load/unload while requests flow; every bad request gets the right
status and a message, and the next request is served."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from modelkiln.serve.protocol import parse_request

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException

_local = threading.local()


def client(running) -> httpclient.InferenceServerClient:
    """One client per thread: tritonclient.http runs on gevent, whose hub is per thread."""
    if getattr(_local, "url", None) != running.url:
        _local.url, _local.client = running.url, httpclient.InferenceServerClient(running.url)
    return _local.client


def infer(c, model: str, x: np.ndarray, binary: bool, version: str = "") -> np.ndarray:
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("y", binary_data=binary)
    return c.infer(model, [inp], outputs=[out], model_version=version).as_numpy("y")


def post(running, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://{running.url}{path}", data=body, headers=headers or {}, method="POST"
    )
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_health_metadata_and_ready(running) -> None:
    c = client(running)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("affine") and c.is_model_ready("affine", "1") and not c.is_model_ready("nope")
    meta = c.get_model_metadata("affine")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["versions"] == ["2"]
    assert c.get_server_metadata()["name"] == "modelkiln"


@pytest.mark.parametrize("binary", [False, True])
def test_json_and_binary_give_the_model_numbers(running, binary: bool) -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    c = client(running)
    np.testing.assert_allclose(infer(c, "affine", x, binary), x * 3 + 1, rtol=1e-6)  # newest version
    np.testing.assert_allclose(infer(c, "affine", x, binary, version="1"), x * 2 + 1, rtol=1e-6)


def test_concurrent_requests_are_batched_and_each_answered(running) -> None:
    xs = [np.full((1, 4), i, np.float32) for i in range(32)]
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda x: infer(client(running), "affine", x, True), xs))
    for x, y in zip(xs, outs, strict=True):
        np.testing.assert_allclose(y, x * 3 + 1)
    metrics = urllib.request.urlopen(f"http://{running.url}/metrics").read().decode()
    assert 'kiln_request_success_total{model="affine",version="2"}' in metrics
    batched = [
        line
        for line in metrics.splitlines()
        if line.startswith('kiln_batch_size_bucket{le="1.0",model="affine"')
    ]
    count = [line for line in metrics.splitlines() if line.startswith('kiln_batch_size_count{model="affine"')]
    assert float(batched[0].split()[-1]) < float(count[0].split()[-1])  # some requests ran in batches > 1


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (
            b'{"inputs": [{"name": "z", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}',
            400,
            "expected inputs ['x']",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]}',
            400,
            "expects FP32, got INT64",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}',
            400,
            "expects shape [-1, 4], got [1, 5]",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1, 2]}]}',
            400,
            "2 values for shape [2, 4]",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [9, 4], "datatype": "FP32", "data": '
            + str([0] * 36).encode()
            + b"}]}",
            400,
            "outside 1..8",
        ),
    ],
)
def test_bad_requests_get_400_and_the_server_goes_on(running, body: bytes, status: int, message: str) -> None:
    code, reply = post(running, "/v2/models/affine/infer", body)
    assert code == status and message in reply["error"]
    assert "affine" in reply["error"]
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(infer(client(running), "affine", x, False), x * 3 + 1)


def test_unknown_model_is_404(running) -> None:
    with pytest.raises(InferenceServerException) as err:
        infer(client(running), "nope", np.ones((1, 4), np.float32), False)
    assert err.value.status() == "404" and "unknown model 'nope'" in err.value.message()


def test_oversized_payload_is_413(running) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
    conn.putrequest("POST", "/v2/models/affine/infer")
    conn.putheader("Content-Length", str(2 << 20))  # over the 1 MiB limit: refused before reading
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "limit" in json.loads(resp.read())["error"]
    conn.close()
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(infer(client(running), "affine", x, True), x * 3 + 1)  # still serving


def test_timed_out_request_is_504(running) -> None:
    c = client(running)
    x = np.ones((4, 4), np.float32)
    with ThreadPoolExecutor(4) as pool:  # keep the slow model busy so the last request must wait
        busy = [pool.submit(lambda: infer(client(running), "slow", x, True)) for _ in range(3)]
        inp = httpclient.InferInput("x", [4, 4], "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as err:
            c.infer("slow", [inp], timeout=1)  # 1 µs
        for f in busy:
            f.result()
    assert err.value.status() == "504" and "timed out" in err.value.message()
    np.testing.assert_allclose(infer(c, "slow", x, True), x * 2 + 1)


def test_unload_and_load_while_requests_flow(running) -> None:
    c = client(running)
    x = np.ones((1, 4), np.float32)
    stop = threading.Event()
    statuses: list[str] = []

    def traffic() -> None:
        while not stop.is_set():
            try:
                infer(client(running), "affine", x, True)
                statuses.append("200")
            except InferenceServerException as exc:
                statuses.append(exc.status())

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    c.unload_model("affine")
    assert not c.is_model_ready("affine")
    index = {m["name"]: m["state"] for m in c.get_model_repository_index()}
    assert index["affine"] == "UNAVAILABLE"
    c.load_model("affine")
    deadline = time.monotonic() + 10  # the reloaded model serves the traffic still flowing
    while "200" not in statuses and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert c.is_model_ready("affine")
    assert "200" in statuses and set(statuses) <= {"200", "503"}  # answered: served or unavailable
    np.testing.assert_allclose(infer(c, "affine", x, True), x * 3 + 1)


def test_binary_request_parsing_rejects_unclaimed_bytes() -> None:
    head = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}'
    body = head + np.float32(1).tobytes() + b"xx"
    with pytest.raises(Exception, match="not claimed"):
        parse_request(body, len(head), "m")
