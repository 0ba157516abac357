"""Load shedding at the door: past a bound of unsettled orders, new ones are turned away.

Beyond what the saga's services can settle, every order accepted only makes
the queue longer, and every saga in it slower. So the order service counts
the orders still pending (the sagas under way) and, once they reach
``max_backlog``, answers ``POST /orders`` with 503 and a ``Retry-After``
estimated from how fast orders are settling: the client sends it again later,
while the sagas already admitted finish at the pace the system can keep.

The decision is pure (:func:`retry_after`); :class:`Admission` keeps the
figures it needs: the pending count read from the database every
``poll_s``, plus the orders admitted since, and the settling rate from the
service's own order notifications.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.concurrency import run_in_threadpool

log = structlog.get_logger("walsaga.order_service")

#: How far back the settling rate looks, in seconds.
_RATE_WINDOW_S = 5.0
#: The longest and shortest Retry-After the service asks for, in seconds.
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 30


@dataclass(frozen=True)
class Backlog:
    pending: int
    #: Orders settled per second lately (0 when none).
    settling_per_s: float


def retry_after(backlog: Backlog, *, max_backlog: int) -> int | None:
    """None to admit an order; else the seconds a client should wait before trying again.

    A bound of 0 admits everything. The wait is the time the backlog above
    three quarters of the bound takes to drain at the current pace, so that
    clients come back when there is room, within a sane range.
    """
    if max_backlog <= 0 or backlog.pending < max_backlog:
        return None
    excess = backlog.pending - 0.75 * max_backlog
    if backlog.settling_per_s <= 0:
        return RETRY_AFTER_MAX_S
    wait = math.ceil(excess / backlog.settling_per_s)
    return max(RETRY_AFTER_MIN_S, min(RETRY_AFTER_MAX_S, wait))


class Admission:
    """The order service's view of its backlog, refreshed from its database."""

    def __init__(self, pool: ConnectionPool[Any], *, max_backlog: int, poll_s: float = 0.25):
        self.pool = pool
        self.max_backlog = max_backlog
        self.poll_s = poll_s
        self.pending = 0
        self._admitted = 0  # ever
        self._admitted_at_count = 0  # when the last count began
        self._settled: deque[float] = deque(maxlen=100_000)
        self.refused = 0

    def admitted(self) -> None:
        self._admitted += 1

    def settled(self) -> None:
        """An order settled (called for each of the service's order notifications)."""
        self._settled.append(time.monotonic())

    def backlog(self) -> Backlog:
        now = time.monotonic()
        settled = self._settled
        while settled and now - settled[0] > _RATE_WINDOW_S:  # oldest first: drop the stale
            settled.popleft()
        rate = len(settled) / _RATE_WINDOW_S
        # Orders admitted since the last count began may be in it or not:
        # counted again here, the estimate errs on the safe side.
        return Backlog(self.pending + self._admitted - self._admitted_at_count, rate)

    def check(self) -> int | None:
        """None to admit; else the Retry-After to answer with."""
        wait = retry_after(self.backlog(), max_backlog=self.max_backlog)
        if wait is not None:
            self.refused += 1
        return wait

    def _count(self) -> int:
        with self.pool.connection() as conn:
            row = conn.execute("SELECT count(*) FROM orders WHERE status = 'PENDING'").fetchone()
        return int(row[0]) if row else 0

    async def run(self) -> None:
        """Refresh the pending count until cancelled."""
        if self.max_backlog <= 0:
            return
        while True:
            try:
                began = self._admitted
                pending = await run_in_threadpool(self._count)
                self.pending, self._admitted_at_count = pending, began
            except (psycopg.Error, PoolTimeout) as e:
                log.warning("cannot count pending orders", error=str(e))
            await asyncio.sleep(self.poll_s)
