"""What this CPU can do for INT8, from the operating system (``/proc/cpuinfo`` on Linux, ``sysctl``
on macOS).

INT8 numerics depend on the instruction set: x86 CPUs without an int32 dot product (AVX2 only, or
AVX-512BW without VNNI) multiply uint8 x int8 with VPMADDUBSW, which saturates pairs of products in
int16, so a model quantized for a VNNI machine loses accuracy there. Every figure and every INT8
model names the CPU facts that matter for this, so a result can be traced to the machine it came from.
(A maintained library was tried first: archspec reports the features of the micro-architecture it
recognises, not the CPU's own flags, and drops AVX512-VNNI on a Zen 5.)
"""

from __future__ import annotations

import functools
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Instruction-set flags that matter for INT8, by the names Linux gives them.
X86_INT8 = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8")
ARM_INT8 = ("asimddp", "i8mm")  # dot product (SDOT/UDOT), int8 matrix multiply (SMMLA/USMMLA)
#: x86 instructions that multiply uint8 x int8 and accumulate in int32 without an int16 step.
X86_INT32_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")

_MAC_SYSCTL = {
    "hw.optional.avx2_0": "avx2",
    "hw.optional.avx512bw": "avx512bw",
    "hw.optional.avx512vnni": "avx512_vnni",
    "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
}


@dataclass(frozen=True)
class CpuInfo:
    """Architecture, model name and the INT8-relevant flags this CPU reports."""

    arch: str  # "x86_64", "arm64" or what platform.machine() says
    model: str
    flags: frozenset[str]
    known: bool = True  # False when the OS told us nothing about the flags

    @property
    def int32_dot(self) -> bool:
        """u8 x s8 products accumulate exactly (no int16 saturation) in ONNX Runtime's kernels:
        x86 with VNNI or AMX; every ARM64 CPU (its kernels widen or use SDOT/UDOT)."""
        if self.arch == "arm64":
            return True
        return self.arch == "x86_64" and any(f in self.flags for f in X86_INT32_DOT)

    def int8_flags(self) -> list[str]:
        wanted = X86_INT8 if self.arch == "x86_64" else ARM_INT8
        return [f for f in wanted if f in self.flags]

    def describe(self) -> str:
        """One line for logs and reports: model, architecture and the INT8 instruction sets."""
        flags = " ".join(self.int8_flags()) or (
            "none of " + "/".join(X86_INT8 if self.arch == "x86_64" else ARM_INT8)
        )
        if not self.known:
            flags = "flags unknown"
        return f"{self.model} ({self.arch}: {flags})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu_model": self.model,
            "arch": self.arch,
            "int8_flags": self.int8_flags(),
            "int32_dot": self.int32_dot,
        }


def _arch() -> str:
    m = platform.machine().lower()
    if m in ("x86_64", "amd64"):
        return "x86_64"
    if m in ("aarch64", "arm64"):
        return "arm64"
    return m


def parse_proc_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """Model name and flags of the first processor in a /proc/cpuinfo text (x86 ``flags``,
    ARM ``Features``)."""
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def _mac() -> tuple[str, frozenset[str]]:
    def sysctl(name: str) -> str:
        out = subprocess.run(["sysctl", "-n", name], check=False, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""

    flags = frozenset(flag for key, flag in _MAC_SYSCTL.items() if sysctl(key) == "1")
    return sysctl("machdep.cpu.brand_string"), flags


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CpuInfo (read once per process)."""
    arch = _arch()
    model, flags, known = platform.processor() or arch, frozenset[str](), False
    try:
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.is_file():
            name, flags = parse_proc_cpuinfo(cpuinfo.read_text(errors="replace"))
            model, known = name or model, bool(flags)
        elif platform.system() == "Darwin":
            name, flags = _mac()
            model, known = name or model, True
    except (OSError, subprocess.SubprocessError):
        pass
    return CpuInfo(arch, model, flags, known)


#: ONNX metadata_props an INT8 model carries (written by ``kiln quantize``): its format, weight and
#: activation types, and the CPU capability it needs ("" when it runs exactly on any CPU).
INT8_FORMAT_KEY = "modelkiln.int8.format"
INT8_WEIGHTS_KEY = "modelkiln.int8.weights"
INT8_ACTIVATIONS_KEY = "modelkiln.int8.activations"
INT8_REQUIRES_KEY = "modelkiln.int8.requires"
#: How to rebuild the model for any CPU, when that is not ``kiln quantize --cpu portable``.
INT8_REMEDY_KEY = "modelkiln.int8.remedy"
#: The capability VNNI-format models need: u8 x s8 products summed in int32 (see CpuInfo.int32_dot).
INT32_DOT = "int32_dot"


def unmet_requirement(props: dict[str, str], info: CpuInfo | None = None) -> str | None:
    """Why this CPU cannot run a model with metadata ``props`` as it was built to run, or None.

    Unknown CPUs (no flags from the OS) and non-x86/ARM architectures are given the benefit of the
    doubt: only a CPU known to lack the capability is reported."""
    need = props.get(INT8_REQUIRES_KEY, "")
    info = info or cpu_info()
    if need != INT32_DOT or not info.known or info.int32_dot or info.arch != "x86_64":
        return None
    fmt = props.get(INT8_FORMAT_KEY, "?")
    return (
        f"it was quantized in the '{fmt}' INT8 format, which needs an int32 dot product "
        f"(x86: {', '.join(X86_INT32_DOT)}; any ARM64), and this CPU, {info.describe()}, has none: "
        "its u8 x s8 products saturate in int16 and accuracy drops. "
        + props.get(
            INT8_REMEDY_KEY, "Re-quantize it with `kiln quantize --cpu portable` (exact on every CPU)"
        )
    )
