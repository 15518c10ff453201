"""Prometheus metrics of one server (its own registry, so two servers in a process do not mix).

Label values are only ever loaded models' names (or "unknown"): the HTTP layer maps every other
name before it reaches here, so junk names cannot grow /metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelkiln.serve.budget import ModelMemory


class MemorySource(Protocol):
    """What the memory metrics read at each scrape (the ModelServer)."""

    def memory_stats(self) -> list[ModelMemory]: ...


class _MemoryCollector(Collector):
    """Read at scrape time, so the budget's thread never touches Prometheus objects."""

    def __init__(self, source: MemorySource, budget_bytes: int | None) -> None:
        self.source, self.budget_bytes = source, budget_bytes

    def collect(self) -> Iterator[Metric]:
        rows = self.source.memory_stats()
        resident = GaugeMetricFamily(
            "kiln_model_resident_bytes",
            "Memory a model holds now (its measured cost when loaded)",
            labels=["model"],
        )
        cost = GaugeMetricFamily(
            "kiln_model_cost_bytes",
            "A model's measured cost at its last load (estimated before)",
            labels=["model"],
        )
        loads = CounterMetricFamily("kiln_model_loads", "Loads under the memory budget", labels=["model"])
        evictions = CounterMetricFamily(
            "kiln_model_evictions", "Unloads to make room under the memory budget", labels=["model"]
        )
        seconds = CounterMetricFamily(
            "kiln_model_load_seconds", "Time spent loading (sessions and warm-up)", labels=["model"]
        )
        kv = GaugeMetricFamily(
            "kiln_chat_kv_reserved_bytes",
            "KV-cache bytes a chat model's running sequences hold in the memory budget",
            labels=["model"],
        )
        kv_evictions = CounterMetricFamily(
            "kiln_chat_kv_evictions",
            "Models unloaded to make room for a chat model's KV-cache reservations",
            labels=["model"],
        )
        for r in rows:
            resident.add_metric([r.name], r.resident_bytes)
            cost.add_metric([r.name], r.cost_bytes)
            loads.add_metric([r.name], r.loads)
            evictions.add_metric([r.name], r.evictions)
            seconds.add_metric([r.name], r.load_seconds)
            if r.kv_reserved_bytes is not None:
                kv.add_metric([r.name], r.kv_reserved_bytes)
                kv_evictions.add_metric([r.name], r.kv_evictions)
        yield from (resident, cost, loads, evictions, seconds, kv, kv_evictions)
        if self.budget_bytes is not None:
            yield GaugeMetricFamily(
                "kiln_memory_budget_bytes", "kiln serve --memory-budget", value=self.budget_bytes
            )


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "version"]
        self.success = Counter(
            "kiln_request_success", "Successful inference requests", labels, registry=self.registry
        )
        self.failure = Counter(
            "kiln_request_failure", "Failed inference requests", [*labels, "reason"], registry=self.registry
        )
        self.queue = Histogram(
            "kiln_queue_duration_seconds",
            "Time a request waited before its batch ran",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute = Histogram(
            "kiln_compute_duration_seconds",
            "Inference time of the batch a request ran in",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "kiln_batch_size",
            "Batch size (samples) a request ran in",
            labels,
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.request = Histogram(
            "kiln_request_duration_seconds",
            "End-to-end request time in the server",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.disconnects = Counter(
            "kiln_client_disconnects",
            "Requests whose client went away before the answer (not server failures)",
            ["route"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "kiln_inflight_requests", "Requests being handled", ["model"], registry=self.registry
        )

        self.tokens = Counter(
            "kiln_generated_tokens", "Tokens generated by chat completions", ["model"], registry=self.registry
        )
        self.first_token = Histogram(
            "kiln_time_to_first_token_seconds",
            "From accepting a chat to its first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def watch_memory(self, source: MemorySource, budget_bytes: int | None) -> None:
        """Export a memory-budgeted server's per-model bytes, loads, evictions and load time."""
        self.registry.register(_MemoryCollector(source, budget_bytes))

    def observe_chat(self, model: str, result: Any) -> None:
        """A finished chat completion (a serve.generation.ChatResult)."""
        self.success.labels(model, "").inc()
        self.tokens.labels(model).inc(result.completion_tokens)
        self.first_token.labels(model).observe(result.first_token_s)
        self.request.labels(model, "").observe(result.total_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
