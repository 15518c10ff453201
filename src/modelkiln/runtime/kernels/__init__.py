"""Our ONNX Runtime custom-op library: integer kernels ONNX Runtime lacks (a 256-entry lookup
between quantized tensors: SiLU, Hardswish, GELU... exact and one byte in, one byte out).

The library is C (``csrc/``), compiled by the package's own install (setup.py, optional: where no
compiler exists the install still succeeds and models are quantized with standard ops only).
``OrtBackend.load`` registers it on every session, so every kiln command runs such models; a model
that uses it says so in its metadata (``METADATA_KEY``) and in its opset imports (``DOMAIN``).

The op (``LOOKUP_OP``): X uint8 or int8 of any shape, table 256 uint8 or int8 elements, Y with X's
shape and the table's type; all four type pairs run. (In an int8 model, prefer an int8 -> uint8
table: ONNX Runtime's CPU provider then fuses the next DQ -> Conv -> Q into QLinearConv, which it
did not do after an int8 -> int8 lookup.)
A table of another size or type is an ONNX Runtime error naming the node: at session load when the
table is an initializer, else at run. The C code picks its fastest instruction set at run time
(``ISAS``); ``ISA_ENV`` forces one (tests, benchmarks) and ``active_isa()`` says which one runs.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Any

import onnx

from modelkiln.errors import BackendError
from modelkiln.runtime.cpu import CpuInfo, cpu_info

log = logging.getLogger(__name__)

#: ONNX domain of our custom ops (a model using them imports this domain, version 1).
DOMAIN = "ai.modelkiln"
DOMAIN_VERSION = 1
#: Y = table[X]: X uint8 or int8 of any shape; table: 256 elements (uint8 or int8), indexed by X's
#: byte (uint8 x -> x; int8 x -> x & 0xFF, so -1 -> 255); Y has X's shape and the table's type.
LOOKUP_OP = "LookupTable"
#: Model metadata key listing the custom ops a model needs (comma-separated op names).
METADATA_KEY = "modelkiln.kernels"

#: The library's code paths, slowest first (the same bytes come out of each; only speed differs).
ISAS = ("scalar", "avx2", "avx512vbmi")
#: Read once per process by the library: force one of ``ISAS`` ("auto" or unset: the fastest this
#: CPU runs). Naming a path the CPU lacks makes every session fail to load, with that reason.
ISA_ENV = "KILN_KERNELS_ISA"
#: Read once per process by the library: "0" never splits one tensor across ONNX Runtime's intra-op
#: threads (otherwise tensors from 128 KiB up are, which measured faster on 2 cores).
THREADS_ENV = "KILN_KERNELS_THREADS"

_LIBRARY_STEM = "_kiln_ops"


@functools.cache
def library_path() -> Path | None:
    """The compiled library beside this package, or None where the install could not build it."""
    here = Path(__file__).resolve().parent
    found = sorted(here.glob(f"{_LIBRARY_STEM}*.so")) + sorted(here.glob(f"{_LIBRARY_STEM}*.pyd"))
    found += sorted(here.glob(f"{_LIBRARY_STEM}*.dylib"))
    return found[0] if found else None


def available() -> bool:
    return library_path() is not None


def active_isa() -> str | None:
    """The code path LookupTable runs in this process (one of ``ISAS``), or None when the library
    was not built or ``ISA_ENV`` names a path this CPU (or this build) cannot run."""
    path = library_path()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    query = lib.KilnKernelsIsa
    query.restype = ctypes.c_char_p
    name = query()
    return name.decode() if isinstance(name, bytes) else None


def cpu_isas(info: CpuInfo | None = None) -> tuple[str, ...]:
    """The code paths a CPU can run, from its flags (the library itself asks the CPU at run time;
    this is for tests and benchmarks choosing which paths to force)."""
    info = info or cpu_info()
    if info.arch != "x86_64":
        return ("scalar",)
    found = ["scalar"]
    if "avx2" in info.flags:
        found.append("avx2")
    if {"avx512f", "avx512bw", "avx512vbmi"} <= info.flags:
        found.append("avx512vbmi")
    return tuple(found)


def register(session_options: Any) -> bool:
    """Register the library on an ``onnxruntime.SessionOptions``; False when it was not built.
    BackendError when the library refuses (``ISA_ENV`` names a path this CPU lacks)."""
    path = library_path()
    if path is None:
        return False
    try:
        session_options.register_custom_ops_library(str(path))
    except Exception as exc:  # onnxruntime's own exception types; the message is the library's
        raise BackendError(f"cannot register {path.name}: {str(exc).splitlines()[0][:300]}") from exc
    return True


def uses_kernels(model: onnx.ModelProto) -> bool:
    """Whether ``model`` has nodes in our domain (it then needs the library to run)."""
    return any(op.domain == DOMAIN for op in model.opset_import) or any(
        n.domain == DOMAIN for n in model.graph.node
    )


def unavailable_message(model_name: str) -> str:
    """What to tell a user whose model needs the library where it was not built."""
    return (
        f"{model_name} uses modelkiln's integer kernels (ONNX domain {DOMAIN}), but the kernel library "
        "was not built with this install (no C compiler?): reinstall modelkiln where `cc` works, or "
        "re-quantize the model with `kiln quantize --portable` (standard ONNX ops only)"
    )
