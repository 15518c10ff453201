"""Benchmarking: warm-up, timed loop, latency percentiles and throughput (trtexec-style)."""

from modelkiln.bench.runner import BenchResult, benchmark, synthesize_feed

__all__ = ["BenchResult", "benchmark", "synthesize_feed"]
