"""kiln serve refuses an INT8 model this CPU cannot run as built (a VNNI-format model without VNNI),
saying why and how to override, serves it when its config or the server says so, and goes on
serving the other models. cpu_info is replaced by an AVX2-only CPU: the real CPU never matters."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import Running, add_model, affine_model, kiln
from modelkiln.errors import CpuMismatch
from modelkiln.runtime import cpu
from modelkiln.runtime.cpu import INT8_FORMAT_KEY, INT8_REQUIRES_KEY, INT32_DOT, CpuInfo
from modelkiln.serve.config import ModelConfig
from modelkiln.serve.model import LoadPolicy, ServedModel
from modelkiln.serve.server import ModelServer

AVX2_ONLY = CpuInfo("x86_64", "AMD EPYC 7B12", frozenset({"avx", "avx2", "fma"}))


def vnni_model(path: Path) -> Path:
    """The affine test model tagged as kiln quantize tags a VNNI-format INT8 model."""
    model = onnx.load(affine_model(path))
    onnx.helper.set_model_props(model, {INT8_FORMAT_KEY: "vnni", INT8_REQUIRES_KEY: INT32_DOT})
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def avx2_only() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "cpu_info", lambda: AVX2_ONLY)
        yield


@pytest.fixture(scope="module")
def mismatch_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, tmp = tmp_path_factory.mktemp("repo"), tmp_path_factory.mktemp("models")
    add_model(root, "affine", affine_model(tmp / "a.onnx"), ModelConfig("affine", max_batch_size=8))
    add_model(root, "vnni", vnni_model(tmp / "v.onnx"), ModelConfig("vnni", max_batch_size=8))
    add_model(
        root,
        "vnni_allowed",
        vnni_model(tmp / "w.onnx"),
        ModelConfig("vnni_allowed", max_batch_size=8, allow_cpu_mismatch=True),
    )
    return root


@pytest.fixture(scope="module")
def server(avx2_only: None, mismatch_repo: Path) -> Iterator[Running]:
    r = Running(mismatch_repo)
    yield r
    r.stop()


def request(running: Running, path: str, body: dict | None = None) -> tuple[int, dict | list]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{running.url}{path}", data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def infer(running: Running, model: str) -> tuple[int, dict]:
    x = [1.0, 2.0, 3.0, 4.0]
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x}]}
    return request(running, f"/v2/models/{model}/infer", body)


def assert_says_why_and_how(message: str) -> None:
    assert "'vnni'" in message and "int32 dot product" in message and "AMD EPYC 7B12" in message
    assert "allow_cpu_mismatch: true" in message and "--allow-cpu-mismatch" in message
    assert "kiln quantize --cpu portable" in message


def test_mismatched_model_is_refused_and_the_others_serve(server: Running) -> None:
    _, index = request(server, "/v2/repository/index")
    rows = {row["name"]: row for row in index}
    assert rows["affine"]["state"] == "READY" and rows["vnni_allowed"]["state"] == "READY"
    assert rows["vnni"]["state"] == "UNAVAILABLE"
    assert_says_why_and_how(rows["vnni"]["reason"])
    status, body = infer(server, "vnni")
    assert status == 503 and "not loaded" in body["error"]
    assert_says_why_and_how(body["error"])
    for name in ("affine", "vnni_allowed"):
        status, body = infer(server, name)
        assert status == 200
        np.testing.assert_allclose(body["outputs"][0]["data"], [3.0, 5.0, 7.0, 9.0])


def test_loading_it_through_the_api_is_refused_and_the_server_goes_on(server: Running) -> None:
    status, body = request(server, "/v2/repository/models/vnni/load", {})
    assert status == 400
    assert_says_why_and_how(body["error"])
    assert request(server, "/v2/health/ready")[0] == 200
    assert infer(server, "affine")[0] == 200


def test_the_server_wide_override_serves_it(avx2_only: None, mismatch_repo: Path) -> None:
    model_server = ModelServer(str(mismatch_repo), cores=1, policy=LoadPolicy(allow_cpu_mismatch=True))
    model_server.load_all()
    try:
        x = np.ones((1, 4), np.float32)
        y = model_server.infer("vnni", {"x": x}).result(timeout=30).outputs["y"]
        np.testing.assert_allclose(y, x * 2 + 1)
    finally:
        model_server.shutdown()


def test_served_model_load_raises_the_typed_error(avx2_only: None, tmp_path: Path) -> None:
    path = vnni_model(tmp_path / "v.onnx")
    with pytest.raises(CpuMismatch, match="model 'm' v3"):
        ServedModel.load(ModelConfig("m"), 3, path)
    assert ServedModel.load(ModelConfig("m"), 3, path, LoadPolicy(allow_cpu_mismatch=True)).name == "m"


def test_serve_and_repo_add_have_the_flag(tmp_path: Path) -> None:
    res = kiln("serve", "--help")
    assert res.returncode == 0 and "--allow-cpu-mismatch" in res.stdout
    repo = tmp_path / "repo"
    model = str(affine_model(tmp_path / "a.onnx"))
    res = kiln("repo", "add", str(repo), model, "--name", "aff", "--allow-cpu-mismatch")
    assert res.returncode == 0, res.stderr
    assert "allow_cpu_mismatch: true" in (repo / "aff" / "config.yaml").read_text()
