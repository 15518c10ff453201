"""``kiln serve --ray``: the repository as a Ray Serve application on a local single-node Ray
started here on loopback. The same requests through Ray and through ``kiln serve`` (our in-process
server, conftest.Running) give the same numbers, the same statuses and the same error messages;
stopping removes the application and Ray cleanly.

Marked ``ray`` (not in the default run: Ray takes ~10 s to start): ``pytest -m ray``. Without
ray installed they skip; the checks of the command line that need no Ray run by default."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import Running, free_port, kiln
from modelkiln.errors import BadInput
from modelkiln.serve import ray as kiln_ray
from modelkiln.serve.guard import ServeLimits
from modelkiln.serve.ray import HIGH_THROUGHPUT_ENV, RayDeployment, RayOptions, connect, require_haproxy

INT64_BODY = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]}'
LIMITS = ServeLimits(max_body_bytes=1 << 20)  # as conftest.Running's default


# --- no Ray needed ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", {"num_replicas": 1}),
        ("3", {"num_replicas": 3}),
        ("auto", {"num_replicas": "auto"}),
        ("0-4", {"autoscaling_config": {"min_replicas": 0, "max_replicas": 4}}),
    ],
)
def test_replicas_become_ray_deployment_options(text: str, expected: dict) -> None:
    opts = RayOptions(text, cores=2).deployment_options()
    assert {k: v for k, v in opts.items() if k in expected} == expected
    assert opts["ray_actor_options"] == {"num_cpus": 2} and opts["max_ongoing_requests"] == 256


def test_ray_request_log_is_off_unless_asked() -> None:
    """Ray Serve's access log is a formatted, flushed line per request in the proxy and the
    replica; kiln serve writes none, so neither does the Ray path unless asked."""
    assert RayOptions().deployment_options()["logging_config"] == {
        "log_level": "WARNING",
        "enable_access_log": False,
    }
    assert RayOptions(access_log=True).logging_config() == {"log_level": "INFO", "enable_access_log": True}


def test_unknown_ingress_is_refused() -> None:
    with pytest.raises(BadInput, match=r"Ray ingress must be one of \['proxy', 'haproxy'\], got 'nginx'"):
        RayOptions(ingress="nginx").deployment_options()


def test_haproxy_ingress_needs_ray_2_55_and_a_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BadInput, match=r"needs Ray >= 2.55, this is Ray 2.54.1"):
        require_haproxy("2.54.1")
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    monkeypatch.setattr(kiln_ray.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(kiln_ray.shutil, "which", lambda name: None)
    with pytest.raises(BadInput, match="needs an HAProxy binary"):
        require_haproxy("2.60.0")
    monkeypatch.setattr(kiln_ray.shutil, "which", lambda name: "/usr/sbin/haproxy")
    require_haproxy("2.60.0")


class FakeRay:
    """ray.init as connect() sees it: ``address='auto'`` fails when no cluster runs here."""

    __version__ = "2.60.0"

    def __init__(self, cluster: bool) -> None:
        self.cluster, self.calls = cluster, []

    def init(self, **kwargs) -> None:
        self.calls.append(kwargs.get("address"))
        if kwargs.get("address") == "auto" and not self.cluster:
            raise ConnectionError("Could not find any running Ray instance.")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in [*HIGH_THROUGHPUT_ENV, "RAY_ADDRESS"]:
        monkeypatch.setenv(key, "x")  # registered for restoring, then removed
        monkeypatch.delenv(key)
    monkeypatch.setattr(kiln_ray, "require_haproxy", lambda version: None)
    return monkeypatch


def test_haproxy_ingress_is_set_up_for_a_local_ray_only(clean_env: pytest.MonkeyPatch) -> None:
    import os

    fake = FakeRay(cluster=False)
    assert connect(fake, RayOptions(ingress="haproxy")) is True  # no cluster: a local Ray starts
    assert fake.calls == ["auto", None]
    assert {k: os.environ.get(k) for k in HIGH_THROUGHPUT_ENV} == HIGH_THROUGHPUT_ENV
    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # a value already set is the user's
    connect(FakeRay(cluster=False), RayOptions(ingress="haproxy"))
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


@pytest.mark.parametrize("address", [None, "ray://head:10001"])
def test_a_running_cluster_keeps_its_own_ingress(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, address: str | None
) -> None:
    import os

    if address:
        clean_env.setenv("RAY_ADDRESS", address)
    fake = FakeRay(cluster=True)
    assert connect(fake, RayOptions(ingress="haproxy")) is False
    assert fake.calls == ([None] if address else ["auto"])
    assert not any(k in os.environ for k in HIGH_THROUGHPUT_ENV)  # the driver must not disagree with it
    assert "its own environment" in caplog.text and "RAY_SERVE_ENABLE_HA_PROXY=1" in caplog.text
    fake = FakeRay(cluster=False)
    assert connect(fake, RayOptions()) is (address is None)  # proxy ingress: nothing set either way
    assert not any(k in os.environ for k in HIGH_THROUGHPUT_ENV)


@pytest.mark.parametrize("text", ["0", "-1", "4-2", "0-0", "two", "1.5"])
def test_malformed_replicas_are_refused(text: str) -> None:
    with pytest.raises(BadInput, match="--replicas must be N >= 1, 'auto' or MIN-MAX"):
        RayOptions(text).deployment_options()


def test_serve_ray_without_ray_is_one_line_naming_the_extra(repo: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None; "  # as if ray were not installed
        f"sys.argv = ['kiln', 'serve', {str(repo)!r}, '--ray', '--replicas', '2']; "
        "from modelkiln.cli.main import main; main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "kiln serve --ray needs 'ray'" in lines[0] and "pip install 'modelkiln[ray]'" in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "2"], "--replicas and --ray-ingress go with --ray"),
        (["--ray-ingress", "haproxy"], "--replicas and --ray-ingress go with --ray"),
        (
            ["--ray", "--ray-ingress", "nginx"],
            "the Ray ingress must be one of ['proxy', 'haproxy'], got 'nginx'",
        ),
        (["--ray", "--replicas", "x"], "--replicas must be N >= 1"),
        (["--ray", "--grpc-port", "8001"], "--grpc-port is not served through Ray"),
    ],
)
def test_ray_flags_are_checked_before_anything_starts(repo: Path, args: list[str], message: str) -> None:
    done = kiln("serve", str(repo), *args)
    assert done.returncode == 1 and message in done.stderr, done.stderr


# --- on a local Ray --------------------------------------------------------------------------------
@dataclass
class OnRay:
    url: str  # host:port of Ray's HTTP proxy
    port: int
    deployment: RayDeployment


@pytest.fixture(scope="module")
def on_ray(repo: Path) -> Iterator[OnRay]:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    from ray import serve

    from modelkiln.serve.ray import deploy

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        namespace="modelkiln-test",
        _node_ip_address="127.0.0.1",
    )
    port = free_port()
    try:
        running = deploy(str(repo), "127.0.0.1", port, RayOptions("1", cores=1), LIMITS)
        yield OnRay(f"127.0.0.1:{port}", port, running)
    finally:
        if ray.is_initialized():  # the last test shuts it down itself, and checks it did
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def local(repo: Path) -> Iterator[Running]:
    r = Running(repo)
    yield r
    r.stop()


def call(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers we compare, body bytes) of one request."""
    req = urllib.request.Request(f"http://{url}{path}", data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers.get("content-type"), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type"), err.read()


def json_infer(x: np.ndarray) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()


@pytest.mark.ray
def test_same_request_same_numbers_through_ray(on_ray: OnRay, local: Running) -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    for path in ("/v2/models/affine/infer", "/v2/models/affine/versions/1/infer", "/v2/models/slow/infer"):
        via_ray = call(on_ray.url, "POST", path, json_infer(x))
        direct = call(local.url, "POST", path, json_infer(x))
        assert via_ray[0] == direct[0] == 200
        assert json.loads(via_ray[2]) == json.loads(direct[2])  # same values, names, shapes, version
    y = json.loads(via_ray[2])["outputs"][0]["data"]
    np.testing.assert_array_equal(np.asarray(y, np.float32).reshape(3, 4), x * np.float32(2) + np.float32(1))


@pytest.mark.ray
def test_binary_tensors_through_ray_with_tritonclient(on_ray: OnRay, local: Running) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)

    def infer(url: str) -> np.ndarray:
        c = httpclient.InferenceServerClient(url)
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = httpclient.InferRequestedOutput("y", binary_data=True)
        try:
            return c.infer("affine", [inp], outputs=[out]).as_numpy("y")
        finally:
            c.close()

    via_ray, direct = infer(on_ray.url), infer(local.url)
    assert via_ray.dtype == np.float32 and np.array_equal(via_ray, direct)  # bit for bit
    np.testing.assert_array_equal(via_ray, x * np.float32(3) + np.float32(1))


