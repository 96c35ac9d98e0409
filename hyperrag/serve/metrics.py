"""The service's Prometheus metrics (``GET /metrics``), in a registry of its own per app so
that several apps in one process (tests, Ray replicas in a worker) never share counters."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hyperrag.kv.store import KVStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)


class _StoreCollector:
    """The KV store's own counters (hits, misses, bytes), read at scrape time."""

    def __init__(self, store: Callable[[], KVStore]):
        self.store = store

    def collect(self):
        stats = self.store().stats
        for name, value, doc in (("hits", stats.hits, "document KV found in the store"),
                                 ("misses", stats.misses, "document KV not in the store (computed)"),
                                 ("puts", stats.puts, "document KV written"),
                                 ("put_bytes", stats.put_bytes, "bytes written"),
                                 ("load_bytes", stats.load_bytes, "stored bytes read and decoded"),
                                 ("errors", stats.errors, "failed or timed-out store calls")):
            yield CounterMetricFamily(f"hyperrag_kv_store_{name}", doc, value=value)
        yield GaugeMetricFamily("hyperrag_kv_store_available", "1 while the store answers", value=float(self.store().available))


class Metrics:
    def __init__(self, store: Callable[[], KVStore], queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hyperrag_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("hyperrag_request_seconds", "request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_requests = Histogram("hyperrag_batch_requests", "requests answered by one shared model call",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.documents = Histogram("hyperrag_request_documents", "documents per rerank/answer request",
                                   buckets=SIZE_BUCKETS, registry=r)
        self.kv = Counter("hyperrag_kv_documents", "documents whose KV was reused or computed", ["kv"], registry=r)
        Gauge("hyperrag_queue_depth", "requests waiting for the model", registry=r).set_function(queue_depth)
        r.register(_StoreCollector(store))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
