"""A package built on this (VNNI) machine, verified on an emulated AVX2-only CPU (qemu user mode,
EPYC-Rome: ONNX Runtime takes its AVX2 kernels there, whose u8 x s8 pair sums saturate in int16):
the VNNI-format INT8 model fails the golden check; the portable one and FP32 pass."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelkiln.delivery.seal import seal_package
from modelkiln.quant.config import Int8Cpu, QuantConfig
from modelkiln.quant.quantize import quantize
from modelkiln.runtime.cpu import cpu_info

C_IN, C_MID, C_OUT = 64, 16, 8


def _qemu() -> list[str] | None:
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or platform.machine().lower() not in ("x86_64", "amd64") or not cpu_info().int32_dot:
        return None
    return [qemu, "-cpu", "EPYC-Rome"]


def _conv_model() -> onnx.ModelProto:
    """1x1 Conv with mostly positive weights (as after a ReLU) -> Relu -> 1x1 Conv: neighbouring
    int8 weight pairs times uint8 activations overflow int16."""
    rng = np.random.default_rng(0)
    w1 = rng.uniform(0.2, 1.0, (C_MID, C_IN, 1, 1)).astype(np.float32)
    w2 = rng.uniform(-1.0, 1.0, (C_OUT, C_MID, 1, 1)).astype(np.float32)
    b1 = (rng.standard_normal(C_MID) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
        ],
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, C_IN, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, C_OUT, 4, 4])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (b1, "b1"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


_VERIFY = """
import json, sys
from modelkiln.delivery.verify import verify_package
report = verify_package(sys.argv[1], threads=1)
open(sys.argv[2], "w").write(json.dumps(report.to_dict()))
"""


@pytest.mark.skipif(_qemu() is None, reason="needs qemu-x86_64 (Debian qemu-user) on a VNNI x86 CPU")
def test_vnni_package_fails_the_golden_check_on_an_emulated_avx2_cpu(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    models = pkg / "models"
    models.mkdir(parents=True)
    onnx.save(_conv_model(), models / "fp32.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        np.save(calib / f"{i}.npy", rng.uniform(0, 1, (1, C_IN, 4, 4)).astype(np.float32))
    for fmt in (Int8Cpu.VNNI, Int8Cpu.PORTABLE):
        quantize(models / "fp32.onnx", models / f"{fmt.value}.onnx", calib, config=QuantConfig(cpu=fmt))
    feeds = [{"x": rng.uniform(0, 1, (2, C_IN, 4, 4)).astype(np.float32)} for _ in range(3)]
    files = {"fp32": models / "fp32.onnx", "vnni": models / "vnni.onnx", "portable": models / "portable.onnx"}
    seal_package(pkg, {"toy": files}, {"toy": feeds})
    script, out = tmp_path / "verify.py", tmp_path / "report.json"
    script.write_text(_VERIFY)
    cmd = [*(_qemu() or []), sys.executable, str(script), str(pkg), str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    failed = {(f["precision"], f["check"]) for f in report["findings"] if f["status"] == "fail"}
    assert ("vnni", "golden") in failed, report["findings"]  # max-abs ~5.8 where 0.13 is allowed
    assert not [f for f in failed if f[0] in ("fp32", "portable")], failed
