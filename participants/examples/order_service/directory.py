"""The customer directory: a read-only look-up that lets ``POST /orders`` refuse
an unknown customer at once. Advisory only: the saga stays the authority, so a
directory that cannot answer lets the order through."""

from __future__ import annotations

from typing import Any

import psycopg
import structlog
from psycopg_pool import ConnectionPool, PoolTimeout

from participants.examples.order_service.connections import KEEPALIVES

log = structlog.get_logger("walsaga.order_service")


class CustomerDirectory:
    """Read-only look-ups of customer ids, to refuse an obviously unknown one at once."""

    def __init__(self, dsn: str) -> None:
        self.pool: ConnectionPool[Any] = ConnectionPool(
            dsn,
            min_size=1,
            max_size=4,
            open=False,
            timeout=2.0,
            # One statement per look-up: no BEGIN and COMMIT round trips around it.
            kwargs={**KEEPALIVES, "options": "-c statement_timeout=2000", "autocommit": True},
            name="customer-directory",
        )

    def open(self) -> None:
        self.pool.open(wait=False)  # an unreachable directory must not stop the service

    def close(self, timeout_s: float = 5.0) -> None:
        self.pool.close(timeout_s)

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
