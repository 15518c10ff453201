"""Access control of kiln serve: API key on every route but health (tritonclient and the openai
client both send it), model control restricted on its own, foreign Host headers and cross-origin
browser requests refused with 403, keys never logged, and the CLI reads the key from a file or
KILN_API_KEY."""

from __future__ import annotations

import http.client
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from starlette.datastructures import Headers

from conftest import Running, free_port
from modelkiln.errors import ConfigError
from modelkiln.serve.security import Security, host_allowed, key_matches, origin_allowed, read_key

KEY = "k3y-for-tests-0123456789"
ADMIN = "adm1n-for-tests-0123456789"
GOOD = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@pytest.fixture(scope="module")
def locked(repo: Path) -> Iterator[Running]:
    r = Running(repo, security=Security(api_key=KEY, admin_key=ADMIN))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def browsed(repo: Path) -> Iterator[Running]:
    """No key; one browser origin allowed."""
    r = Running(repo, security=Security(allowed_origins=("https://app.example.com",)))
    yield r
    r.stop()


def send(running: Running, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
    try:
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_but_health_needs_the_key(locked, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    assert send(locked, "GET", "/v2/health/live")[0] == 200
    assert send(locked, "GET", "/v2/health/ready")[0] == 200
    body = json.dumps(GOOD).encode()
    for method, path, data in [
        ("GET", "/v2", None),
        ("GET", "/v2/models/affine", None),
        ("POST", "/v2/models/affine/infer", body),
        ("GET", "/metrics", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", b"{}"),
    ]:
        for headers in ({}, bearer("wrong-key-123456"), {"Authorization": KEY}, bearer(KEY + "x")):
            status, got, raw = send(locked, method, path, headers, data)
            assert status == 401 and got["www-authenticate"] == "Bearer", (path, headers, status)
            assert "API key" in raw.decode()
        assert send(locked, method, path, bearer(KEY), data)[0] != 401
    status, _, raw = send(locked, "POST", "/v2/models/affine/infer", bearer(KEY), body)
    assert status == 200 and json.loads(raw)["outputs"][0]["data"] == [4.0, 7.0, 10.0, 13.0]
    assert not any(KEY in r.getMessage() or ADMIN in r.getMessage() for r in caplog.records)


def test_model_control_needs_the_admin_key(locked) -> None:
    for path in ("/v2/repository/index", "/v2/repository/models/affine/unload"):
        for headers in ({}, bearer(KEY)):
            assert send(locked, "POST", path, headers, b"{}")[0] == 401
    assert send(locked, "POST", "/v2/repository/index", bearer(ADMIN), b"{}")[0] == 200
    assert send(locked, "POST", "/v2/repository/models/affine/load", bearer(ADMIN), b"{}")[0] == 200


def test_model_control_can_be_switched_off(repo: Path) -> None:
    r = Running(repo, security=Security(model_control=False))
    try:
        status, _, raw = send(r, "POST", "/v2/repository/models/affine/unload", {}, b"{}")
        assert status == 403 and "disabled" in json.loads(raw)["error"]
        assert send(r, "POST", "/v2/models/affine/infer", {}, json.dumps(GOOD).encode())[0] == 200
    finally:
        r.stop()


class BearerAuth:
    """A tritonclient plugin adding the key to every request (as its BasicAuth plugin does)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, request) -> None:
        request.headers["authorization"] = f"Bearer {self.key}"


def test_tritonclient_works_with_the_key_and_is_refused_without(locked) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    x = np.ones((2, 4), np.float32)
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    anonymous = httpclient.InferenceServerClient(locked.url)
    assert anonymous.is_server_live()  # health stays open for probes
    with pytest.raises(InferenceServerException) as err:
        anonymous.infer("affine", [inp])
    assert err.value.status() == "401"
    with pytest.raises(InferenceServerException):
        anonymous.unload_model("affine")
    client = httpclient.InferenceServerClient(locked.url)
    client.register_plugin(BearerAuth(KEY))
    np.testing.assert_allclose(client.infer("affine", [inp]).as_numpy("y"), x * 3 + 1)
    assert client.get_model_metadata("affine")["name"] == "affine"
    admin = httpclient.InferenceServerClient(locked.url)
    admin.register_plugin(BearerAuth(ADMIN))
    assert {m["name"] for m in admin.get_model_repository_index()} >= {"affine"}


def test_openai_client_works_with_the_key_and_is_refused_without(locked) -> None:
    openai = pytest.importorskip("openai")
    url = f"http://{locked.url}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong-key-123456", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    assert client.models.list().data == []  # no generative model here; the key got through
    with pytest.raises(openai.BadRequestError, match="not a generative model"):
        client.chat.completions.create(model="affine", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Host": "evil.example.com"}, 403),
        ({"Host": "evil.example.com:8000"}, 403),
        ({"Host": "10.1.2.3"}, 403),  # another address: not the loopback this server is bound to
        ({"Host": "localhost"}, 200),
        ({"Host": "[::1]:1234"}, 200),
        ({"Origin": "http://evil.example.com", "Content-Type": "text/plain"}, 403),
        ({"Origin": "null"}, 403),
        ({"Origin": "http://[::1"}, 403),
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),
        ({"Sec-Fetch-Site": "none"}, 200),
        ({"Origin": "https://app.example.com", "Sec-Fetch-Site": "cross-site"}, 200),  # allowed
    ],
)
def test_foreign_hosts_and_cross_origin_browser_requests_get_403(browsed, headers, status) -> None:
    code, _, raw = send(browsed, "POST", "/v2/models/affine/infer", headers, json.dumps(GOOD).encode())
    assert code == status, raw
    if status == 403:
        assert "refused" in json.loads(raw)["error"] or "Host" in json.loads(raw)["error"]


def test_an_allowed_origin_gets_cors_and_its_preflight_needs_no_key(repo: Path) -> None:
    r = Running(repo, security=Security(api_key=KEY, allowed_origins=("https://app.example.com",)))
    try:
        origin = {"Origin": "https://app.example.com", "Sec-Fetch-Site": "cross-site"}
        preflight = {
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        status, headers, _ = send(r, "OPTIONS", "/v2/models/affine/infer", preflight)
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example.com"
        assert send(r, "POST", "/v2/models/affine/infer", origin, json.dumps(GOOD).encode())[0] == 401
        status, headers, _ = send(
            r, "POST", "/v2/models/affine/infer", {**origin, **bearer(KEY)}, json.dumps(GOOD).encode()
        )
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example.com"
        evil = {**preflight, "Origin": "https://evil.example.com"}
        assert send(r, "OPTIONS", "/v2/models/affine/infer", evil)[0] == 403
    finally:
        r.stop()


def test_host_and_origin_rules() -> None:
    sec = Security(allowed_hosts=("models.example.com",))
    assert host_allowed("127.0.0.1:8000", "127.0.0.1", sec) and host_allowed("LOCALHOST", "127.0.0.1", sec)
    assert host_allowed("models.example.com:443", "127.0.0.1", sec)
    assert not host_allowed("evil.com", "127.0.0.1", sec) and not host_allowed("10.0.0.2", "127.0.0.1", sec)
    assert host_allowed("10.0.0.2:8000", "0.0.0.0", sec) and not host_allowed("evil.com", "0.0.0.0", sec)
    assert host_allowed("myhost:8000", "myhost", Security()) and host_allowed(
        "x", "1.2.3.4", Security(allowed_hosts=("*",))
    )
    assert origin_allowed(Headers({}), sec) and origin_allowed(
        Headers({"origin": "http://a:1", "host": "a:1"}), sec
    )
    assert not origin_allowed(Headers({"origin": "http://b:1", "host": "a:1"}), sec)
    assert key_matches(Headers({"authorization": f"bearer {KEY}"}), KEY)
    assert not key_matches(Headers({"authorization": f"Basic {KEY}"}), KEY)


def test_keys_come_from_a_file_or_the_environment(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "key").write_text(f"{KEY}\n")
    assert read_key(tmp_path / "key") == KEY
    monkeypatch.setenv("KILN_API_KEY", "from-the-env-123")
    assert read_key(None) == "from-the-env-123"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_key(tmp_path / "empty")
    with pytest.raises(ConfigError, match="at least 8"):
        Security(api_key="short")


def test_kiln_serve_takes_the_key_from_a_file_and_never_prints_it(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelkiln",
            "serve",
            str(repo),
            "--port",
            str(port),
            "--api-key-file",
            str(tmp_path / "key"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/v2/health/ready")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
        body = json.dumps(GOOD).encode()
        for headers, status in (({}, 401), (bearer(KEY), 200)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/v2/models/affine/infer", body, headers)
            assert conn.getresponse().status == status
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert KEY not in out + err


def test_kiln_serve_speaks_tls_with_a_certificate(repo: Path, tmp_path: Path) -> None:
    """--ssl-certfile/--ssl-keyfile reach uvicorn: the server answers HTTPS (self-signed here)."""
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelkiln", "serve", str(repo), "--port", str(port)]
        + ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    try:
        deadline = time.time() + 60
        while True:
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
                try:
                    conn.request("GET", "/v2/health/live")
                    assert conn.getresponse().status == 200
                    break
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException):
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            with pytest.raises((OSError, http.client.HTTPException)):
                plain.request("GET", "/v2/health/live")
                plain.getresponse()
        finally:
            plain.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
