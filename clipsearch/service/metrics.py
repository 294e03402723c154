"""Prometheus metrics, on a registry per app (so several apps can live in one process).

With several server processes (`clipsearch serve --workers N`), prometheus_client's
multiprocess mode is on (`PROMETHEUS_MULTIPROC_DIR`, set by the CLI): every process writes
its values to files there and `/metrics`, whichever process answers, reports all of them
together: counters and histograms summed, queue depth summed over live processes, model
and index facts as the most recent value.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_MODEL_LABELS = ("spec", "pretrained", "fingerprint", "dim", "context_length", "image_size", "device", "dtype")


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


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
        self.queue_depth = Gauge("clipsearch_queue_depth", "items waiting for the model", ["modality"], registry=r,
                                 multiprocess_mode="livesum")
        self.connections_refused = Counter(
            "clipsearch_connections_refused", "connections closed at once: max_connections were open", registry=r
        )
        self.items = Counter("clipsearch_items_encoded", "items encoded", ["modality"], registry=r)
        self.index_size = Gauge("clipsearch_index_size", "vectors in the served index", ["index"], registry=r,
                                multiprocess_mode="livemostrecent")
        self.index_load_failures = Counter(
            "clipsearch_index_load_failures", "index versions refused (corrupt or mismatched)", registry=r
        )
        # Facts as labels on a gauge of 1 (what prometheus_client's Info renders, but Info
        # has no multiprocess mode). A replaced index version drops to 0.
        self._model_info = Gauge("clipsearch_model_info", "the served model", _MODEL_LABELS, registry=r,
                                 multiprocess_mode="livemostrecent")
        self._index_info = Gauge("clipsearch_index_info", "the served index version (1) and replaced ones (0)",
                                 ["version", "path"], registry=r, multiprocess_mode="livemostrecent")
        self._served_index: tuple[str, str] | None = None

    def set_model(self, info: dict[str, Any]) -> None:
        self._model_info.labels(*(str(info.get(k)) for k in _MODEL_LABELS)).set(1)

    def set_index(self, version: str, path: str) -> None:
        if self._served_index is not None and self._served_index != (version, path):
            self._index_info.labels(*self._served_index).set(0)
        self._index_info.labels(version, path).set(1)
        self._served_index = (version, path)

    def exposition(self) -> bytes:
        """The text format: this process's registry, or every process's values in multiprocess mode."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    @staticmethod
    def process_exit() -> None:
        """Drop this process's live gauges from the shared files (multiprocess mode only)."""
        if multiprocess_dir() is not None:
            multiprocess.mark_process_dead(os.getpid())
