"""The tracker's database: saga summaries and timelines, written by the tracker, read by
``walsaga sagas`` and the console.

Writing is idempotent per record: a timeline row is keyed by (saga, event
id), and a record folds into its saga's summary only when its timeline row
was new, in the same statement. Repeats of a record (Kafka's redelivery, a
replay) therefore change nothing, even past the inbox's retention. The fold
is monotonic so that records may arrive in any order: the earliest record
starts the saga, the first known type sticks, an ended saga stays ended, and
an orchestrated saga takes its status only from its orchestrator's database
(:func:`mirror`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from participants.timeline import Entry
from walsaga.errors import SetupError

STATUS_FILTERS = ("running", "compensating", "stuck", "failed", "completed", "compensated",
                  "resolved")  # fmt: skip

_RECORD = """
WITH input AS (
    SELECT * FROM jsonb_to_recordset(%(entries)s) AS x(
        n int, saga_id text, event_id text, at timestamptz, type text, kind text, source text,
        topic text, partition int, "offset" bigint, key text, lsn text, step text,
        headers jsonb, payload jsonb, saga_type text, status text, ends boolean,
        deadline_s double precision, trace_id text)
), entry AS (
    INSERT INTO walsaga.saga_event AS e (saga_id, event_id, at, type, kind, source, topic,
                                         partition, "offset", key, lsn, step, headers, payload)
    SELECT saga_id, event_id, at, type, kind, source, topic, partition, "offset", key, lsn,
           step, headers, payload
    FROM input ORDER BY n
    ON CONFLICT (saga_id, event_id) DO NOTHING
    RETURNING e.saga_id, e.event_id
), fresh AS (
    SELECT DISTINCT ON (i.saga_id, i.event_id) i.*
    FROM input i JOIN entry USING (saga_id, event_id)
    ORDER BY i.saga_id, i.event_id, i.n
), folded AS (
    -- A batch's records of one saga, folded as one record would be (in time order).
    SELECT saga_id,
           (array_agg(saga_type ORDER BY at, n) FILTER (WHERE saga_type IS NOT NULL))[1]
               AS saga_type,
           coalesce((array_agg(deadline_s ORDER BY at, n)
                     FILTER (WHERE saga_type IS NOT NULL))[1], min(deadline_s)) AS deadline_s,
           min(at) AS started_at,
           max(at) AS last_event_at,
           (array_agg(type ORDER BY at DESC, n DESC))[1] AS last_type,
           coalesce((array_agg(status ORDER BY at, n) FILTER (WHERE ends))[1],
                    CASE WHEN bool_or(status = 'COMPENSATING') THEN 'COMPENSATING'
                         ELSE 'RUNNING' END) AS status,
           min(at) FILTER (WHERE ends) AS ended_at,
           count(*) AS events,
           (array_agg(trace_id ORDER BY at, n) FILTER (WHERE trace_id IS NOT NULL))[1]
               AS trace_id
    FROM fresh GROUP BY saga_id
), earlier AS (
    SELECT s.id, s.ended_at FROM walsaga.tracked_saga s
    WHERE s.id IN (SELECT saga_id FROM folded) ORDER BY s.id FOR UPDATE
), saga AS (
    INSERT INTO walsaga.tracked_saga AS s (id, saga_type, status, started_at, last_event_at,
                                           ended_at, deadline_s, deadline, events, last_type,
                                           trace_id)
    SELECT saga_id, saga_type, status, started_at, last_event_at, ended_at, deadline_s,
           started_at + make_interval(secs => deadline_s), events, last_type, trace_id
    FROM folded ORDER BY saga_id
    ON CONFLICT (id) DO UPDATE SET
        saga_type = coalesce(s.saga_type, EXCLUDED.saga_type),
        deadline_s = CASE WHEN s.saga_type IS NULL THEN EXCLUDED.deadline_s ELSE s.deadline_s END,
        started_at = least(s.started_at, EXCLUDED.started_at),
        deadline = least(s.started_at, EXCLUDED.started_at) + make_interval(secs =>
            CASE WHEN s.saga_type IS NULL THEN EXCLUDED.deadline_s ELSE s.deadline_s END),
        last_type = CASE WHEN EXCLUDED.last_event_at >= s.last_event_at
                         THEN EXCLUDED.last_type ELSE s.last_type END,
        last_event_at = greatest(s.last_event_at, EXCLUDED.last_event_at),
        events = s.events + EXCLUDED.events,
        trace_id = coalesce(s.trace_id, EXCLUDED.trace_id),
        status = CASE
            WHEN s.orchestrator IS NOT NULL OR s.ended_at IS NOT NULL THEN s.status
            WHEN EXCLUDED.ended_at IS NOT NULL THEN EXCLUDED.status
            WHEN EXCLUDED.status = 'COMPENSATING' THEN EXCLUDED.status
            ELSE s.status END,
        ended_at = CASE WHEN s.orchestrator IS NOT NULL OR s.ended_at IS NOT NULL
                        THEN s.ended_at ELSE EXCLUDED.ended_at END,
        updated_at = now()
    RETURNING s.id, s.status, s.saga_type, s.started_at, s.ended_at, (s.xmax = 0) AS inserted
)
SELECT saga.id, saga.status, saga.saga_type, saga.started_at, saga.ended_at, saga.inserted,
       saga.ended_at IS NOT NULL AND earlier.ended_at IS NULL AS ended_now,
       (SELECT count(*) FROM entry) AS recorded
