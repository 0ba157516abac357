"""The effect queue in ``walsaga.effect``: request, lease, mark sent, record.

Leases are rows' ``leased_by`` / ``leased_until``, taken with ``FOR UPDATE
SKIP LOCKED`` so any number of workers share the queue. Marking an attempt
``SENT`` commits *before* the call leaves; the lease then covers the call's
timeout and the target's settle time, so a worker that dies mid-call leaves
a ``SENT`` row whose lease runs out, and whoever takes it next knows its
outcome is unknown. Recording is fenced by the attempt number: an outcome
recorded late by a worker that lost its lease changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from participants.effects.decision import Decision
from participants.effects.model import SENT, Effect

_LEASE = """
WITH due AS (
    SELECT id, status AS was FROM walsaga.effect
    WHERE status IN ('PENDING', 'SENT', 'IN_DOUBT')
      AND next_attempt_at <= now()
      AND (leased_until IS NULL OR leased_until <= now())
      AND target = ANY(%(targets)s)
    ORDER BY next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE walsaga.effect e
SET leased_by = %(worker)s,
    leased_until = now() + make_interval(secs => %(lease_s)s),
    -- A SENT row whose lease ran out: its worker died after sending.
    status = CASE WHEN due.was = 'SENT' THEN 'IN_DOUBT' ELSE e.status END,
    updated_at = now()
FROM due
WHERE e.id = due.id
RETURNING e.id::text, e.target, e.idempotency_key, e.payload, e.headers, e.aggregate_id,
          e.status, e.attempts, e.created_at, e.sent_at, due.was
"""


def request(
    conn: psycopg.Connection[Any],
    target: str,
    key: str,
    payload: Mapping[str, Any],
    *,
    headers: Mapping[str, Any] | None = None,
    aggregate_id: str | None = None,
) -> str:
    """``walsaga.request_effect`` in the connection's current transaction; returns its id."""
    row = conn.execute(
        "SELECT walsaga.request_effect(%s, %s, %s, %s, %s)::text",
        (target, key, Jsonb(dict(payload)), Jsonb(dict(headers or {})), aggregate_id),
    ).fetchone()
    assert row is not None
    return str(row[0])


def lease(
    conn: psycopg.Connection[Any],
    *,
    worker: str,
    targets: Sequence[str],
    limit: int,
    lease_s: float,
) -> list[tuple[Effect, bool]]:
    """Lease up to `limit` due effects; each with whether a dead worker had sent it."""
    with conn.transaction():
        rows = conn.execute(
            _LEASE,
            {"targets": list(targets), "limit": limit, "worker": worker, "lease_s": lease_s},
        ).fetchall()
    return [(Effect(*row[:10]), row[10] == SENT) for row in rows]


def mark_sent(
    conn: psycopg.Connection[Any], effect: Effect, *, worker: str, lease_s: float
) -> Effect | None:
    """Record that attempt ``attempts + 1`` is about to leave (committed before it does).

    None when the lease was lost meanwhile: the effect is someone else's now.
    """
    with conn.transaction():
        row = conn.execute(
            """
            UPDATE walsaga.effect
            SET status = 'SENT', attempts = attempts + 1, sent_at = now(),
                leased_until = now() + make_interval(secs => %(lease_s)s),
                next_attempt_at = now() + make_interval(secs => %(lease_s)s),
                updated_at = now()
            WHERE id = %(id)s AND leased_by = %(worker)s AND status = %(status)s
              AND attempts = %(attempts)s
            RETURNING attempts, sent_at
            """,
            {
                "id": effect.id,
                "worker": worker,
                "status": effect.status,
                "attempts": effect.attempts,
                "lease_s": lease_s,
            },
        ).fetchone()
    if row is None:
        return None
    return Effect(
        effect.id,
        effect.target,
        effect.key,
        effect.payload,
        effect.headers,
        effect.aggregate_id,
        SENT,
        row[0],
        effect.created_at,
        row[1],
    )


def record(
    conn: psycopg.Connection[Any], effect: Effect, decision: Decision, *, worker: str
) -> bool:
    """Write `decision` for `effect` in the current transaction, if the effect is
    still where this worker left it (same status and attempt); False otherwise."""
    row = conn.execute(
        """
        UPDATE walsaga.effect
        SET status = %(status)s,
            next_attempt_at = now() + make_interval(secs => %(delay_s)s),
            leased_by = NULL, leased_until = NULL,
            result = coalesce(%(result)s, result),
            reason = coalesce(%(reason)s, reason),
            last_error = coalesce(%(error)s, last_error),
            updated_at = now(),
            ended_at = CASE WHEN %(ended)s THEN now() END
        WHERE id = %(id)s AND status = %(was)s AND attempts = %(attempts)s
          AND leased_by = %(worker)s
        RETURNING 1
        """,
        {
            "status": decision.status,
            "delay_s": decision.delay_s,
            "result": Jsonb(decision.result) if decision.result is not None else None,
            "reason": decision.reason,
            "error": decision.error[:2000] if decision.error else None,
            "ended": decision.ended,
            "id": effect.id,
            "was": effect.status,
            "attempts": effect.attempts,
            "worker": worker,
        },
    ).fetchone()
    return row is not None


def release(conn: psycopg.Connection[Any], effects: Sequence[Effect], *, worker: str) -> None:
    """Give back leases not acted on (a stopping worker): due again at once."""
    if not effects:
        return
    with conn.transaction():
        conn.execute(
            "UPDATE walsaga.effect SET leased_by = NULL, leased_until = NULL "
            "WHERE id = ANY(%s::uuid[]) AND leased_by = %s AND status <> 'SENT'",
            ([e.id for e in effects], worker),
        )


def queue(conn: psycopg.Connection[Any]) -> list[tuple[str, str, int, float]]:
    """(target, status, how many, age of the oldest in seconds) of the live effects."""
    rows = conn.execute(
        """
        SELECT target, status, count(*), extract(epoch FROM now() - min(created_at))
        FROM walsaga.effect WHERE status IN ('PENDING', 'SENT', 'IN_DOUBT')
        GROUP BY target, status
        """
    ).fetchall()
    return [(t, s, int(n), float(age or 0.0)) for t, s, n, age in rows]


def trim(conn: psycopg.Connection[Any], *, retention_s: float) -> int:
    """Delete ended effects older than `retention_s` (their keys may then be reused)."""
    cur = conn.execute(
        "DELETE FROM walsaga.effect WHERE ended_at < now() - make_interval(secs => %s)",
        (retention_s,),
    )
    return cur.rowcount
