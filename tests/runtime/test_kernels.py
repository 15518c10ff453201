"""The LookupTable kernel library (runtime/kernels): every code path gives numpy's table[x] on every
byte value and on any shape; a bad table is an ONNX Runtime error naming the node, never a crash;
the node keeps ONNX Runtime's QDQ fusions downstream; the library loads alone and exports only what
ONNX Runtime (and our ISA query) need; our ABI header matches the installed ONNX Runtime.

Forced code paths (KILN_KERNELS_ISA is read once per process) run in one worker process per path,
fed shapes by hypothesis from here; everything goes through OrtBackend (cpu_backend).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from modelkiln.errors import BackendError
from modelkiln.runtime import kernels
from modelkiln.runtime.backends.onnxruntime import cpu_backend, optimized_graph

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason="modelkiln's kernel library is not built (no C compiler at install time?): "
    "run `pip install -e .` where `cc` works",
)

#: The C sources: the checkout's (an installed copy carries only what the build needs).
CSRC = Path(__file__).resolve().parents[2] / "src" / "modelkiln" / "runtime" / "kernels" / "csrc"
TYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}
PAIRS = [("uint8", "uint8"), ("int8", "int8"), ("uint8", "int8"), ("int8", "uint8")]


def lookup_model(x_type: str, table: np.ndarray | None, x_shape: list[int | str]) -> onnx.ModelProto:
    """y = LookupTable(x, table): table an initializer, or a uint8 graph input when ``table`` is None.
    Y is declared without a shape: what a consumer sees is ONNX Runtime's inference."""
    t_type = str(table.dtype) if table is not None else "uint8"
    inputs = [helper.make_tensor_value_info("x", TYPES[x_type], x_shape)]
    inits = []
    if table is None:
        inputs.append(helper.make_tensor_value_info("table", TYPES[t_type], ["T"]))
    else:
        inits.append(numpy_helper.from_array(table, "table"))
    elem = TYPES.get(t_type, TensorProto.FLOAT)
    graph = helper.make_graph(
        [helper.make_node(kernels.LOOKUP_OP, ["x", "table"], ["y"], domain=kernels.DOMAIN, name="act7")],
        "lookup",
        inputs,
        [helper.make_tensor_value_info("y", elem, None)],
        inits,
    )
    return helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 17),
            helper.make_opsetid(kernels.DOMAIN, kernels.DOMAIN_VERSION),
        ],
    )


# ---------------------------------------------------------------- workers, one per forced path

WORKER = r"""
import json, sys
import numpy as np
from onnx import TensorProto, helper
from modelkiln.runtime import kernels
from modelkiln.runtime.backends.onnxruntime import cpu_backend

TYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}
sessions = {}

def backend(rank, xt, tt, threads):
    key = (rank, xt, tt, threads)
    if key not in sessions:
        dims = [f"d{i}" for i in range(rank)]
        graph = helper.make_graph(
            [helper.make_node("LookupTable", ["x", "table"], ["y"], domain=kernels.DOMAIN, name="lut")],
            "w",
            [helper.make_tensor_value_info("x", TYPES[xt], dims),
             helper.make_tensor_value_info("table", TYPES[tt], [256])],
            [helper.make_tensor_value_info("y", TYPES[tt], None)],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid(kernels.DOMAIN, 1)])
        sessions[key] = cpu_backend(model, threads=threads)
    return sessions[key]

print(json.dumps({"isa": kernels.active_isa()}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    try:
        rng = np.random.default_rng(job["seed"])
        shape = tuple(job["shape"])
        xd, td = np.dtype(job["x"]), np.dtype(job["table"])
        if job.get("all_bytes"):
            x = rng.permutation(256).astype(np.uint8).view(xd).reshape(shape)
        else:
            x = rng.integers(0, 256, shape, dtype=np.uint8).view(xd)
        table = rng.integers(0, 256, 256, dtype=np.uint8).view(td)
        y = backend(len(shape), job["x"], job["table"], job["threads"]).infer({"x": x, "table": table})["y"]
        want = table[x.view(np.uint8).astype(np.intp)]
        ok = y.dtype == td and y.shape == shape and np.array_equal(y, want)
        reply = {"ok": bool(ok), "got": [str(y.dtype), list(y.shape)],
                 "bad": int(np.count_nonzero(y != want)) if y.shape == want.shape else -1}
    except Exception as exc:
        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(reply), flush=True)
"""


