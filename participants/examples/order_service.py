"""The order service as a process: its public HTTP API and the consumer that settles orders.

One process serves the API (Starlette on uvicorn) and runs the order service's
participant in a thread (with the ``create-order`` orchestrator attached in the
orchestration variant). A client learns how its order ended in one of three
ways: it waits (``POST /orders?wait=SECONDS``), polls (``GET /orders/{id}``), or
is told — server-sent events (``GET /orders/{id}/events``) or a webhook URL
given at creation.

Unknown customers: the order service does not own customers, the customer
service does, and it refuses a reservation for a customer it does not know.
So an order for an unknown customer is accepted and ends ``REJECTED`` with
the reason (``unknown customer ...``). When the service is given a customer
directory (``customers_dsn``, read-only), ``POST /orders`` also answers 422 at
once for a customer missing there; the saga stays the authority (a customer
can appear or vanish between the check and the reservation), so a directory
that cannot be reached lets the order through rather than failing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import FrameType
from typing import Annotated, Any

import httpx
import orjson
import psycopg
import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from participants.examples import orders
from participants.orchestrator import Orchestrator
from participants.runtime import Participant
from walsaga import schema
from walsaga.errors import SetupError, from_psycopg

log = structlog.get_logger("walsaga.order_service")

PENDING = "PENDING"

# Keep-alive settings for every connection: a peer that vanished without a
# word (a network partition) is noticed within about half a minute.
_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "connect_timeout": 10,
}


# -- configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class WebhookPolicy:
    """How webhook calls are made and retried.

    A call counts as failed on a connection error, a timeout or any answer
    other than 2xx. Attempt n+1 follows attempt n after ``backoff_s * 2**(n-1)``
    (capped at ``backoff_max_s``, less up to 20% jitter); after
    ``max_attempts`` the delivery is given up and marked ``FAILED``.
    """

    max_attempts: int = 10
    backoff_s: float = 1.0
    backoff_max_s: float = 300.0
    timeout_s: float = 10.0
    #: How long an instance holds a delivery it is sending; an instance that
    #: dies meanwhile leaves it to be sent again once the lease runs out.
    lease_s: float = 60.0
    #: How often due retries are looked for when no order settles.
    poll_s: float = 1.0
    batch_size: int = 20
    retention_s: float = 7 * 24 * 3600

    def retry_in_s(self, attempt: int) -> float | None:
        """The wait after failed attempt `attempt` (1-based); None when it was the last."""
        if attempt >= self.max_attempts:
            return None
        wait = min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s)
        # Jitter spreads the retries of many orders to one endpoint apart.
        return float(wait * random.uniform(0.8, 1.0))


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


# -- requests and answers (pure) --------------------------------------------------


class ApiError(Exception):
    """A request the API refuses: answered as ``{"error", "message", "details"}``."""

    def __init__(
        self, status: int, error: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.details = details

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return JSONResponse(body, status_code=self.status)


CustomerId = Annotated[
    str, StringConstraints(strict=True, strip_whitespace=True, min_length=1, max_length=200)
]
# numeric(12,2) in the orders table.
Total = Annotated[Decimal, Field(gt=0, max_digits=12, decimal_places=2, allow_inf_nan=False)]


class NewOrder(BaseModel):
    """The body of ``POST /orders``. ``total`` is a JSON number or a decimal
    string (money without binary rounding), at most two decimal places."""

    model_config = ConfigDict(extra="forbid", strict=True)

    customer_id: CustomerId
    total: Total
    webhook_url: AnyHttpUrl | None = None


def parse_new_order(body: bytes) -> NewOrder:
    """The order in a request body, or the ApiError saying what is wrong with it."""
    try:
        return NewOrder.model_validate_json(body)
    except ValidationError as e:
        problems = e.errors(include_url=False, include_input=False)
        if any(p["type"] == "json_invalid" for p in problems):
            raise ApiError(400, "malformed_json", "the request body is not valid JSON") from None
        details = [
            {"field": ".".join(str(part) for part in p["loc"]) or "body", "problem": p["msg"]}
            for p in problems
        ]
        summary = "; ".join(f"{d['field']}: {d['problem']}" for d in details)
        raise ApiError(422, "invalid_order", f"invalid order: {summary}", details) from None


def parse_wait(raw: str | None, *, max_wait_s: float) -> float | None:
    """The ``wait`` query parameter in seconds (None: do not wait), cut to `max_wait_s`."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ApiError(
            400, "invalid_wait", f"wait must be a number of seconds, 0 or more (got {raw!r})"
        )
    return min(value, max_wait_s)


