"""PNG of latency percentiles and throughput across bench configurations (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from modelkiln._deps import require
from modelkiln.bench.runner import BenchResult


def plot_results(results: list[BenchResult], path: str | Path) -> Path:
    """Left: p50/p90/p99 latency per configuration; right: throughput per configuration."""
    mpl = require("matplotlib", "bench plots")
    mpl.use("Agg")
    plt = require("matplotlib.pyplot", "bench plots")
    labels = [f"b{r.batch}×c{r.concurrency}" for r in results]
    x = range(len(results))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(results) + 5), 4.2))
    for key, marker in (("median", "o"), ("p90", "s"), ("p99", "^")):
        ax1.plot(x, [r.latency_ms[key] for r in results], marker=marker, label=key)
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("latency per call (ms)")
    ax1.set_title("latency")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.bar(list(x), [r.throughput for r in results], color="tab:green")
    ax2.set_xticks(list(x), labels)
    ax2.set_ylabel("items / s")
    ax2.set_title("throughput")
    ax2.grid(alpha=0.3, axis="y")
    name = results[0].model if results else ""
    fig.suptitle(f"{name} on {results[0].backend if results else ''} (batch × concurrency)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