class Worker:
    """A Python process with KILN_KERNELS_ISA set, checking LookupTable against numpy per request."""

    def __init__(self, isa: str, prefix: tuple[str, ...] = ()) -> None:
        env = {**os.environ, kernels.ISA_ENV: isa}
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.isa = str(self._read()["isa"])

    def _read(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the worker process died"
        reply: dict[str, object] = json.loads(line)
        return reply

    def check(
        self, shape: tuple[int, ...], x: str, table: str, seed: int = 0, **kw: object
    ) -> dict[str, object]:
        assert self.proc.stdin is not None
        job = {"shape": list(shape), "x": x, "table": table, "seed": seed, "threads": 1, **kw}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module", params=kernels.cpu_isas())
def worker(request: pytest.FixtureRequest) -> Iterator[Worker]:
    w = Worker(request.param)
    assert w.isa == request.param, f"asked for {request.param}, the library runs {w.isa}"
    yield w
    w.close()


@pytest.mark.parametrize(("x", "table"), PAIRS)
def test_every_path_is_the_table_on_all_256_bytes(worker: Worker, x: str, table: str) -> None:
    for seed in range(3):
        reply = worker.check((256,), x, table, seed=seed, all_bytes=True)
        assert reply["ok"], f"{worker.isa} {x}->{table}: {reply}"
        reply = worker.check((4, 8, 8), x, table, seed=seed, all_bytes=True)  # the same bytes as 3-d
        assert reply["ok"], f"{worker.isa} {x}->{table}: {reply}"


# Sizes around every vector width and tail (scalar 8, AVX2 32, AVX-512 64 and 256 per turn), and
# past the 128 KiB where a tensor is split across intra-op threads (odd, so a chunk has a tail).
EDGE_SHAPES = [
    (),
    (0,),
    (3, 0, 5),
    (1,),
    (7,),
    (31,),
    (33,),
    (63,),
    (64,),
    (65,),
    (255,),
    (257,),
    (1, 3, 37, 41),
]
BIG_SHAPE = (1, 7, 151, 127)  # 134 239 bytes


@pytest.mark.parametrize(("x", "table"), PAIRS)
def test_every_path_on_edge_shapes_and_split_tensors(worker: Worker, x: str, table: str) -> None:
    for shape in EDGE_SHAPES:
        reply = worker.check(shape, x, table, seed=len(shape))
        assert reply["ok"], f"{worker.isa} {x}->{table} {shape}: {reply}"
    for threads in (1, 2):  # 2: ParallelFor over ONNX Runtime's pool
        reply = worker.check(BIG_SHAPE, x, table, seed=threads, threads=threads)
        assert reply["ok"], f"{worker.isa} {x}->{table} {BIG_SHAPE} threads={threads}: {reply}"


#: Rank 0 to 2 with any lengths (odd ones, empty ones), or rank 3 to 5 with small dims.
SHAPES = st.one_of(
    st.lists(st.integers(0, 200), max_size=2), st.lists(st.integers(0, 9), min_size=3, max_size=5)
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=SHAPES, pair=st.sampled_from(PAIRS), seed=st.integers(0, 2**16))
def test_every_path_on_random_shapes(
    worker: Worker, shape: list[int], pair: tuple[str, str], seed: int
) -> None:
    reply = worker.check(tuple(shape), pair[0], pair[1], seed=seed)
    assert reply["ok"], f"{worker.isa} {pair[0]}->{pair[1]} {shape}: {reply}"


def test_auto_runs_the_fastest_path_this_cpu_has() -> None:
    if os.environ.get(kernels.ISA_ENV, "auto") != "auto":
        pytest.skip(f"{kernels.ISA_ENV} is set in this environment")
    assert kernels.active_isa() == kernels.cpu_isas()[-1]


def _load_in_fresh_process(env_isa: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    code = (
        "import numpy as np, onnx\n"
        "from modelkiln.runtime.backends.onnxruntime import cpu_backend\n"
        "m = onnx.load_from_string(bytes.fromhex(input()))\n"
        "y = cpu_backend(m).infer({'x': np.arange(6, dtype=np.uint8).reshape(2, 3)})['y']\n"
        "print(y.tolist())\n"
    )
    model = lookup_model("uint8", np.arange(256, dtype=np.uint8)[::-1].copy(), ["N", 3])
    return subprocess.run(
        [*prefix, sys.executable, "-c", code],
        check=False,
        input=model.SerializeToString().hex(),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, kernels.ISA_ENV: env_isa},
    )


def test_a_path_the_cpu_lacks_or_an_unknown_name_fails_every_load_with_the_reason() -> None:
    out = _load_in_fresh_process("sse9")
    assert out.returncode != 0
    assert "BackendError" in out.stderr and "KILN_KERNELS_ISA=sse9 is not a code path" in out.stderr
    missing = [isa for isa in kernels.ISAS if isa not in kernels.cpu_isas()]
    for isa in missing:
        out = _load_in_fresh_process(isa)
        assert out.returncode != 0 and f"KILN_KERNELS_ISA={isa} was requested but this CPU" in out.stderr


def _qemu_avx2() -> tuple[str, ...] | None:
    """qemu user-mode emulating an AVX2-only EPYC (Zen 2): no AVX-512 at all."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return (qemu, "-cpu", "EPYC-Rome")


@pytest.mark.skipif(_qemu_avx2() is None, reason="qemu-x86_64 (Debian package qemu-user) not installed")
def test_on_an_emulated_avx2_cpu_auto_takes_avx2_and_avx512_is_refused() -> None:
    """The run-time choice on a CPU without AVX-512 (the library asks the CPU, not /proc/cpuinfo,
    which qemu-user passes through from the host): auto runs the AVX2 path, exactly; forcing VBMI
    fails the load with the reason instead of an illegal instruction."""
    prefix = _qemu_avx2()
    assert prefix is not None
    worker = Worker("auto", prefix)
    try:
        assert worker.isa == "avx2"
        for x, table in PAIRS:
            for shape in [(256,), (3, 0), (), (65,), (1, 3, 17, 19)]:
                reply = worker.check(shape, x, table, seed=1, all_bytes=shape == (256,))
                assert reply["ok"], f"emulated avx2 {x}->{table} {shape}: {reply}"
    finally:
        worker.close()
    out = _load_in_fresh_process("avx512vbmi", prefix)
    assert out.returncode != 0
    assert "KILN_KERNELS_ISA=avx512vbmi was requested but this CPU" in out.stderr


def test_library_loads_alone_in_a_fresh_process_and_exports_only_its_entry_points() -> None:
    out = _load_in_fresh_process("auto")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[255, 254, 253], [252, 251, 250]]"
    path = kernels.library_path()
    assert path is not None
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no `nm` here to list the library's symbols")
    defined = subprocess.run(
        [nm, "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True
    )
    exported = sorted(line.split()[-1] for line in defined.stdout.splitlines() if " T " in line)
    assert exported == ["KilnKernelsIsa", "RegisterCustomOps"]
    undefined = subprocess.run(
        [nm, "-D", "--undefined-only", str(path)], capture_output=True, text=True, check=True
    )
    assert not re.search(r"\bPy\w+", undefined.stdout), "the library must not need Python's C API"


def test_abi_header_matches_the_installed_onnxruntime(tmp_path: Path) -> None:
    """csrc/abi_probe.c calls every OrtApi entry of ort_abi.h usable outside a session (and two
    anchors further down) on the libonnxruntime this Python uses; the session tests cover the rest."""
    import onnxruntime

    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to build csrc/abi_probe.c")
    if not (CSRC / "abi_probe.c").is_file():
        pytest.skip(f"no {CSRC / 'abi_probe.c'} (not a checkout)")
    capi = Path(onnxruntime.__file__).parent / "capi"
    libs = sorted(capi.glob("libonnxruntime.so*")) + sorted(capi.glob("libonnxruntime*.dylib"))
    if not libs:
        pytest.skip(f"no libonnxruntime shared library in {capi}")
    exe = tmp_path / "abi_probe"
    subprocess.run([cc, "-std=gnu11", "-O1", "-o", str(exe), str(CSRC / "abi_probe.c"), "-ldl"], check=True)
    out = subprocess.run([str(exe), str(libs[0])], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ABI PROBE OK" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------- errors, types, shapes


@pytest.mark.parametrize("size", [0, 1, 255, 257, 512])
def test_a_constant_table_of_the_wrong_size_fails_the_load_naming_node_and_size(size: int) -> None:
    with pytest.raises(BackendError, match=rf"LookupTable node 'act7'.*exactly 256 elements.*got {size}\b"):
        cpu_backend(lookup_model("uint8", np.zeros(size, np.uint8), ["N", 5]))


def test_a_fed_table_of_the_wrong_size_fails_the_run_naming_node_and_size() -> None:
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    backend = cpu_backend(lookup_model("uint8", None, ["N", 5]))
    x = np.zeros((2, 5), np.uint8)
    with pytest.raises(InvalidArgument, match=r"LookupTable node 'act7'.*exactly 256 elements.*got 300"):
        backend.infer({"x": x, "table": np.zeros(300, np.uint8)})
    # the session is still usable afterwards
    table = np.arange(256, dtype=np.uint8)
    assert np.array_equal(backend.infer({"x": x + 3, "table": table})["y"], x + 3)


@pytest.mark.parametrize("which", ["table", "x"])
def test_a_table_or_input_of_another_type_fails_the_load(which: str) -> None:
    table = np.zeros(256, np.float32 if which == "table" else np.uint8)
    model = lookup_model("uint8", table, ["N", 5])
    if which == "x":
        model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    with pytest.raises(
        BackendError, match=rf"tensor\(float\).*\({which}\) of operator \(LookupTable\).*act7"
    ):
        cpu_backend(model)


def test_a_table_of_256_elements_in_any_shape_is_accepted() -> None:
    table = np.arange(256, dtype=np.uint8).reshape(16, 16)[::-1].copy()
    x = np.array([[0, 1, 16, 255, 128]], np.uint8)
    y = cpu_backend(lookup_model("uint8", table, ["N", 5])).infer({"x": x})["y"]
    assert np.array_equal(y, table.reshape(-1)[x])


@pytest.mark.parametrize(("x", "table"), PAIRS)
def test_output_takes_x_shape_and_table_type_at_load(x: str, table: str) -> None:
    """Shape inference (ShapeInferContext_*) and type inference: a consumer sees Y's type and shape
    before anything runs, symbolic dims included."""
    model = lookup_model(x, np.zeros(256, table), ["N", 3, 40, 41])
    (meta,) = cpu_backend(model).output_metadata
    assert (meta.dtype, meta.shape) == (table, ("N", 3, 40, 41))
    opt = optimized_graph(model)
    assert [n.op_type for n in opt.graph.node] == ["LookupTable"]


# ---------------------------------------------------------------- QDQ fusions around the node


def _conv_lookup_conv(x_type: str, table_type: str) -> onnx.ModelProto:
    """Q -> DQ -> Conv -> Q -> LookupTable -> DQ -> Conv -> Q -> DQ: the graph the SiLU rewrite
    leaves (DQ -> Sigmoid -> Mul -> Q replaced by the lookup)."""
    rng = np.random.default_rng(0)
    xd, td = np.dtype(x_type), np.dtype(table_type)

    def zp(dtype: np.dtype, unsigned: int) -> np.ndarray:
        return np.array(unsigned if dtype == np.uint8 else unsigned - 128, dtype)

    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "s0"),
        numpy_helper.from_array(zp(xd, 128), "z0"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s1"),
        numpy_helper.from_array(zp(xd, 100), "z1"),
        numpy_helper.from_array(np.array(0.04, np.float32), "s2"),
        numpy_helper.from_array(zp(td, 10), "z2"),
        numpy_helper.from_array(np.array(0.03, np.float32), "s3"),
        numpy_helper.from_array(zp(xd, 128), "z3"),
        numpy_helper.from_array(rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8), "w1q"),
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "w1s"),
        numpy_helper.from_array(rng.integers(-127, 128, (4, 8, 3, 3)).astype(np.int8), "w2q"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "w2s"),
        numpy_helper.from_array(rng.integers(0, 256, 256, dtype=np.uint8).view(td), "table"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s0", "z0"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s0", "z0"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w1q", "w1s"], ["w1"], axis=0),
        helper.make_node("Conv", ["xd", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c1", "s1", "z1"], ["c1q"]),
        helper.make_node(kernels.LOOKUP_OP, ["c1q", "table"], ["aq"], domain=kernels.DOMAIN, name="silu"),
        helper.make_node("DequantizeLinear", ["aq", "s2", "z2"], ["ad"]),
        helper.make_node("DequantizeLinear", ["w2q", "w2s"], ["w2"], axis=0),
        helper.make_node("Conv", ["ad", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c2", "s3", "z3"], ["c2q"]),
        helper.make_node("DequantizeLinear", ["c2q", "s3", "z3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 24, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(kernels.DOMAIN, 1)]
    )
    model.ir_version = 10
    return model


def test_uint8_convolutions_on_both_sides_still_fuse_to_qlinearconv() -> None:
    model = _conv_lookup_conv("uint8", "uint8")
    ops = [n.op_type for n in optimized_graph(model).graph.node]
    assert ops.count("QLinearConv") == 2 and ops.count("LookupTable") == 1, ops
    assert not {"Conv", "Sigmoid", "Mul"} & set(ops), ops
    y = cpu_backend(model).infer({"x": np.random.default_rng(1).standard_normal((2, 3, 24, 24), np.float32)})[
        "y"
    ]
    assert y.shape == (2, 4, 24, 24) and np.isfinite(y).all()


def test_an_int8_to_uint8_table_lets_the_next_convolution_fuse() -> None:
    """ONNX Runtime's CPU provider fuses DQ -> Conv -> Q for uint8 activations; an int8 model's
    activation leaves the lookup as uint8 (table int8 -> uint8, zero point + 128) and so fuses."""
    ops = [n.op_type for n in optimized_graph(_conv_lookup_conv("int8", "uint8")).graph.node]
    after = ops[ops.index("LookupTable") + 1 :]
    assert "QLinearConv" in after and "Conv" not in after, ops