FROM saga LEFT JOIN earlier ON earlier.id = saga.id
"""


@dataclass(frozen=True)
class Change:
    """What recording records, or mirroring an orchestrator's row, did to a saga."""

    saga_id: str
    saga_type: str | None
    status: str
    started: bool  # first seen now
    ended: bool  # reached an end status now (or a different one)
    duration_s: float | None  # from its start to its end, once ended


def record(
    conn: psycopg.Connection[Any], entries: Sequence[tuple[Entry, float]]
) -> tuple[int, list[Change]]:
    """Add `entries` (each with its saga type's deadline) to their sagas' timelines and
    summaries, in one statement. Returns how many were new (the others were there
    already) and what changed in each saga they touched."""
    if not entries:
        return 0, []
    document = [
        {
            "n": n,
            "saga_id": e.saga_id,
            "event_id": e.event_id,
            "at": e.at.isoformat(),
            "type": e.type,
            "kind": e.kind,
            "source": e.source,
            "topic": e.topic,
            "partition": e.partition,
            "offset": e.offset,
            "key": e.key,
            "lsn": e.lsn,
            "step": e.step,
            "headers": dict(e.headers),
            "payload": e.payload,
            "saga_type": e.saga_type,
            "status": e.status,
            "ends": e.ends,
            "deadline_s": deadline_s,
            "trace_id": e.trace_id,
        }
        for n, (e, deadline_s) in enumerate(entries)
    ]
    rows = conn.execute(_RECORD, {"entries": Jsonb(document, dumps=_dumps)}).fetchall()
    recorded = int(rows[0][7]) if rows else 0
    changes = [
        Change(
            saga_id,
            saga_type,
            status,
            bool(inserted),
            bool(ended_now),
            _seconds(started_at, ended_at),
        )
        for saga_id, status, saga_type, started_at, ended_at, inserted, ended_now, _ in rows
    ]
    return recorded, changes


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _seconds(start: datetime, end: datetime | None) -> float | None:
    return None if end is None else max(0.0, (end - start).total_seconds())


# -- orchestrated sagas --------------------------------------------------------


@dataclass(frozen=True)
class OrchestratedRow:
    """An orchestrator's ``walsaga.saga`` row, as the tracker mirrors it."""

    id: str
    definition: str
    status: str
    reason: str | None
    step: str | None
    waiting_on: str | None
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None


_MIRROR = """
INSERT INTO walsaga.tracked_saga AS s (id, saga_type, orchestrator, status, reason, step,
                                       waiting_on, started_at, last_event_at, ended_at,
                                       deadline_s, deadline, events)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s + make_interval(secs => %s), 0)
ON CONFLICT (id) DO UPDATE SET
    saga_type = EXCLUDED.saga_type,
    orchestrator = EXCLUDED.orchestrator,
    status = EXCLUDED.status,
    reason = EXCLUDED.reason,
    step = EXCLUDED.step,
    waiting_on = EXCLUDED.waiting_on,
    started_at = least(s.started_at, EXCLUDED.started_at),
    last_event_at = greatest(s.last_event_at, EXCLUDED.last_event_at),
    ended_at = EXCLUDED.ended_at,
    deadline_s = EXCLUDED.deadline_s,
    deadline = least(s.started_at, EXCLUDED.started_at)
        + make_interval(secs => EXCLUDED.deadline_s),
    updated_at = now()
"""


