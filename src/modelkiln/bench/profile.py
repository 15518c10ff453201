"""Where inference time goes, per op type: ONNX Runtime's profiler trace summarised.

The trace is Chrome trace JSON written by ``OrtBackend.end_profiling()``. Each kernel is a ``Node``
event named ``<node>_kernel_time`` with ``args.op_name`` (the op as ONNX Runtime ran it, after its
fusions: QLinearConv, FusedConv, our LookupTable...), ``args.provider`` and ``dur`` in
microseconds. Each ``session.run`` is a ``Session`` event ``model_run``, written after its nodes,
so nodes are assigned to runs by time. ONNX Runtime profiles from session start, so warm-up runs
are the first model_run windows and are dropped by count. Nodes inside a subgraph (If, Loop) are
nested in their parent's event: the parent is counted by its self time, so nothing counts twice.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import shutil
import statistics
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.errors import BadInput
from modelkiln.runtime.backends.base import ModelSource, source_name
from modelkiln.runtime.backends.onnxruntime import OrtBackend, OrtOptions

log = logging.getLogger(__name__)

__all__ = ["NodeTime", "OpTypeTime", "ProfileSummary", "profile_model", "summarize_trace"]

_KERNEL_SUFFIX = "_kernel_time"
UNKNOWN_OP = "(unknown)"


@dataclass(frozen=True)
class OpTypeTime:
    """One op type over the profiled runs (times are kernel self time, ms)."""

    op_type: str
    providers: tuple[str, ...]
    total_ms: float
    share: float  # of all node time
    calls: int
    ms_per_run: float
    calls_per_run: float


@dataclass(frozen=True)
class NodeTime:
    """One node of the graph ONNX Runtime ran (a fused node is one node)."""

    name: str
    op_type: str
    provider: str
    total_ms: float
    share: float
    calls: int
    ms_per_run: float


@dataclass(frozen=True)
class ProfileSummary:
    """Per-op-type time of ``runs`` profiled runs, slowest first, and the run totals beside the
    node totals: what model_run spends outside kernels (framework overhead) shows as the gap."""

    model: str
    runs: int
    op_types: tuple[OpTypeTime, ...]
    top_nodes: tuple[NodeTime, ...]
    node_ms: dict[str, float]  # per-run sum of node time: mean, median, min
    run_ms: dict[str, float]  # per-run model_run time: mean, median, min
    skipped_events: int = 0  # Node events without a usable dur/ts, or outside every run
    inputs: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    trace: str | None = None  # the raw trace, where it was kept

    @property
    def overhead_ms(self) -> float:
        """Mean model_run time not spent in kernels."""
        return self.run_ms["mean"] - self.node_ms["mean"]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overhead_ms"] = self.overhead_ms
        return d


@dataclass(frozen=True)
class _Event:
    name: str
    op_type: str
    provider: str
    tid: Any
    ts: float
    dur: float


def load_trace(path: Path) -> list[dict[str, Any]]:
    """The events of a trace file (ONNX Runtime writes a JSON list; Chrome's object form works too)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"profile trace {path}: not a readable JSON trace ({exc})") from exc
    if isinstance(data, dict):
        data = data.get("traceEvents")
    if not isinstance(data, list) or not data:
        raise BadInput(
            f"profile trace {path}: expected a non-empty JSON list of trace events, got {type(data).__name__}"
            + (" (empty)" if isinstance(data, list) else "")
        )
    return [e for e in data if isinstance(e, dict)]


def summarize_trace(
    trace: Path | list[Any], skip_runs: int = 0, top: int = 10, model: str | None = None
) -> ProfileSummary:
    """Summarise a trace (a file or its events): drop the first ``skip_runs`` model_run windows
    (warm-up), then total each op type's and each node's self time over the runs left. Runs must
    not overlap in time (one caller, as :func:`profile_model` runs them)."""
    what = str(trace) if isinstance(trace, Path) else "profile trace"
    events = load_trace(trace) if isinstance(trace, Path) else [e for e in trace if isinstance(e, dict)]
    if not events:
        raise BadInput(f"{what}: no events")
    runs = sorted(
        (ts, ts + dur)
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
        for ts, dur in [(_number(e.get("ts")), _number(e.get("dur")))]
        if ts is not None and dur is not None
    )
    if len(runs) <= skip_runs:
        raise BadInput(
            f"{what}: {len(runs)} model_run events, expected more than the {skip_runs} warm-up runs "
            "(not an ONNX Runtime inference trace, or no run was profiled)"
        )
    starts = [start for start, _ in runs]
    kept: list[list[_Event]] = [[] for _ in runs]
    skipped = 0
    for e in events:
        name = e.get("name")
        if e.get("cat") != "Node" or not isinstance(name, str) or not name.endswith(_KERNEL_SUFFIX):
            continue  # fences, thread-pool and session events
        ts, dur = _number(e.get("ts")), _number(e.get("dur"))
        i = bisect.bisect_right(starts, ts) - 1 if ts is not None else -1
        if 0 <= i < skip_runs and ts is not None and ts <= runs[i][1]:
            continue  # a warm-up run's kernel
        if ts is None or dur is None or dur < 0 or i < 0 or ts > runs[i][1]:
            skipped += 1  # unusable, or outside every run
            continue
        args = e.get("args")
        args = args if isinstance(args, dict) else {}
        kept[i].append(
            _Event(
                name=name[: -len(_KERNEL_SUFFIX)],
                op_type=str(args.get("op_name") or UNKNOWN_OP),
                provider=str(args.get("provider") or ""),
                tid=e.get("tid"),
                ts=ts,
                dur=dur,
            )
        )
    runs, kept = runs[skip_runs:], kept[skip_runs:]
    if not any(kept):
        raise BadInput(f"{what}: no kernel (Node) events inside the {len(runs)} profiled runs")
    return _summary(model or what, runs, kept, skipped, top)


def _summary(
    model: str, runs: list[tuple[float, float]], per_run: list[list[_Event]], skipped: int, top: int
) -> ProfileSummary:
    ops: dict[str, list[float]] = {}  # op type -> [self us, calls]
    providers: dict[str, set[str]] = {}
    nodes: dict[tuple[str, str], list[float]] = {}
    node_provider: dict[tuple[str, str], str] = {}
    run_node_us = []
    for events in per_run:
        run_total = 0.0
        for e, own in zip(events, _self_times(events), strict=True):
            op = ops.setdefault(e.op_type, [0.0, 0])
            op[0] += own
            op[1] += 1
            providers.setdefault(e.op_type, set()).add(e.provider)
            node = nodes.setdefault((e.name, e.op_type), [0.0, 0])
            node[0] += own
            node[1] += 1
            node_provider[(e.name, e.op_type)] = e.provider
            run_total += own
        run_node_us.append(run_total)
    n = len(runs)
    total = sum(run_node_us)
    share = (lambda us: us / total) if total > 0 else (lambda us: 0.0)
    op_types = tuple(
        OpTypeTime(
            op_type=k,
            providers=tuple(sorted(p for p in providers[k] if p)),
            total_ms=us / 1e3,
            share=share(us),
            calls=int(calls),
            ms_per_run=us / 1e3 / n,
            calls_per_run=calls / n,
        )
        for k, (us, calls) in sorted(ops.items(), key=lambda kv: (-kv[1][0], kv[0]))
    )
    slowest = sorted(nodes.items(), key=lambda kv: (-kv[1][0], kv[0]))[: max(top, 0)]
    top_nodes = tuple(
        NodeTime(
            name=name,
            op_type=op_type,
            provider=node_provider[(name, op_type)],
            total_ms=us / 1e3,
            share=share(us),
            calls=int(calls),
            ms_per_run=us / 1e3 / n,
        )
        for (name, op_type), (us, calls) in slowest
    )
    return ProfileSummary(
        model=model,
        runs=n,
        op_types=op_types,
        top_nodes=top_nodes,
        node_ms=_stats([us / 1e3 for us in run_node_us]),
        run_ms=_stats([(end - start) / 1e3 for start, end in runs]),
        skipped_events=skipped,
    )


def _self_times(events: list[_Event]) -> list[float]:
    """Each event's duration less that of the events nested directly inside it on its thread
    (a subgraph's nodes inside their If/Loop/Scan), in the order of ``events``."""
    own = [e.dur for e in events]
    by_thread: dict[Any, list[int]] = {}
    for i, e in enumerate(events):
        by_thread.setdefault(e.tid, []).append(i)
    for indices in by_thread.values():
        indices.sort(key=lambda i: (events[i].ts, -events[i].dur))
        open_: list[int] = []  # stack of enclosing events
        for i in indices:
            e = events[i]
            while open_ and e.ts >= events[open_[-1]].ts + events[open_[-1]].dur:
                open_.pop()
            if open_ and e.ts + e.dur <= events[open_[-1]].ts + events[open_[-1]].dur:
                own[open_[-1]] -= e.dur
            open_.append(i)
    return [max(o, 0.0) for o in own]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "min": min(values)}