@pytest.mark.ray
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v2/health/live", None),
        ("GET", "/v2/health/ready", None),
        ("GET", "/v2", None),
        ("GET", "/v2/models/affine", None),
        ("GET", "/v2/models/affine/versions/1", None),
        ("GET", "/v2/models/affine/config", None),
        ("GET", "/v2/models/affine/ready", None),
        ("GET", "/v2/models/nope/ready", None),
        ("GET", "/v2/models/nope", None),
        ("POST", "/v2/models/nope/infer", json_infer(np.ones((1, 4), np.float32))),
        ("POST", "/v2/models/affine/versions/7/infer", json_infer(np.ones((1, 4), np.float32))),
        ("POST", "/v2/models/affine/infer", b"{not json"),
        ("POST", "/v2/models/affine/infer", json_infer(np.ones((1, 5), np.float32))),
        ("POST", "/v2/models/affine/infer", json_infer(np.ones((9, 4), np.float32))),
        ("POST", "/v2/models/affine/infer", json_infer(np.ones((1, 4), np.int64))),  # data ints, FP32 said
        (
            "POST",
            "/v2/models/affine/infer",
            b'{"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1, 2]}]}',
        ),
        ("POST", "/v2/models/affine/infer", INT64_BODY),
    ],
)
def test_same_statuses_and_messages_through_ray(
    on_ray: OnRay, local: Running, method: str, path: str, body: bytes | None
) -> None:
    via_ray, direct = call(on_ray.url, method, path, body), call(local.url, method, path, body)
    assert via_ray == direct, (via_ray, direct)