def mirror(
    conn: psycopg.Connection[Any],
    orchestrator: str,
    rows: Sequence[OrchestratedRow],
    deadline_s: Any,
) -> list[Change]:
    """Take the state of orchestrated sagas from their orchestrator's rows.

    `deadline_s` maps a saga type to its deadline. Returns what changed.
    """
    if not rows:
        return []
    before = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT id, orchestrator, status, reason, step, waiting_on, ended_at "
            "FROM walsaga.tracked_saga WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
            ([r.id for r in rows],),
        )
    }
    params = []
    changes = []
    for r in rows:
        earlier = before.get(r.id)
        if earlier == (orchestrator, r.status, r.reason, r.step, r.waiting_on, r.ended_at):
            continue  # nothing new (read again within the overlap)
        limit = deadline_s(r.definition)
        params.append(
            (r.id, r.definition, orchestrator, r.status, r.reason, r.step, r.waiting_on,
             r.created_at, r.updated_at, r.ended_at, limit, r.created_at, limit)
        )  # fmt: skip
        was_ended = earlier is not None and earlier[5] is not None
        status_before = earlier[1] if earlier is not None else None
        # Ended now, or ended otherwise than before (FAILED, then RESOLVED).
        ended = r.ended_at is not None and (not was_ended or status_before != r.status)
        changes.append(Change(r.id, r.definition, r.status, earlier is None, ended,
                              _seconds(r.created_at, r.ended_at)))  # fmt: skip
    if params:
        with conn.cursor() as cur:
            cur.executemany(_MIRROR, params)
    return changes


@dataclass(frozen=True)
class Cursor:
    """How far the tracker has read an orchestrator's sagas."""

    updated_at: datetime
    id: str
    caught_up: bool


def cursor(conn: psycopg.Connection[Any], orchestrator: str) -> Cursor | None:
    row = conn.execute(
        "SELECT updated_at, id, caught_up FROM walsaga.tracker_cursor WHERE orchestrator = %s",
        (orchestrator,),
    ).fetchone()
    return Cursor(*row) if row else None


def save_cursor(conn: psycopg.Connection[Any], orchestrator: str, at: Cursor) -> None:
    conn.execute(
        """
        INSERT INTO walsaga.tracker_cursor (orchestrator, updated_at, id, caught_up)
        VALUES (%s, %s, %s, %s)
        ON CONFLICT (orchestrator) DO UPDATE
        SET updated_at = EXCLUDED.updated_at, id = EXCLUDED.id, caught_up = EXCLUDED.caught_up
        """,
        (orchestrator, at.updated_at, at.id, at.caught_up),
    )


# -- upkeep ---------------------------------------------------------------------


def attention_counts(conn: psycopg.Connection[Any]) -> tuple[dict[str, int], dict[str, int]]:
    """Stuck and FAILED sagas by type, for the gauges."""
    stuck = dict(
        conn.execute(
            "SELECT coalesce(saga_type, ''), count(*) FROM walsaga.tracked_saga "
            "WHERE ended_at IS NULL AND deadline < now() GROUP BY 1"
        ).fetchall()
    )
    failed = dict(
        conn.execute(
            "SELECT coalesce(saga_type, ''), count(*) FROM walsaga.tracked_saga "
            "WHERE status = 'FAILED' GROUP BY 1"
        ).fetchall()
    )
    return stuck, failed


