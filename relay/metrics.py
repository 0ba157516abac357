"""Prometheus metrics and the health report of the relay, served over HTTP.

``/metrics`` is the Prometheus text format; ``/healthz`` answers 200 while every
source is streaming or standing by, 503 otherwise, with a JSON body per source.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

LATENCY_BUCKETS = (
    0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class RelayMetrics:
    """The relay's instruments, labelled by source."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "walsaga_relay_events_published", "Events acknowledged by Kafka", ["source"], registry=r
        )
        self.bytes = Counter(
            "walsaga_relay_bytes_published",
            "Key and value bytes of acknowledged events",
            ["source"],
            registry=r,
        )
        self.errors = Counter(
            "walsaga_relay_errors", "Errors, by kind", ["source", "kind"], registry=r
        )
        self.in_flight = Gauge(
            "walsaga_relay_in_flight", "Events sent to Kafka and not yet acknowledged",
            ["source"], registry=r,
        )  # fmt: skip
        self.slot_lag = Gauge(
            "walsaga_relay_slot_lag_bytes",
            "WAL retained for the slot: server WAL end minus confirmed position",
            ["source"],
            registry=r,
        )
        self.confirmed = Gauge(
            "walsaga_relay_confirmed_lsn", "Position confirmed to the slot", ["source"], registry=r
        )
        self.streaming = Gauge(
            "walsaga_relay_streaming", "1 while this instance streams the source", ["source"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "walsaga_relay_commit_to_ack_seconds",
            "From the Postgres commit of an event to Kafka's acknowledgement",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.restarts = Counter(
            "walsaga_relay_stream_restarts", "Streaming sessions restarted after an error",
            ["source"], registry=r,
        )  # fmt: skip


class LatencyWindow:
    """The most recent commit-to-ack latencies, for exact percentiles in /healthz."""

    def __init__(self, size: int = 20000) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, seconds: float, count: int = 1) -> None:
        for _ in range(min(count, 64)):
            self._samples.append(seconds)

    def percentiles(self, *qs: float) -> list[float | None]:
        samples = sorted(self._samples)
        if not samples:
            return [None for _ in qs]
        return [samples[min(len(samples) - 1, int(q * len(samples)))] for q in qs]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


HealthFn = Callable[[], tuple[bool, dict[str, Any]]]


def serve_http(
    host: str, port: int, registry: CollectorRegistry, health: HealthFn
) -> tuple[WSGIServer, threading.Thread]:
    """Serve /healthz and /metrics in a daemon thread; port 0 picks a free one."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok, report = health()
            body = orjson.dumps(report, option=orjson.OPT_INDENT_2)
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="walsaga-http", daemon=True)
    thread.start()
    return server, thread
