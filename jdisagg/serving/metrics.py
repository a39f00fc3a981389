"""Prometheus metrics of a server: latency histograms, queue and memory gauges, and request
counts by finish reason and by status code. Each server has its own registry, exported on
its own port by ``start``.

Every request the server accepted ends in exactly one ``jdisagg_requests_total`` count, by
finish reason: ``stop``, ``length``, ``cancelled`` (the client cancelled), ``deadline`` (the
client's deadline passed) or ``error`` (a worker failed). Every call that ended with a status
other than OK, rejections included, counts once in ``jdisagg_request_errors_total{code}``.
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client as prom

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BYTES_BUCKETS = tuple(2**i for i in range(10, 36, 2))
FINISH_REASONS = ("stop", "length", "cancelled", "deadline", "error")


class Metrics:
    def __init__(self):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.ttft = prom.Histogram("jdisagg_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = prom.Histogram(
            "jdisagg_tpot_seconds", "Mean time per output token after the first", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue = prom.Histogram(
            "jdisagg_queue_seconds", "Time waiting for prefill", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.transfer = prom.Histogram(
            "jdisagg_kv_transfer_seconds",
            "KV transfer per request, until the KV is on the decode devices",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.transfer_bytes = prom.Histogram(
            "jdisagg_kv_transfer_bytes", "KV bytes moved per request", buckets=_BYTES_BUCKETS, registry=r
        )
        self.queue_depth = prom.Gauge("jdisagg_prefill_queue_depth", "Requests waiting for prefill", registry=r)
        self.prefilled = prom.Gauge("jdisagg_prefilled_requests", "Prefixes waiting to be pulled", registry=r)
        self.running = prom.Gauge("jdisagg_running_requests", "Requests decoding", ["instance"], registry=r)
        self.pages_used = prom.Gauge("jdisagg_kv_pages_used", "KV pages in use", ["instance"], registry=r)
        self.pages_total = prom.Gauge("jdisagg_kv_pages_total", "KV pages in the pool", ["instance"], registry=r)
        self.finished = prom.Counter(
            "jdisagg_requests", "Accepted requests, by how they ended", ["finish_reason"], registry=r
        )
        self.errors = prom.Counter(
            "jdisagg_request_errors", "Calls that ended with an error status", ["code"], registry=r
        )
        for reason in FINISH_REASONS:
            self.finished.labels(reason)  # every series exists from the start, at 0

    def watch(self, load: Callable, decode_instances: int) -> None:
        """Gauges read from ``load()`` (a ``sched.scheduler.Load``) when scraped."""
        self.queue_depth.set_function(lambda: load().queued)
        self.prefilled.set_function(lambda: sum(load().prefilled))
        for i in range(decode_instances):
            self.running.labels(str(i)).set_function(lambda i=i: load().running[i])
            self.pages_used.labels(str(i)).set_function(lambda i=i: load().pages_used[i])
            self.pages_total.labels(str(i)).set_function(lambda i=i: load().pages_total[i])

    def start(self, port: int, host: str = "127.0.0.1"):
        """Serves ``/metrics`` on ``host:port``; returns the HTTP server."""
        server, _ = prom.start_http_server(port, addr=host, registry=self.registry)
        return server
