"""ONNX Runtime sessions with the options modelkiln uses everywhere, and clear load errors."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelkiln.errors import BackendError, BadInput, ModelNotFound
from modelkiln.runtime import cpu

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

log = logging.getLogger(__name__)
IN_MEMORY = "<in-memory model>"
#: (model identity, reason) pairs already warned about: one warning per model, not per session.
_WARNED: set[tuple[str, str]] = set()
_WARNED_LOCK = threading.Lock()


def ort_session(
    model: str | Path | bytes,
    threads: int | None = None,
    optimization: str = "all",
    providers: list[str] | None = None,
    inter_op_threads: int | None = None,
    memory_arena: bool = True,
) -> Any:
    """An InferenceSession on ``providers`` (CPU by default) with ``threads`` intra-op threads."""
    import onnxruntime as ort

    if isinstance(model, (str, Path)):
        if not Path(model).is_file():
            raise ModelNotFound(f"model file not found: {model}")
        model = os.fspath(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[optimization])
    if threads:
        options.intra_op_num_threads = threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = memory_arena
    name = model if isinstance(model, str) else IN_MEMORY
    try:
        session = ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        raise BackendError(f"ONNX Runtime cannot load {name}: {str(exc).splitlines()[0][:300]}") from exc
    warn_cpu_mismatch(name, model_metadata(session))
    return session


def warn_cpu_mismatch(name: str, props: dict[str, str]) -> str | None:
    """Log once per model when this CPU cannot run it as built (an INT8 format needing VNNI on a
    CPU without it): every command loads through ort_session, so each says so without repeating
    itself per session. ``name`` is the file or "<in-memory model>" (in-memory models are
    candidates built from a file, e.g. in a budget search: one warning covers them all).
    Returns the reason (None when the CPU fits)."""
    reason = cpu.unmet_requirement(props)
    if reason is None:
        return None
    identity = name if name == IN_MEMORY else os.path.realpath(name)
    with _WARNED_LOCK:
        first = (identity, reason) not in _WARNED
        _WARNED.add((identity, reason))
    if first:
        log.warning("model %s: %s", name, reason)
    return reason


def run(session: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run and return outputs by name; input names are checked so a typo gives a clear error."""
    expected = {i.name for i in session.get_inputs()}
    if set(feed) != expected:
        raise BadInput(f"model expects inputs {sorted(expected)}, got {sorted(feed)}")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def model_metadata(session: Any) -> dict[str, str]:
    """The ONNX model's metadata_props (where export records the zoo family and class names)."""
    return dict(session.get_modelmeta().custom_metadata_map)


def expose_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are exactly ``names`` (intermediate tensors included)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return exposed


def interleaved_latency_ms(
    models: dict[str, bytes | str | Path],
    feed: dict[str, np.ndarray],
    rounds: int = 5,
    iterations: int = 10,
    threads: int | None = None,
) -> dict[str, dict[str, float]]:
    """Median and min latency (ms) per model, the models timed in turns so that machine noise
    falls on all of them alike: the quick side-by-side speed check of a model choice."""
    import time

    sessions = {name: ort_session(m, threads=threads) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(None, feed)
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(iterations):
                t = time.perf_counter()
                s.run(None, feed)
                times[name].append((time.perf_counter() - t) * 1e3)
    return {n: {"median": float(np.median(t)), "min": float(np.min(t))} for n, t in times.items()}
