"""The relay process: one stream per source, health and metrics, clean shutdown.

Each source streams in a thread of its own with its own producer, so a slow
or broken source does not hold the others. SIGTERM and SIGINT stop reading,
give Kafka what is left of ``[relay] shutdown_timeout_s`` to acknowledge what
is in flight, confirm it, and exit 0; a stop that overruns the bound (Kafka
gone, say) or a second signal exits 143 at once. A source that cannot run at
all (wrong wal_level, lost slot) stops the process with a non-zero status, so
a supervisor notices.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog

from relay.config import RelayConfig
from relay.metrics import RelayMetrics
from relay.stream import SourceStream
from relay.wal2json import format_lsn
from walsaga.errors import SetupError, SlotLostError
from walsaga.http import serve_http
from walsaga.lifecycle import Shutdown

log = structlog.get_logger("walsaga.relay")

EXIT_OK = 0
EXIT_SETUP = 2
EXIT_SLOT_LOST = 3


class Relay:
    """Runs every source of a :class:`RelayConfig` until stopped."""

    def __init__(self, config: RelayConfig, *, metrics: RelayMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or RelayMetrics()
        self.stop_event = threading.Event()
        self.streams = [
            SourceStream(source, config, self.metrics, self.stop_event) for source in config.source
        ]
        self._threads: list[threading.Thread] = []
        self._failures: list[BaseException] = []
        self.http_port: int | None = None
        self._server: Any = None

    def health(self) -> tuple[bool, dict[str, Any]]:
        sources = {}
        ok = True
        for stream in self.streams:
            st = stream.status
            p50, p99 = stream.latencies.percentiles(0.5, 0.99)
            sources[stream.source.name] = {
                "state": st.state,
                "detail": st.detail,
                "since": st.since,
                "slot": stream.source.slot_name,
                "confirmed_lsn": format_lsn(st.confirmed_lsn),
                "slot_lag_bytes": st.slot_lag_bytes,
                "events_published": st.events_published,
                "commit_to_ack_ms": {
                    "p50": None if p50 is None else round(p50 * 1000, 2),
                    "p99": None if p99 is None else round(p99 * 1000, 2),
                },
                "stages_ms": stream.stages.report(),
            }
            if st.state not in ("streaming", "standby", "starting"):
                ok = False
        return ok, {"status": "ok" if ok else "degraded", "sources": sources}

    def start(self) -> None:
        port = self.config.relay.http_port
        if port is not None:
            self._server, _ = serve_http(
                self.config.relay.http_host, port, self.metrics.registry, self.health
            )
            self.http_port = self._server.server_port
            log.info("serving /healthz and /metrics", port=self.http_port)
        for stream in self.streams:
            thread = threading.Thread(
                target=self._run_stream, args=(stream,), name=f"source-{stream.source.name}"
            )
            thread.start()
            self._threads.append(thread)

    def _run_stream(self, stream: SourceStream) -> None:
        try:
            stream.run()
        except BaseException as e:
            self._failures.append(e)
            self.stop_event.set()

    def stop(self) -> None:
        self.stop_event.set()

    def wait(self) -> int:
        """Once the relay is stopping (:meth:`stop`, or a source that cannot run),
        block until every stream has ended; return the process exit status."""
        # Stopping the HTTP server takes up to half a second (its poll
        # interval): that runs while the streams drain, not after.
        http = threading.Thread(target=self._stop_http, name="relay-http-stop", daemon=True)
        http.start()
        while any(t.is_alive() for t in self._threads):
            for thread in self._threads:
                thread.join(timeout=0.2)
        http.join()
        for failure in self._failures:
            if isinstance(failure, SlotLostError):
                return EXIT_SLOT_LOST
        return EXIT_SETUP if self._failures else EXIT_OK

    def _stop_http(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def failures(self) -> list[BaseException]:
        return list(self._failures)


def run(config: RelayConfig) -> int:
    """Run the relay in the foreground until SIGTERM/SIGINT; return the exit status.

    A stop takes at most ``[relay] shutdown_timeout_s``: in-flight events get
    most of it to be acknowledged and confirmed; past it the process exits
    anyway (a second signal: at once), and the next run sends again what was
    not confirmed.
    """
    relay = Relay(config)
    shutdown = Shutdown(grace_s=config.relay.shutdown_timeout_s, name="relay")
    shutdown.on_stop(relay.stop)
    shutdown.install()
    relay.start()
    while not relay.stop_event.wait(0.5):
        pass
    status = relay.wait()
    for failure in relay.failures:
        kind = "slot lost" if isinstance(failure, SlotLostError) else "cannot run"
        if not isinstance(failure, SetupError | SlotLostError):
            kind = "crashed"
        log.error(f"relay stopped: {kind}", error=str(failure))
    # How long the stop took, from the signal (0 when a failure ended the relay).
    log.info("relay exited", status=status, shutdown_s=shutdown.done())
    return status
