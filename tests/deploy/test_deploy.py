"""kiln deploy end to end on a small model: every precision, report files holding the summary's
figures, Triton configs that parse into Triton's ModelConfig, a repository that serves."""

from __future__ import annotations

import html
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modelkiln.deploy import DeployError, DeployOptions, DeploySummary, deploy
from modelkiln.deploy import run as deploy_run
from modelkiln.deploy.report import machine_lines, table_rows
from modelkiln.deploy.triton import validate_pbtxt
from modelkiln.errors import BadInput
from modelkiln.quant.config import Int8Cpu
from modelkiln.runtime import cpu
from modelkiln.runtime.cpu import (
    INT8_ACTIVATIONS_KEY,
    INT8_FORMAT_KEY,
    INT8_REQUIRES_KEY,
    INT8_WEIGHTS_KEY,
    CpuInfo,
    cpu_info,
)


def small_model(path: Path) -> Path:
    """x [batch, 16] -> relu(x @ W1 + b1) @ W2 -> y [batch, 8] (real-looking random weights)."""
    rng = np.random.default_rng(0)
    w1 = helper.make_tensor(
        "w1", TensorProto.FLOAT, [16, 32], rng.standard_normal(512).astype(np.float32).tolist()
    )
    b1 = helper.make_tensor(
        "b1", TensorProto.FLOAT, [32], rng.standard_normal(32).astype(np.float32).tolist()
    )
    w2 = helper.make_tensor(
        "w2", TensorProto.FLOAT, [32, 8], rng.standard_normal(256).astype(np.float32).tolist()
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["m"]),
            helper.make_node("Add", ["m", "b1"], ["a"]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [w1, b1, w2],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    tmp = tmp_path_factory.mktemp("deploy")
    calib = tmp / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(16):
        np.save(calib / f"{i:02d}.npy", rng.standard_normal((1, 16)).astype(np.float32))
    out = tmp / "out"
    summary = deploy(DeployOptions(str(small_model(tmp / "small.onnx")), out, calib=calib, bench_seconds=0.2))
    return out, summary


def test_every_precision_is_built_compared_and_benched(deployed) -> None:
    _out, summary = deployed
    assert list(summary.precisions) == ["fp32", "fp16", "int8"]
    for name, p in summary.precisions.items():
        assert p.bench[1].p50_ms > 0 and p.bench[8].throughput > 0
        cos = p.agreement.outputs[0].cosine
        assert cos > (0.999 if name != "int8" else 0.99)
    assert summary.int8["quantized_ops"] == {"Gemm": 1, "MatMul": 1, "Relu": 1}  # MatMul+Add fused to Gemm
    assert list(summary.stages)[:2] == ["export", "optimize"] and summary.failed is None


def test_reports_hold_the_summary_figures(deployed) -> None:
    out, summary = deployed
    saved = json.loads((out / "summary.json").read_text())
    assert saved["precisions"]["int8"]["size_mb"] == pytest.approx(summary.precisions["int8"].size_mb)
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    _, rows = table_rows(summary)
    for row in rows:
        for cell in row:
            assert cell in md and cell in html
    assert "data:image/png;base64," in html and "<img" in html  # self-contained
    assert (out / "plots" / "accuracy_vs_latency.png").is_file()
    assert "kiln deploy" in md


def test_summary_json_reads_back_as_the_same_figures(deployed) -> None:
    out, summary = deployed
    saved = json.loads((out / "summary.json").read_text())
    assert list(saved["precisions"]["int8"]) == ["agreement", "bench", "size_mb"]
    assert list(saved["precisions"]["int8"]["bench"]) == ["batch1", "batch8"]
    assert (
        saved["precisions"]["fp16"]["bench"]["batch8"]["p50_ms"] == summary.precisions["fp16"].bench[8].p50_ms
    )
    again = DeploySummary.from_dict(saved)
    assert again.precisions["int8"].bench[1] == summary.precisions["int8"].bench[1]
    assert again.int8_format == summary.int8_format
    assert json.loads(json.dumps(again.to_dict(), default=str)) == saved


def test_triton_configs_parse_into_triton_model_config(deployed) -> None:
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    out, _ = deployed
    for precision in ("fp32", "fp16", "int8"):
        folder = out / "triton" / f"small_{precision}"
        config = validate_pbtxt((folder / "config.pbtxt").read_text())
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
        assert [i.name for i in config.input] == ["x"] and list(config.input[0].dims) == [16]
        assert list(config.dynamic_batching.preferred_batch_size) == [8]
        assert (folder / "1" / "model.onnx").is_file()


def test_the_repository_serves(deployed) -> None:
    from modelkiln.serve.server import ModelServer

    out, _ = deployed
    server = ModelServer(str(out / "repository"), cores=1)
    server.load_all()
    try:
        x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
        y = server.infer("small_int8", {"x": x}).result(timeout=30).outputs["y"]
        ref = server.infer("small_fp32", {"x": x}).result(timeout=30).outputs["y"]
        assert y.shape == (3, 8) and np.corrcoef(y.ravel(), ref.ravel())[0, 1] > 0.99
    finally:
        server.shutdown()


def test_summary_and_reports_name_the_cpu_and_the_int8_format_of_the_file(deployed) -> None:
    out, summary = deployed
    saved = json.loads((out / "summary.json").read_text())
    info = cpu_info()
    assert saved["cpu"] == {"description": info.describe(), **info.to_dict()}
    props = {p.key: p.value for p in onnx.load(out / "work" / "int8.onnx").metadata_props}
    fmt = saved["int8_format"]
    assert fmt["format"] == props.get(INT8_FORMAT_KEY, "unknown")  # the file's word, not the option's
    assert fmt["requires"] == props.get(INT8_REQUIRES_KEY, "unknown") and fmt["requested"] == "portable"
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    lines = machine_lines(summary)
    assert len(lines) == 2 and info.describe() in lines[0] and f"INT8 format: {fmt['format']}" in lines[1]
    for line in lines:
        assert line in md and html.escape(line) in page


def test_int8_format_is_read_from_the_written_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The INT8 stage asks for the --cpu format and reports what the written file says."""
    seen = {}

    class FakeQuantizer:
        """Stands in for quant's Quantizer: records the config, writes a model tagged as VNNI."""

        def __init__(self, fp32, config, data):
            seen["config"], self.fp32 = config, fp32

        def save(self, out):
            model = onnx.load(self.fp32)
            helper.set_model_props(
                model,
                {
                    INT8_FORMAT_KEY: "vnni",
                    INT8_WEIGHTS_KEY: "s8",
                    INT8_ACTIVATIONS_KEY: "u8",
                    INT8_REQUIRES_KEY: "int32_dot",
                },
            )
            onnx.save(model, out)
            return SimpleNamespace(to_dict=lambda: {"quantized_ops": {}})

    monkeypatch.setattr(deploy_run, "Quantizer", FakeQuantizer)
    monkeypatch.setattr(cpu, "cpu_info", lambda: CpuInfo("x86_64", "AMD EPYC 7B12", frozenset({"avx2"})))
    opts = DeployOptions("m.onnx", tmp_path, cpu="vnni")
    fp32, int8 = small_model(tmp_path / "fp32.onnx"), tmp_path / "int8.onnx"
    deploy_run._int8_candidates(deploy_run.Int8Job.of(opts, fp32, int8, tmp_path, None))
    assert seen["config"].cpu is Int8Cpu.VNNI
    props = deploy_run.metadata_props(int8)
    assert deploy_run.int8_format(props, "vnni").to_dict() == {
        "format": "vnni",
        "weights": "s8",
        "activations": "u8",
        "requires": "int32_dot",
        "requested": "vnni",
    }
    assert deploy_run.int8_format({}).format == "unknown"
    summary = DeploySummary("m", None, None, int8_format=deploy_run.int8_format(props, "vnni"))
    deploy_run._note_cpu_mismatch(summary, props)
    assert summary.cpu["cpu_model"] == "AMD EPYC 7B12" and summary.cpu["int32_dot"] is False
    assert len(summary.notes) == 1 and "kiln quantize --cpu portable" in summary.notes[0]
    lines = machine_lines(summary)
    assert lines[0] == "measured on: AMD EPYC 7B12 (x86_64: avx2)"
    assert lines[1] == "INT8 format: vnni (weights s8, activations u8; needs int32_dot; asked --cpu vnni)"


def test_a_failing_stage_is_named_and_keeps_earlier_work(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DeployError, match="stage 'int8' failed: .*no images or .npy/.npz files"):
        deploy(
            DeployOptions(
                str(small_model(tmp_path / "s.onnx")), tmp_path / "out", calib=empty, bench_seconds=0.1
            )
        )
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["failed"].startswith("int8") and "fp32" in saved["files"]


def test_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="fp32 \\(required\\)"):
        DeployOptions("m.onnx", tmp_path, precisions=("int8",))
    with pytest.raises(BadInput, match="--max-drop needs --eval"):
        DeployOptions("m.onnx", tmp_path, max_drop=0.01)
    with pytest.raises(BadInput, match="--cpu must be one of portable, u8, vnni, native"):
        DeployOptions("m.onnx", tmp_path, cpu="avx2")


