"""Builds modelkiln's ONNX Runtime custom-op library (src/modelkiln/runtime/kernels/csrc) with the
package's own install; everything else about the package is in pyproject.toml.

The library is a plain C shared object that ONNX Runtime dlopens (no Python API, no ONNX Runtime
headers: csrc/ort_abi.h declares the little of the C ABI it uses). It is optional: where no C
compiler works the install still succeeds, `modelkiln.runtime.kernels.available()` is False, and
models are quantized with standard ONNX ops only.
"""

from __future__ import annotations

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "src/modelkiln/runtime/kernels/csrc"

#: -O3; hidden symbols (only RegisterCustomOps and KilnKernelsIsa are exported, by attribute);
#: never -march=native: instruction sets are chosen at run time (__builtin_cpu_supports), since the
#: built library may run on another CPU than the one that built it.
UNIX_FLAGS = ["-O3", "-std=gnu11", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]


class BuildKernels(build_ext):  # type: ignore[misc]  # setuptools ships no types for it
    """build_ext with our flags for gcc/clang; other compilers get their defaults."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            for ext in self.extensions:
                ext.extra_compile_args = [*ext.extra_compile_args, *UNIX_FLAGS]
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "modelkiln.runtime.kernels._kiln_ops",
            sources=[f"{CSRC}/kiln_ops.c", f"{CSRC}/lut.c"],
            depends=[f"{CSRC}/ort_abi.h", f"{CSRC}/lut.h"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildKernels},
)