def forget_ended(conn: psycopg.Connection[Any], *, older_than_s: float, limit: int = 1000) -> int:
    """Remove up to `limit` sagas that ended more than `older_than_s` ago, with their timelines."""
    gone = conn.execute(
        """
        WITH old AS (
            SELECT id FROM walsaga.tracked_saga
            WHERE ended_at < now() - make_interval(secs => %s)
            ORDER BY ended_at LIMIT %s FOR UPDATE SKIP LOCKED
        ), events AS (
            DELETE FROM walsaga.saga_event WHERE saga_id IN (SELECT id FROM old)
        )
        DELETE FROM walsaga.tracked_saga WHERE id IN (SELECT id FROM old) RETURNING 1
        """,
        (older_than_s, limit),
    ).fetchall()
    return len(gone)


# -- reading ----------------------------------------------------------------------


@dataclass(frozen=True)
class SagaSummary:
    """One saga as the tracker knows it."""

    id: str
    saga_type: str | None
    orchestrator: str | None
    status: str
    stuck: bool
    reason: str | None
    step: str | None
    waiting_on: str | None
    started_at: datetime
    last_event_at: datetime
    ended_at: datetime | None
    deadline: datetime
    events: int
    last_type: str | None
    trace_id: str | None

    @property
    def shown_status(self) -> str:
        """The status to show: STUCK for a live saga past its deadline."""
        return "STUCK" if self.stuck else self.status

    @property
    def style(self) -> str:
        return "orchestration" if self.orchestrator else "choreography"

    def duration_s(self, now: datetime) -> float:
        return max(0.0, ((self.ended_at or now) - self.started_at).total_seconds())

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.saga_type,
            "style": self.style,
            "orchestrator": self.orchestrator,
            "status": self.status,
            "stuck": self.stuck,
            "reason": self.reason,
            "step": self.step,
            "waiting_on": self.waiting_on,
            "started_at": self.started_at.isoformat(),
            "last_event_at": self.last_event_at.isoformat(),
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "deadline": self.deadline.isoformat(),
            "events": self.events,
            "last_type": self.last_type,
            "trace_id": self.trace_id,
        }


_SUMMARY = """id, saga_type, orchestrator, status, ended_at IS NULL AND deadline < now(), reason,
    step, waiting_on, started_at, last_event_at, ended_at, deadline, events, last_type, trace_id"""