# -- delivery: the package is sealed (manifest, golden outputs) and verifies on this machine -----


def test_the_package_is_sealed_and_verifies(deployed, tmp_path: Path) -> None:
    import shutil

    from modelkiln.delivery.manifest import read_manifest
    from modelkiln.delivery.verify import verify_package

    out, summary = deployed
    manifest = read_manifest(out)
    listed = {f.path for f in manifest.files}
    assert {f"repository/small_{p}/1/model.onnx" for p in summary.precisions} <= listed
    assert "summary.json" in listed and not any(p.startswith("work/") for p in listed)
    report = verify_package(out)
    assert report.ok, [f.line() for f in report.failures]
    golden = {(f.precision, f.check) for f in report.findings if f.check == "golden"}
    assert golden == {(p, "golden") for p in summary.precisions}
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    model = tampered / "repository" / "small_int8" / "1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-3] ^= 1
    model.write_bytes(bytes(data))
    failures = verify_package(tampered).failures
    assert failures and any("repository/small_int8/1/model.onnx" in f.line() for f in failures)


def test_a_signed_encrypted_package_verifies_and_serves_only_with_its_keys(tmp_path: Path) -> None:
    from modelkiln.delivery.crypto import generate_model_key
    from modelkiln.delivery.signing import generate_signing_key
    from modelkiln.delivery.verify import verify_package
    from modelkiln.serve.model import LoadPolicy
    from modelkiln.serve.server import ModelServer

    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        np.save(calib / f"{i:02d}.npy", rng.standard_normal((1, 16)).astype(np.float32))
    public = generate_signing_key(tmp_path / "sign.pem")
    key = generate_model_key(tmp_path / "model.key")
    out = tmp_path / "out"
    opts = DeployOptions(
        str(small_model(tmp_path / "small.onnx")),
        out,
        calib=calib,
        precisions=("fp32", "int8"),
        bench_seconds=0.1,
        sign_key=tmp_path / "sign.pem",
        encrypt_key=tmp_path / "model.key",
    )
    deploy(opts)
    shipped = sorted(p.name for p in (out / "repository").rglob("model.onnx*"))
    assert shipped == ["model.onnx.enc", "model.onnx.enc"]  # no plaintext model ships
    assert key.secret.hex() not in (out / "manifest.json").read_text()
    assert verify_package(out, public_key=public, model_key=key).ok
    assert not verify_package(out, public_key=public).ok  # encrypted: no key, no golden check
    server = ModelServer(str(out / "repository"), cores=1, policy=LoadPolicy(model_key=key))
    server.load_all()
    try:
        x = rng.standard_normal((2, 16)).astype(np.float32)
        y = server.infer("small_fp32", {"x": x}).result(timeout=30).outputs["y"]
        np.testing.assert_allclose(y, np.maximum(x @ _w(1) + _w(2), 0) @ _w(3), rtol=1e-4, atol=1e-4)
    finally:
        server.shutdown()


def _w(i: int) -> np.ndarray:
    """small_model's initializers in order (w1, b1, w2), drawn as small_model draws them."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal(512).astype(np.float32).reshape(16, 32)
    b1 = rng.standard_normal(32).astype(np.float32)
    w2 = rng.standard_normal(256).astype(np.float32).reshape(32, 8)
    return (w1, b1, w2)[i - 1]
