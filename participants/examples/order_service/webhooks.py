"""Webhooks: the calls telling a client how its order ended, sent at least once
from the ``webhook_deliveries`` queue and retried as a :class:`WebhookPolicy` says."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import psycopg
import structlog
from prometheus_client import Counter
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.concurrency import run_in_threadpool

from walsaga.retry import BackoffPolicy

log = structlog.get_logger("walsaga.order_service")


@dataclass(frozen=True)
class WebhookPolicy:
    """How webhook calls are made and retried.

    A call counts as failed on a connection error, a timeout or any answer
    other than 2xx. Attempt n+1 follows attempt n after ``backoff_s * 2**(n-1)``
    (capped at ``backoff_max_s``, less up to 20% jitter: the walsaga backoff,
    :attr:`backoff`); after ``max_attempts`` the delivery is given up and
    marked ``FAILED``.
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

    @property
    def backoff(self) -> BackoffPolicy:
        # Jitter spreads the retries of many orders to one endpoint apart.
        return BackoffPolicy(
            min_s=min(self.backoff_s, self.backoff_max_s),
            max_s=self.backoff_max_s,
            multiplier=2.0,
            jitter=0.2,
        )

    def retry_in_s(self, attempt: int) -> float | None:
        """The wait after failed attempt `attempt` (1-based); None when it was the last."""
        if attempt >= self.max_attempts:
            return None
        return self.backoff.delay(attempt)


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
