"""Prometheus metrics of one server (its own registry, so two servers in a process do not mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.inflight = Gauge(
            "kiln_inflight_requests", "Requests being handled", ["model"], registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
