"""Health and Prometheus metrics over HTTP, for every long-running walsaga process.

``/metrics`` is the Prometheus text format (the process's own instruments plus
the standard ``process_*`` and ``python_*`` ones); ``/healthz`` answers 200
while the process says it is healthy, 503 otherwise, with a JSON report.
Served by prometheus_client's WSGI app on the standard library's threading
WSGI server, in a daemon thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    make_wsgi_app,
)

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]

#: Histogram buckets for the latencies of a hop's stages: 1 ms to 30 s.
LATENCY_BUCKETS = (
    0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def new_registry() -> CollectorRegistry:
    """A registry with the standard process, platform and GC collectors in it."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


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
