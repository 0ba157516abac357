"""Running the order service as a process: its tables installed where missing,
then the app on uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import psycopg
import structlog
import uvicorn

from participants.examples import orders
from participants.examples.order_service.app import create_app
from participants.examples.order_service.service import OrderService, OrderServiceSettings
from walsaga import schema
from walsaga.errors import SetupError, from_psycopg
from walsaga.lifecycle import Shutdown

log = structlog.get_logger("walsaga.order_service")


def ensure_installed(dsn: str) -> list[str]:
    """Install the order service's tables where missing; returns what was missing."""
    try:
        conn = psycopg.connect(dsn, connect_timeout=10)
    except psycopg.Error as e:
        raise from_psycopg(e, "cannot connect to the order service's database") from e
    with conn:
        with conn.transaction():
            missing = [
                f"the walsaga {c} schema" for c in ("core", "saga") if schema.pending(conn, c)
            ]
            for table in ("orders", "webhook_deliveries"):
                row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
                if not (row and row[0]):
                    missing.append(f"the {table} table")
        if not missing:
            return []
        try:
            with conn.transaction():
                orders.install(conn)
        except psycopg.errors.InsufficientPrivilege as e:
            raise SetupError(
                f"the order service's database lacks {', '.join(missing)}, and this role may "
                f"not create them ({e.diag.message_primary}); run this command once with the "
                "DSN of a role that may (the database owner), then with this one"
            ) from e
        except psycopg.Error as e:
            raise from_psycopg(e, "cannot install the order service's tables") from e
    return missing


class _Server(uvicorn.Server):
    """uvicorn, with the process's stop bounded by a :class:`Shutdown`: the first
    SIGTERM or SIGINT tells the service at once (it stops taking work) and arms the
    watchdog, a second one exits at once. A completed stop exits 0 (uvicorn itself
    would raise the signal again once done, so the process would end "killed by
    SIGTERM")."""

    def __init__(self, config: uvicorn.Config, *, shutdown: Shutdown) -> None:
        super().__init__(config)
        self.stop_request = shutdown  # not `shutdown`: uvicorn's own coroutine of that name
        shutdown.on_stop(self._exit_soon)

    def _exit_soon(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stop_request.handle(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def serve(
    settings: OrderServiceSettings, *, host: str, port: int, log_level: str = "info"
) -> str | None:
    """Run the service until SIGTERM or SIGINT. Returns why it stopped on its
    own (None after a requested stop).

    The stop takes at most ``settings.shutdown_timeout_s`` from the signal:
    requests still open get part of it (waiting requests and event streams
    are answered at once), the service's own stop the rest; past it the
    process exits 143 (see :mod:`walsaga.lifecycle`).
    """
    shutdown = Shutdown(grace_s=settings.shutdown_timeout_s, name=settings.name)
    app = create_app(settings, on_fatal=shutdown.request)
    service: OrderService = app.state.service
    shutdown.on_stop(service.begin_shutdown)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        access_log=False,
        log_level=log_level,
        # walsaga.logs has set logging up: uvicorn's lines go through the same
        # renderer (JSON lines in JSON mode) instead of uvicorn's own config.
        log_config=None,
        # Waiting requests and event streams end at once on a stop; this bounds
        # what is left (a slow client) to a part of the stop's bound (uvicorn
        # counts it in whole seconds).
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_s * 0.3)),
    )
    server = _Server(config, shutdown=shutdown)
    try:
        server.run()
    except SystemExit:  # uvicorn's answer to a failed startup, logged above
        shutdown.done()
        return service.failure or "the service did not start"
    took_s = shutdown.done()
    if not server.started:
        return service.failure or "the service did not start"
    log.info("order service exited", shutdown_s=took_s)
    return service.failure
