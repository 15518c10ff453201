"""CPU INT8 facts: /proc/cpuinfo parsing, which CPUs sum u8 x s8 in int32, the reason a VNNI-format
model is reported on a CPU without VNNI, and the warning every command gives (once per model).
Nothing here depends on the CPU the tests run on: cpu_info is replaced by a made-up CpuInfo."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from modelkiln.runtime import cpu
from modelkiln.runtime.backends import onnxruntime as ort_backend
from modelkiln.runtime.backends.onnxruntime import OrtBackend, OrtOptions, cpu_backend
from modelkiln.runtime.cpu import (
    INT8_FORMAT_KEY,
    INT8_REQUIRES_KEY,
    INT32_DOT,
    CpuInfo,
    cpu_info,
    parse_proc_cpuinfo,
    unmet_requirement,
)

EPYC_AVX2 = """\
processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 23
model		: 49
model name	: AMD EPYC 7B12
stepping	: 0
microcode	: 0xffffffff
cpu MHz		: 2249.998
cache size	: 512 KB
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr arat npt nrip_save umip rdpid
bugs		: sysret_ss_attrs spectre_v1 spectre_v2 spec_store_bypass retbleed smt_rsb
bogomips	: 4499.99
"""

NEOVERSE = """\
processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x3
CPU part	: 0xd0c
CPU revision	: 1
"""

AVX2_ONLY = CpuInfo("x86_64", "AMD EPYC 7B12", frozenset({"avx", "avx2", "fma"}))
VNNI_MODEL = {INT8_FORMAT_KEY: "vnni", INT8_REQUIRES_KEY: INT32_DOT}
PORTABLE_MODEL = {INT8_FORMAT_KEY: "portable", INT8_REQUIRES_KEY: ""}


def test_parse_avx2_only_epyc() -> None:
    model, flags = parse_proc_cpuinfo(EPYC_AVX2)
    assert model == "AMD EPYC 7B12"
    assert {"avx2", "fma", "sse4_2"} <= flags and "avx512bw" not in flags
    info = CpuInfo("x86_64", model, flags)
    assert info.int8_flags() == ["avx2"] and not info.int32_dot
    assert info.describe() == "AMD EPYC 7B12 (x86_64: avx2)"
    assert info.to_dict() == {
        "cpu_model": "AMD EPYC 7B12",
        "arch": "x86_64",
        "int8_flags": ["avx2"],
        "int32_dot": False,
    }


def test_parse_arm64_cpuinfo_reads_features() -> None:
    model, flags = parse_proc_cpuinfo(NEOVERSE)
    assert model == ""  # ARM kernels name no model; cpu_info falls back to the platform's name
    assert {"asimd", "asimddp"} <= flags and "i8mm" not in flags
    info = CpuInfo("arm64", "neoverse", flags)
    assert info.int8_flags() == ["asimddp"] and info.int32_dot


@pytest.mark.parametrize(
    ("arch", "flags", "int32_dot"),
    [
        ("x86_64", {"avx2"}, False),
        ("x86_64", {"avx2", "avx512bw"}, False),  # AVX-512 without VNNI still saturates in int16
        ("x86_64", {"avx2", "avx512bw", "avx512_vnni"}, True),
        ("x86_64", {"avx2", "avx_vnni"}, True),
        ("x86_64", {"avx2", "amx_int8"}, True),
        ("arm64", set(), True),
        ("arm64", {"asimddp", "i8mm"}, True),
    ],
)
def test_int32_dot_truth_table(arch: str, flags: set[str], int32_dot: bool) -> None:
    assert CpuInfo(arch, "cpu", frozenset(flags)).int32_dot is int32_dot


def test_vnni_model_on_avx2_only_cpu_says_why_and_what_to_do() -> None:
    reason = unmet_requirement(VNNI_MODEL, AVX2_ONLY)
    assert reason is not None
    assert "'vnni'" in reason and "portable" in reason and "AMD EPYC 7B12" in reason
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert flag in reason


@pytest.mark.parametrize(
    ("props", "info"),
    [
        (PORTABLE_MODEL, AVX2_ONLY),  # portable runs exactly everywhere
        ({}, AVX2_ONLY),  # float model: no INT8 metadata at all
        (VNNI_MODEL, CpuInfo("x86_64", "x86_64", frozenset(), known=False)),  # flags unknown
        (VNNI_MODEL, CpuInfo("x86_64", "Xeon", frozenset({"avx2", "avx512_vnni"}))),
        (VNNI_MODEL, CpuInfo("arm64", "neoverse", frozenset({"asimddp"}))),
    ],
)
def test_no_requirement_unmet(props: dict[str, str], info: CpuInfo) -> None:
    assert unmet_requirement(props, info) is None


def test_this_machines_cpu_info_is_consistent() -> None:
    info = cpu_info()
    assert info is cpu_info()  # read once per process
    assert info.describe() and set(info.to_dict()) == {"cpu_model", "arch", "int8_flags", "int32_dot"}


def tagged_model(path: Path, props: dict[str, str]) -> Path:
    """y = x + 1 with INT8 metadata_props (what kiln quantize writes) set by hand."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "tagged",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, props)
    onnx.save(model, path)
    return path


@pytest.fixture
def warnings_seen(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> pytest.LogCaptureFixture:
    """Records of modelkiln.runtime.backends.onnxruntime at WARNING (propagating even if the CLI configured logging)."""
    monkeypatch.setattr(logging.getLogger("modelkiln"), "propagate", True)
    monkeypatch.setattr(ort_backend, "_WARNED", set())  # what earlier tests were warned about
    caplog.set_level(logging.WARNING, logger="modelkiln.runtime.backends.onnxruntime")
    return caplog


def _mismatch_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "modelkiln.runtime.backends.onnxruntime" and "int32 dot" in r.getMessage()
    ]


def test_a_mismatched_model_is_warned_about_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warnings_seen: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cpu, "cpu_info", lambda: AVX2_ONLY)
    path = tagged_model(tmp_path / "vnni.onnx", VNNI_MODEL)
    cpu_backend(path)
    OrtBackend.load(str(path), OrtOptions(intra_op_threads=1))
    records = _mismatch_records(warnings_seen)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert str(path) in message and "portable" in message
    warnings_seen.clear()
    data = path.read_bytes()
    cpu_backend(data)
    cpu_backend(onnx.load_from_string(data))
    records = _mismatch_records(warnings_seen)
    assert len(records) == 1 and "<in-memory model>" in records[0].getMessage()


def test_fitting_cpu_or_portable_model_gives_no_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warnings_seen: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cpu, "cpu_info", lambda: AVX2_ONLY)
    cpu_backend(tagged_model(tmp_path / "portable.onnx", PORTABLE_MODEL))
    monkeypatch.setattr(cpu, "cpu_info", lambda: CpuInfo("x86_64", "Xeon", frozenset({"avx512_vnni"})))
    cpu_backend(tagged_model(tmp_path / "vnni.onnx", VNNI_MODEL))
    assert _mismatch_records(warnings_seen) == []
