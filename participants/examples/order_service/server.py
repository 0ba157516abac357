"""Running the order service as a process: its tables installed where missing,
then the app on uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

import psycopg
import uvicorn

from participants.examples import orders
from participants.examples.order_service.app import create_app
from participants.examples.order_service.service import OrderService, OrderServiceSettings
from walsaga import schema
from walsaga.errors import SetupError, from_psycopg


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
    """uvicorn, telling the service at once when asked to stop, and exiting 0
    after a stop it completed (uvicorn itself raises the signal again once it
    is done, so the process would end "killed by SIGTERM")."""

    def __init__(self, config: uvicorn.Config, *, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_stop = on_stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_stop()
        super().handle_exit(sig, frame)

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
    own (None after a requested stop)."""
    server: _Server | None = None

    def fatal() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=fatal)
    service: OrderService = app.state.service
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        access_log=False,
        log_level=log_level,
        # Waiting requests and event streams end at once on a stop; this
        # bounds only what is left (a slow client).
        timeout_graceful_shutdown=10,
    )
    server = _Server(config, on_stop=service.begin_shutdown)
    try:
        server.run()
    except SystemExit:  # uvicorn's answer to a failed startup, logged above
        return service.failure or "the service did not start"
    if not server.started:
        return service.failure or "the service did not start"
    return service.failure