def sse_event(order: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying the order. Its id is the status, so a
    client that reconnects after the final event is told there is no more."""
    return b"event: status\nid: %s\ndata: %s\n\n" % (
        str(order["status"]).encode(),
        orjson.dumps(order),
    )


def pending_order(order_id: str, new: NewOrder) -> dict[str, Any]:
    """The order as just created (what ``GET /orders/{id}`` answers until it settles)."""
    return orders.order_json(
        {
            "id": order_id,
            "customer_id": new.customer_id,
            "total": new.total,
            "status": PENDING,
            "reason": None,
        }
    )


# -- notifications -----------------------------------------------------------------


class OrderNotices:
    """The listening end of ``NOTIFY walsaga_order``: one connection per process,
    its notifications fanned out to the requests waiting on those orders.

    A notification only means "look again": waiters read the row, and every
    waiter is woken after each (re)connection, so a notification lost while
    the connection was down costs nothing.
    """

    def __init__(self, dsn: str, *, retry_max_s: float = 5.0) -> None:
        self.dsn = dsn
        self.retry_max_s = retry_max_s
        self.listening = asyncio.Event()
        self.closing = False
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._watchers: set[asyncio.Event] = set()

    @contextlib.contextmanager
    def subscribe(self, order_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever `order_id` may have changed (read the order after subscribing)."""
        event = asyncio.Event()
        if self.closing:
            event.set()
        waiters = self._waiters.setdefault(order_id, set())
        waiters.add(event)
        try:
            yield event
        finally:
            waiters.discard(event)
            if not waiters and self._waiters.get(order_id) is waiters:
                del self._waiters[order_id]

    def watch(self) -> asyncio.Event:
        """An event set by every notification, whichever the order."""
        event = asyncio.Event()
        self._watchers.add(event)
        return event

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def close(self) -> None:
        """Wake every waiter for good: the process is stopping."""
        self.closing = True
        self._wake_all()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()
        for event in self._watchers:
            event.set()

    def _dispatch(self, payload: str) -> None:
        try:
            order_id = orjson.loads(payload)["id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("unreadable order notification", payload=payload[:200])
            return
        for event in self._waiters.get(str(order_id), ()):
            event.set()
        for event in self._watchers:
            event.set()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with backoff."""
        delay = 0.1
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(orders.NOTIFY_CHANNEL))
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, **_KEEPALIVES
                )
                async with conn:
                    await conn.execute(listen)
                    self.listening.set()
                    delay = 0.1
                    self._wake_all()  # whatever settled while nobody listened
                    async for notify in conn.notifies():
                        self._dispatch(notify.payload)
            except psycopg.Error as e:
                log.warning("order notifications interrupted", error=str(e), retry_in_s=delay)
            except Exception as e:
                log.error("order notifications failed", error=repr(e), retry_in_s=delay)
            finally:
                self.listening.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max_s)


# -- webhooks ----------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    id: int
    order_id: str
    url: str
    payload: dict[str, Any]
    attempt: int


class WebhookSender:
    """Sends the webhook calls queued in ``webhook_deliveries``.

    Delivery is at least once. A delivery is claimed for a lease in a short
    transaction (``FOR UPDATE SKIP LOCKED``: any number of instances may run,
    each takes rows no other holds), the call is made outside any
    transaction, and its outcome recorded after. An instance that dies
    between the call and the record leaves the lease to run out and the call
    is made again: receivers drop repeats by the ``Walsaga-Delivery`` header,
    which stays the same across attempts.
    """

    def __init__(
        self,
        pool: ConnectionPool[Any],
        policy: WebhookPolicy,
        *,
        wake: asyncio.Event,
        calls: Counter,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self.wake = wake
        self.calls = calls
        self.stopping = False
        self._trimmed_at = 0.0

    async def run(self) -> None:
        """Send what is due until :meth:`stop`; a call under way is finished first."""
        headers = {"User-Agent": "walsaga-order-service"}
        async with httpx.AsyncClient(
            timeout=self.policy.timeout_s, follow_redirects=False, headers=headers
        ) as client:
            while not self.stopping:
                self.wake.clear()
                try:
                    due = await run_in_threadpool(self._claim)
                except (psycopg.Error, PoolTimeout) as e:
                    log.warning("cannot read webhook deliveries", error=str(e))
                    due = []
                if due:
                    await asyncio.gather(*(self._deliver(client, d) for d in due))
                    continue
                await self._trim()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.policy.poll_s)

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    def _claim(self) -> list[Delivery]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                """
                UPDATE webhook_deliveries d
                SET attempts = d.attempts + 1, updated_at = now(),
                    next_attempt_at = now() + make_interval(secs => %s)
                WHERE d.id IN (
                    SELECT id FROM webhook_deliveries
                    WHERE status = 'PENDING' AND next_attempt_at <= now()
                    ORDER BY next_attempt_at
                    LIMIT %s
                    FOR UPDATE SKIP LOCKED)
                RETURNING d.id, d.order_id, d.url, d.payload, d.attempts
                """,
                (self.policy.lease_s, self.policy.batch_size),
            ).fetchall()
        return [Delivery(*row) for row in rows]

    async def _deliver(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        error: str | None = None
        try:
            response = await client.post(
                delivery.url,
                content=orjson.dumps(delivery.payload),
                headers={
                    "Content-Type": "application/json",
                    "Walsaga-Delivery": str(delivery.id),
                    "Walsaga-Attempt": str(delivery.attempt),
                },
            )
            if not response.is_success:
                error = f"HTTP {response.status_code}"
        except Exception as e:  # refused, reset, timed out, a URL httpx cannot use...
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        try:
            outcome = await run_in_threadpool(self._record, delivery, error)
        except (psycopg.Error, PoolTimeout) as e:
            # The lease runs out and the call is made again.
            log.warning("webhook outcome not recorded", delivery=delivery.id, error=str(e))
            return
        self.calls.labels(outcome).inc()
        fields = {"order": delivery.order_id, "url": delivery.url, "attempt": delivery.attempt}
        if outcome == "failed":
            log.error("webhook given up", error=error, **fields)
        elif outcome == "retry":
            log.info("webhook call failed, will retry", error=error, **fields)

    def _record(self, delivery: Delivery, error: str | None) -> str:
        with self.pool.connection() as conn:
            if error is None:
                conn.execute(
                    "UPDATE webhook_deliveries SET status = 'DELIVERED', last_error = NULL, "
                    "updated_at = now() WHERE id = %s",
                    (delivery.id,),
                )
                return "delivered"
            retry_in_s = self.policy.retry_in_s(delivery.attempt)
            if retry_in_s is None:
                conn.execute(
                    "UPDATE webhook_deliveries SET status = 'FAILED', last_error = %s, "
                    "updated_at = now() WHERE id = %s",
                    (error, delivery.id),
                )
                return "failed"
            conn.execute(
                "UPDATE webhook_deliveries SET last_error = %s, updated_at = now(), "
                "next_attempt_at = now() + make_interval(secs => %s) WHERE id = %s",
                (error, retry_in_s, delivery.id),
            )
            return "retry"

    async def _trim(self) -> None:
        """Forget finished deliveries after the retention period (now and then)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._trimmed_at < 600:
            return
        self._trimmed_at = loop.time()

        def trim() -> None:
            with self.pool.connection() as conn:
                conn.execute(
                    "DELETE FROM webhook_deliveries WHERE status <> 'PENDING' "
                    "AND updated_at < now() - make_interval(secs => %s)",
                    (self.policy.retention_s,),
                )

        try:
            await run_in_threadpool(trim)
        except (psycopg.Error, PoolTimeout) as e:
            log.warning("cannot trim webhook deliveries", error=str(e))


# -- the customer directory --------------------------------------------------------


class CustomerDirectory:
    """Read-only look-ups of customer ids, to refuse an obviously unknown one at once."""

    def __init__(self, dsn: str) -> None:
        self.pool: ConnectionPool[Any] = ConnectionPool(
            dsn,
            min_size=1,
            max_size=4,
            open=False,
            timeout=2.0,
            kwargs={**_KEEPALIVES, "options": "-c statement_timeout=2000"},
            name="customer-directory",
        )

    def open(self) -> None:
        self.pool.open(wait=False)  # an unreachable directory must not stop the service

    def close(self) -> None:
        self.pool.close()

    def knows(self, customer_id: str) -> bool | None:
        """Whether the customer exists; None when the directory cannot say."""
        try:
            with self.pool.connection() as conn:
                row = conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM customers WHERE id = %s)", (customer_id,)
                ).fetchone()
        except (psycopg.Error, PoolTimeout) as e:
            log.warning("customer directory unavailable, the saga will check", error=str(e))
            return None
        return bool(row and row[0])