def profile_model(
    model: ModelSource,
    feed: Mapping[str, np.ndarray],
    runs: int = 20,
    warmup: int = 5,
    options: OrtOptions | None = None,
    top: int = 10,
    keep_trace: Path | None = None,
) -> ProfileSummary:
    """Profile ``runs`` runs of ``model`` on ``feed`` on a fresh session with ``options`` (threads,
    providers) and the profiler on; ``warmup`` runs go first and are left out of the summary.
    The trace lives in a temp dir, copied to ``keep_trace`` when given."""
    if runs < 1 or warmup < 0:
        raise BadInput(f"profile runs must be >= 1 and warm-up >= 0, got runs={runs}, warmup={warmup}")
    feed = dict(feed)
    with tempfile.TemporaryDirectory(prefix="kiln-profile-") as tmp:
        base = options or OrtOptions()
        backend = OrtBackend.load(model, dataclasses.replace(base, profile_prefix=Path(tmp) / "ort"))
        for _ in range(warmup + runs):
            backend.infer(feed)
        trace = backend.end_profiling()
        summary = summarize_trace(trace, skip_runs=warmup, top=top, model=source_name(model))
        if summary.runs != runs:
            log.warning("%s: trace holds %d profiled runs, %d were made", summary.model, summary.runs, runs)
        kept = None
        if keep_trace is not None:
            keep_trace.parent.mkdir(parents=True, exist_ok=True)
            kept = str(shutil.copyfile(trace, keep_trace))
    inputs = {k: list(np.shape(v)) for k, v in feed.items()}
    return dataclasses.replace(summary, inputs=inputs, trace=kept)
