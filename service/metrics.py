"""Prometheus metrics, on a registry per app (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "clipsearch_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "clipsearch_request_seconds", "HTTP request latency by route", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "clipsearch_batch_size", "items per model call", ["modality"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("clipsearch_queue_depth", "items waiting for the model", ["modality"], registry=r)
        self.items = Counter("clipsearch_items_encoded", "items encoded", ["modality"], registry=r)
        self.index_size = Gauge("clipsearch_index_size", "vectors in the served index", ["index"], registry=r)
        self.index_version = Info("clipsearch_index", "the served index version", registry=r)
        self.index_load_failures = Counter(
            "clipsearch_index_load_failures", "index versions refused (corrupt or mismatched)", registry=r
        )
        self.model_info = Info("clipsearch_model", "the served model", registry=r)