@pytest.mark.ray
def test_oversized_body_is_413_through_ray(on_ray: OnRay) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", on_ray.port, timeout=30)
    conn.putrequest("POST", "/v2/models/affine/infer")
    conn.putheader("Content-Length", str(2 << 20))  # over the 1 MiB limit: refused before reading
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "limit" in json.loads(resp.read())["error"]
    conn.close()


@pytest.mark.ray
def test_model_control_is_refused_on_ray(on_ray: OnRay, local: Running) -> None:
    """A load or unload would reach one replica of many: redeploy instead."""
    status, _, body = call(on_ray.url, "POST", "/v2/repository/models/affine/unload", b"")
    assert status == 403 and "model control" in json.loads(body)["error"]
    assert call(on_ray.url, "GET", "/v2/models/affine/ready")[0] == 200


@pytest.mark.ray
def test_stop_removes_the_application_then_ray_shuts_down(on_ray: OnRay) -> None:
    """Last in this file: stop the application (the replica drains and unloads), then Serve and
    Ray; the proxy's port is closed afterwards."""
    import ray
    from ray import serve

    x = np.ones((1, 4), np.float32)
    status, _, body = call(on_ray.url, "POST", "/v2/models/affine/infer", json_infer(x))
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == [4.0] * 4
    on_ray.deployment.stop()
    assert "modelkiln" not in serve.status().applications
    assert call(on_ray.url, "GET", "/v2/health/live")[0] == 404  # Ray's proxy: no application at /
    serve.shutdown()
    ray.shutdown()
    assert not ray.is_initialized()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", on_ray.port), timeout=2):
        pass


HAPROXY_SCRIPT = """
import json, sys, urllib.error, urllib.request
from pathlib import Path
from modelkiln.serve.guard import ServeLimits
from modelkiln.serve.ray import RayOptions, connect, deploy, require_ray

repo, port = sys.argv[1], int(sys.argv[2])
requests = json.loads(sys.argv[3])
ray = require_ray()
options = RayOptions("1", cores=1, ingress="haproxy")
assert connect(ray, options), "a local Ray should have started"
running = deploy(repo, "127.0.0.1", port, options, ServeLimits(max_body_bytes=1 << 20))
try:
    answers = []
    for method, path, body in requests:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=None if body is None else body.encode("latin-1"))
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                answers.append([resp.status, resp.headers.get("content-type"), resp.read().decode("latin-1")])
        except urllib.error.HTTPError as err:
            answers.append([err.code, err.headers.get("content-type"), err.read().decode("latin-1")])
    haproxy = [p for p in Path("/proc").iterdir() if p.name.isdigit() and (p / "comm").exists()
               and (p / "comm").read_text().strip() == "haproxy"]
    print(json.dumps({"answers": answers, "haproxy": bool(haproxy)}))
finally:
    running.stop()
    ray.shutdown()
"""


@pytest.mark.ray
def test_haproxy_ingress_gives_the_same_answers(repo: Path, local: Running) -> None:
    """Ray's high-throughput mode (HAProxy in front of replicas serving HTTP themselves), set up
    by connect() for a local Ray in a child process (Ray reads it from its processes'
    environment): the same numbers, statuses and messages as kiln serve."""
    pytest.importorskip("ray")
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    requests = [
        ("POST", "/v2/models/affine/infer", json_infer(x)),
        ("POST", "/v2/models/affine/versions/1/infer", json_infer(x)),
        ("GET", "/v2/models/affine", None),
        ("POST", "/v2/models/nope/infer", json_infer(x)),
        ("POST", "/v2/models/affine/infer", b"{not json"),
        ("POST", "/v2/models/affine/infer", json_infer(np.ones((9, 4), np.float32))),
        ("POST", "/v2/repository/models/affine/unload", b""),
    ]
    wire = [(m, p, None if b is None else b.decode("latin-1")) for m, p, b in requests]
    done = subprocess.run(
        [sys.executable, "-c", HAPROXY_SCRIPT, str(repo), str(free_port()), json.dumps(wire)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["haproxy"], "no HAProxy process: the high-throughput ingress was not used"
    for (method, path, body), (status, ctype, text) in zip(requests, got["answers"], strict=True):
        if path.endswith("/unload"):  # model control: refused through Ray, as in the proxy mode
            assert status == 403 and "model control" in json.loads(text)["error"]
            continue
        want = call(local.url, method, path, body)
        assert (status, ctype, text.encode("latin-1")) == want, (path, status, text[:200])