# -- the service -------------------------------------------------------------------


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
        self.pool: ConnectionPool[Any] = ConnectionPool(
            settings.dsn,
            min_size=2,
            max_size=settings.pool_size,
            open=False,
            timeout=10.0,
            kwargs=_KEEPALIVES,
            name="order-service",
        )
        self.notices = OrderNotices(settings.dsn)
        self.webhooks = WebhookSender(
            self.pool, settings.webhook, wake=self.notices.watch(), calls=webhook_calls
        )
        self.directory = (
            CustomerDirectory(settings.customers_dsn) if settings.customers_dsn else None
        )
        #: Why the service stopped on its own (the consumer died), if it did.
        self.failure: str | None = None
        self._thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

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
        if self._stopping:
            return
        self.failure = self.failure or "the consumer stopped"
        log.error("order service stopping", reason=self.failure)
        self.begin_shutdown()
        if self.on_fatal is not None:
            self.on_fatal()

    def begin_shutdown(self) -> None:
        """Answer every waiting request and end every event stream now (any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self.notices.close)

    async def stop(self) -> None:
        self._stopping = True
        self.notices.close()
        self.webhooks.stop()
        tasks = {t.get_name(): t for t in self._tasks}
        sender = tasks.pop("webhooks", None)
        if sender is not None:
            # Let a call under way finish and be recorded.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(sender, self.settings.webhook.timeout_s + 5)
        self.participant.stop()
        if self._thread is not None:
            await run_in_threadpool(self._thread.join, 30.0)
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        if self.directory is not None:
            await run_in_threadpool(self.directory.close)
        await run_in_threadpool(self.pool.close)
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
        }
        if self.failure:
            report["failure"] = self.failure
        return ok, report

    # -- orders --------------------------------------------------------------------

    async def create(self, new: NewOrder) -> dict[str, Any]:
        order_id = str(uuid.uuid4())

        def insert() -> None:
            with self.pool.connection() as conn:
                orders.create_order(
                    conn,
                    new.customer_id,
                    new.total,
                    mode=self.settings.mode,
                    orchestrator=self.orchestrator,
                    webhook_url=str(new.webhook_url) if new.webhook_url is not None else None,
                    order_id=order_id,
                )

        await run_in_threadpool(insert)
        self.created.labels(self.settings.mode).inc()
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


# -- HTTP ----------------------------------------------------------------------------


def create_app(
    settings: OrderServiceSettings, *, on_fatal: Callable[[], None] | None = None
) -> Starlette:
    """The ASGI app; its lifespan starts and stops the whole service."""
    service = OrderService(settings, on_fatal=on_fatal)

    async def post_order(request: Request) -> Response:
        wait_s = parse_wait(request.query_params.get("wait"), max_wait_s=settings.max_wait_s)
        new = parse_new_order(await request.body())
        if service.notices.closing:
            raise ApiError(503, "stopping", "the service is stopping; send the order again")
        if service.directory is not None:
            known = await run_in_threadpool(service.directory.knows, new.customer_id)
            if known is False:
                raise ApiError(
                    422,
                    "unknown_customer",
                    f"no customer {new.customer_id!r}",
                    [{"field": "customer_id", "problem": "unknown customer"}],
                )
        order = await service.create(new)
        location = {"Location": f"/orders/{order['id']}"}
        if wait_s is not None:
            order = await service.wait_settled(order["id"], wait_s) or order
        status = 202 if order["status"] == PENDING else 200
        return JSONResponse(order, status_code=status, headers=location)

    async def get_order(request: Request) -> Response:
        order_id = request.path_params["order_id"]
        order = await service.read(order_id)
        if order is None:
            raise _unknown_order(order_id)
        return JSONResponse(order)

    async def order_events(request: Request) -> Response:
        order_id = request.path_params["order_id"]
        order = await service.read(order_id)
        if order is None:
            raise _unknown_order(order_id)
        if order["status"] != PENDING and request.headers.get("last-event-id") == order["status"]:
            # A client reconnecting after the final event: 204 tells an
            # EventSource to stop reconnecting.
            return Response(status_code=204)
        return StreamingResponse(
            service.status_events(order_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def healthz(request: Request) -> Response:
        ok, report = service.health()
        return JSONResponse(report, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        body = generate_latest(service.participant.metrics.registry)
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        answer = ApiError(
            exc.status_code, error, f"{request.method} {request.url.path}: {exc.detail}"
        )
        response = answer.response()
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("database unavailable", path=request.url.path, error=str(exc))
        return ApiError(
            503, "unavailable", "the order database is unavailable; try again"
        ).response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(
        routes=[
            Route("/orders", post_order, methods=["POST"]),
            Route("/orders/{order_id}", get_order, methods=["GET"]),
            Route("/orders/{order_id}/events", order_events, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            PoolTimeout: unavailable,
            psycopg.OperationalError: unavailable,
        },
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def _unknown_order(order_id: str) -> ApiError:
    return ApiError(404, "unknown_order", f"no order {order_id!r}")


# -- running -----------------------------------------------------------------------


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