def _summary(row: Sequence[Any]) -> SagaSummary:
    return SagaSummary(*row[:15])


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``2d``, ``1w`` as a timedelta (ValueError otherwise)."""
    m = _AGE.match(text)
    if m is None:
        raise ValueError(f"{text!r}: write a number and a unit, as in 90s, 30m, 1h, 2d or 1w")
    return timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])


@dataclass(frozen=True)
class SagaFilter:
    """Which sagas a list shows."""

    status: str | None = None  # one of STATUS_FILTERS
    saga_type: str | None = None
    since: timedelta | None = None  # started within
    limit: int = 50

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUS_FILTERS:
            raise ValueError(f"status {self.status!r}: one of {', '.join(STATUS_FILTERS)}")
        if self.limit < 1:
            raise ValueError("limit must be at least 1")

    def where(self, *, with_status: bool = True) -> tuple[list[str], list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.saga_type:
            clauses.append("saga_type = %s")
            params.append(self.saga_type)
        if self.since is not None:
            clauses.append("started_at >= now() - %s")
            params.append(self.since)
        if with_status and self.status is not None:
            clauses.append(_STATUS_WHERE[self.status])
        return clauses, params


_STUCK = "(ended_at IS NULL AND deadline < now())"
_STATUS_WHERE = {
    "stuck": _STUCK,
    "running": f"(status = 'RUNNING' AND NOT {_STUCK})",
    "compensating": f"(status = 'COMPENSATING' AND NOT {_STUCK})",
    **{s: f"status = '{s.upper()}'" for s in ("failed", "completed", "compensated", "resolved")},
}


def _and(clauses: Iterable[str]) -> str:
    found = list(clauses)
    return " AND ".join(found) if found else "true"


def list_sagas(conn: psycopg.Connection[Any], f: SagaFilter) -> list[SagaSummary]:
    """Sagas matching `f`, newest first; without a status filter, stuck and FAILED
    ones come first."""
    clauses, params = f.where()
    if f.status is not None:
        rows = conn.execute(
            f"SELECT {_SUMMARY} FROM walsaga.tracked_saga WHERE {_and(clauses)} "
            "ORDER BY started_at DESC LIMIT %s",
            (*params, f.limit),
        ).fetchall()
        return [_summary(r) for r in rows]
    # One indexed query per rank rather than one sort of every saga.
    ranks = (_STUCK, "status = 'FAILED'", f"NOT ({_STUCK} OR status = 'FAILED')")
    parts = []
    all_params: list[Any] = []
    for rank, condition in enumerate(ranks):
        parts.append(
            f"(SELECT {_SUMMARY}, {rank} AS rank FROM walsaga.tracked_saga "
            f"WHERE {_and([*clauses, condition])} ORDER BY started_at DESC LIMIT %s)"
        )
        all_params += [*params, f.limit]
    rows = conn.execute(
        " UNION ALL ".join(parts) + " ORDER BY rank, started_at DESC LIMIT %s",
        (*all_params, f.limit),
    ).fetchall()
    return [_summary(r) for r in rows]


def counts(conn: psycopg.Connection[Any], f: SagaFilter) -> dict[str, int]:
    """How many sagas of each shown status match `f` (its status aside).

    Each status is counted on its own, which an index-only scan of
    ``(status, started_at)`` answers (far cheaper than grouping every row),
    and the live sagas past their deadline (few, from the partial index) by
    status.
    """
    clauses, params = f.where(with_status=False)
    statuses = [name.upper() for name in STATUS_FILTERS if name != "stuck"]
    by_status = dict(
        conn.execute(
            "SELECT s, (SELECT count(*) FROM walsaga.tracked_saga "
            f"          WHERE status = s AND {_and(clauses)}) "
            "FROM unnest(%s::text[]) AS s",
            (*params, statuses),
        ).fetchall()
    )
    stuck = dict(
        conn.execute(
            f"SELECT status, count(*) FROM walsaga.tracked_saga WHERE {_and([*clauses, _STUCK])} "
            "GROUP BY status",
            params,
        ).fetchall()
    )
    found = {name: int(by_status.get(name.upper(), 0)) for name in STATUS_FILTERS}
    found["stuck"] = int(sum(stuck.values()))
    for live in ("running", "compensating"):
        found[live] -= int(stuck.get(live.upper(), 0))
    return found


def saga_types(conn: psycopg.Connection[Any]) -> list[str]:
    """The saga types seen, one index probe per type."""
    return [
        r[0]
        for r in conn.execute(
            """
            WITH RECURSIVE t(saga_type) AS (
                (SELECT saga_type FROM walsaga.tracked_saga WHERE saga_type IS NOT NULL
                 ORDER BY saga_type LIMIT 1)
                UNION ALL
                SELECT (SELECT s.saga_type FROM walsaga.tracked_saga s
                        WHERE s.saga_type > t.saga_type ORDER BY s.saga_type LIMIT 1)
                FROM t WHERE t.saga_type IS NOT NULL
            )
            SELECT saga_type FROM t WHERE saga_type IS NOT NULL
            """
        )
    ]


def summary(conn: psycopg.Connection[Any], saga_id: str) -> SagaSummary | None:
    row = conn.execute(
        f"SELECT {_SUMMARY} FROM walsaga.tracked_saga WHERE id = %s", (saga_id,)
    ).fetchone()
    return _summary(row) if row else None


def entries(conn: psycopg.Connection[Any], saga_id: str) -> list[Entry]:
    """A saga's records, in the order they were produced."""
    rows = conn.execute(
        """
        SELECT saga_id, event_id, at, type, kind, source, topic, partition, "offset", key,
               headers, payload
        FROM walsaga.saga_event WHERE saga_id = %s ORDER BY at, topic, partition, "offset"
        """,
        (saga_id,),
    ).fetchall()
    return [Entry(*row) for row in rows]


def check_schema(conn: psycopg.Connection[Any], dsn_hint: str = "the tracker's database") -> None:
    """Refuse, with what to do, a database the tracker has not set up."""
    row = conn.execute("SELECT to_regclass('walsaga.tracked_saga') IS NOT NULL").fetchone()
    if not (row and row[0]):
        raise SetupError(
            f"{dsn_hint} has no saga timelines (walsaga.tracked_saga): start "
            "`walsaga tracker --config tracker.toml` once, it creates them"
        )
