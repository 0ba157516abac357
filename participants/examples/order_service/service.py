"""One order service process as a whole: its settings, and the service that starts
and stops the consumer, the notifications, the webhook sender and the database
pool together, and creates, reads and waits on orders."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import Counter
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool

from participants.examples import orders
from participants.examples.order_service.admission import Admission
from participants.examples.order_service.api import PENDING, NewOrder, pending_order, sse_event
from participants.examples.order_service.connections import KEEPALIVES
from participants.examples.order_service.directory import CustomerDirectory
from participants.examples.order_service.notices import OrderNotices
from participants.examples.order_service.webhooks import WebhookPolicy, WebhookSender
from participants.orchestrator import Orchestrator
from participants.runtime import Participant
from walsaga.errors import SetupError
from walsaga.tracing import TraceContext

log = structlog.get_logger("walsaga.order_service")


@dataclass(frozen=True)
class OrderServiceSettings:
    dsn: str
    bootstrap_servers: str
    mode: orders.Mode
    #: Extra librdkafka settings for the consumer.
    kafka: Mapping[str, Any] = field(default_factory=dict)
    #: The participant's name: its consumer group and inbox key.
    name: str = "order-service"
    #: Read-only DSN of the customer directory (a database with ``customers(id)``).
    customers_dsn: str | None = None
    #: Longer ``?wait=`` values are cut to this.
    max_wait_s: float = 60.0
    pool_size: int = 10
    #: Consumer threads handling replies and events (each takes some partitions).
    workers: int = 1
    sse_keepalive_s: float = 15.0
    webhook: WebhookPolicy = field(default_factory=WebhookPolicy)
    #: How long a stop may take, from the request to the end of :meth:`OrderService.stop`.
    shutdown_timeout_s: float = 5.0
    #: Orders still pending (sagas under way) past which new ones are refused
    #: with 503 and Retry-After; 0 admits everything.
    max_backlog: int = 2000


class OrderService:
    """Everything one order service process runs, started and stopped as a whole."""

    def __init__(
        self, settings: OrderServiceSettings, *, on_fatal: Callable[[], None] | None = None
    ) -> None:
        self.settings = settings
        self.on_fatal = on_fatal
        self.orchestrator: Orchestrator | None = (
            orders.orchestrator() if settings.mode == "orchestration" else None
        )
        self.participant: Participant = orders.participant(
            dsn=settings.dsn,
            kafka={"bootstrap.servers": settings.bootstrap_servers, **settings.kafka},
            mode=settings.mode,
            orchestrator=self.orchestrator,
            name=settings.name,
            workers=settings.workers,
            shutdown_timeout_s=settings.shutdown_timeout_s,
        )
        registry = self.participant.metrics.registry
        self.created = Counter(
            "walsaga_orders_created", "Orders accepted over HTTP", ["mode"], registry=registry
        )
        webhook_calls = Counter(
            "walsaga_order_webhook_calls",
            "Webhook calls, by outcome (delivered, retry, failed: given up)",
            ["outcome"],
            registry=registry,
        )
        # Autocommit: a read or a one-statement write is one round trip, not
        # three (BEGIN, the statement, COMMIT); the order's creation, the one
        # write of several statements, opens its transaction itself.
        self.pool: ConnectionPool[Any] = ConnectionPool(
            settings.dsn,
            min_size=2,
            max_size=settings.pool_size,
            open=False,
            timeout=10.0,
            kwargs={**KEEPALIVES, "autocommit": True},
            name="order-service",
        )
        self.notices = OrderNotices(settings.dsn)
        self.admission = Admission(self.pool, max_backlog=settings.max_backlog)
        self.notices.listeners.append(self.admission.settled)
        self.webhooks = WebhookSender(
            self.pool,
            settings.webhook,
            wake=self.notices.watch(webhooks_only=True),
            calls=webhook_calls,
        )
        self.directory = (
            CustomerDirectory(settings.customers_dsn) if settings.customers_dsn else None
        )
        #: Why the service stopped on its own (the consumer died), if it did.
        self.failure: str | None = None
        self._thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: When the stop was asked for (monotonic): the start of its bound.
        self._stop_requested: float | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await run_in_threadpool(self.pool.open, True, 30.0)
        if self.directory is not None:
            self.directory.open()
        listener = asyncio.create_task(self.notices.run(), name="order notifications")
        self._tasks.append(listener)
        # Serve no waiter before the LISTEN is in place.
        try:
            await asyncio.wait_for(self.notices.listening.wait(), 30)
        except TimeoutError:
            raise SetupError(
                "cannot LISTEN for order notifications: database unreachable"
            ) from None
        self._thread = threading.Thread(
            target=self._consume, name=f"participant-{self.participant.name}", daemon=True
        )
        self._thread.start()
        self._tasks.append(asyncio.create_task(self.webhooks.run(), name="webhooks"))
        self._tasks.append(asyncio.create_task(self.admission.run(), name="admission"))
        self._tasks.append(asyncio.create_task(self._watch_consumer(), name="consumer watch"))
        log.info("order service started", mode=self.settings.mode, name=self.participant.name)

    def _consume(self) -> None:
        try:
            self.participant.run()
        except BaseException as e:
            self.failure = f"the consumer stopped: {type(e).__name__}: {e}"

    async def _watch_consumer(self) -> None:
        while self._thread is not None and self._thread.is_alive():
            await asyncio.sleep(0.5)
        if self._stop_requested is not None:
            return
        self.failure = self.failure or "the consumer stopped"
        log.error("order service stopping", reason=self.failure)
        self.begin_shutdown()
        if self.on_fatal is not None:
            self.on_fatal()

    def begin_shutdown(self) -> None:
        """Stop taking work now (any thread, a signal handler's too): answer every
        waiting request, end every event stream, stop the consumer and the webhook
        sender. :meth:`stop` ends within ``shutdown_timeout_s`` of the first call."""
        if self._stop_requested is None:
            self._stop_requested = time.monotonic()
        self.participant.stop()
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._stop_taking_work)

    def _stop_taking_work(self) -> None:
        self.notices.close()
        self.webhooks.stop()

    def _left_s(self, fraction: float) -> float:
        """Time left until `fraction` of the stop's bound has passed."""
        assert self._stop_requested is not None
        bound = self.settings.shutdown_timeout_s
        return max(0.0, self._stop_requested + bound * fraction - time.monotonic())

    async def stop(self) -> None:
        """Finish the stop within the bound: the consumer stopped (its offsets
        committed if Kafka answers in time), the webhook call under way finished
        or cut short, the pools closed. Nothing is lost by what is cut short: a
        webhook call is made again once its lease runs out (receivers drop
        repeats by ``Walsaga-Delivery``), records not committed are consumed
        again after the restart and the inbox drops repeats."""
        self.begin_shutdown()
        self._stop_taking_work()
        tasks = {t.get_name(): t for t in self._tasks}
        sender = tasks.pop("webhooks", None)
        if sender is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(sender, self._left_s(0.5))
        if self._thread is not None:
            # The participant gives up on Kafka at 80% of the bound by itself.
            await run_in_threadpool(self._thread.join, self._left_s(0.9))
            if self._thread.is_alive():
                log.warning("the consumer did not stop in time: leaving it")
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        if self.directory is not None:
            await run_in_threadpool(self.directory.close, max(0.1, self._left_s(1.0)))
        await run_in_threadpool(self.pool.close, max(0.1, self._left_s(1.0)))
        log.info("order service stopped")

    def health(self) -> tuple[bool, dict[str, Any]]:
        alive = self._thread is not None and self._thread.is_alive()
        consuming = alive and self.participant.ready.is_set()
        listening = self.notices.listening.is_set()
        ok = consuming and listening and not self.notices.closing
        report = {
            "service": self.participant.name,
            "mode": self.settings.mode,
            "consuming": consuming,
            "listening": listening,
            "stopping": self.notices.closing,
            "waiting_requests": self.notices.waiting,
            "pending_orders": self.admission.backlog().pending,
            "refused_overloaded": self.admission.refused,
            "stages_ms": self.participant.hops.report(),
        }
        if self.failure:
            report["failure"] = self.failure
        return ok, report

    # -- orders --------------------------------------------------------------------

    async def create(self, new: NewOrder, *, trace: TraceContext | None = None) -> dict[str, Any]:
        """Insert the order and start its saga; every event of it carries `trace` when given."""
        order_id = str(uuid.uuid4())

        def insert() -> None:
            with self.pool.connection() as conn, conn.transaction():
                orders.create_order(
                    conn,
                    new.customer_id,
                    new.total,
                    mode=self.settings.mode,
                    orchestrator=self.orchestrator,
                    webhook_url=str(new.webhook_url) if new.webhook_url is not None else None,
                    order_id=order_id,
                    trace=trace,
                )

        await run_in_threadpool(insert)
        self.created.labels(self.settings.mode).inc()
        self.admission.admitted()
        return pending_order(order_id, new)

    def _read(self, order_id: str) -> dict[str, Any] | None:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "SELECT id, customer_id, total, status, reason FROM orders WHERE id = %s",
                (order_id,),
            ).fetchone()
        return orders.order_json(row) if row is not None else None

    async def read(self, order_id: str) -> dict[str, Any] | None:
        return await run_in_threadpool(self._read, order_id)

    async def wait_settled(self, order_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The order once it is no longer PENDING, or as it is when `timeout_s` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with self.notices.subscribe(order_id) as changed:
            while True:
                changed.clear()
                # Read after subscribing: an order settled just before is seen here.
                order = await self.read(order_id)
                remaining = deadline - loop.time()
                if order is None or order["status"] != PENDING:
                    return order
                if remaining <= 0 or self.notices.closing:
                    return order
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), remaining)

    async def status_events(self, order_id: str) -> AsyncIterator[bytes]:
        """Server-sent events: the order now, then each status it moves to, until settled."""
        sent: str | None = None
        with self.notices.subscribe(order_id) as changed:
            while True:
                changed.clear()
                order = await self.read(order_id)
                if order is None:
                    return
                if order["status"] != sent:
                    sent = order["status"]
                    yield sse_event(order)
                if sent != PENDING or self.notices.closing:
                    return
                try:
                    await asyncio.wait_for(changed.wait(), self.settings.sse_keepalive_s)
                except TimeoutError:
                    yield b": keep-alive\n\n"
