"""Outbox upkeep and replay: what the relay does with rows of ``walsaga.outbox``.

The relay publishes from the WAL, never from the table, so rows are kept only
so that ``walsaga relay replay`` can re-publish them (after a lost slot, say).
Upkeep deletes rows older than the retention that are known to be published:
it notes the server's WAL position and the oldest running transaction id, and
once the slot's confirmed position has passed that WAL position, every row
written by an older transaction has been published. Rows of events Kafka
refused (noted in ``walsaga.relay_dead_letter``) are kept until replayed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from confluent_kafka import Producer
from psycopg.rows import dict_row

from relay.routing import Router
from relay.wal2json import OutboxEvent, parse_lsn
from walsaga.errors import PermanentError, TransientError

_BATCH = 10_000
_MAX_BATCHES_PER_RUN = 20


@dataclass(frozen=True)
class _Marker:
    lsn: int
    xid: str  # 32-bit xid: all transactions older than it had ended when noted


class Upkeep:
    """Deletes published outbox rows older than the retention."""

    def __init__(self, conn: psycopg.Connection[Any], *, retention_s: float, log: Any) -> None:
        self.conn = conn
        self.retention_s = retention_s
        self.log = log
        self._marker: _Marker | None = None
        self.deleted = 0

    def run(self, confirmed_lsn: int) -> int:
        """One pass; returns how many rows it deleted."""
        deleted = 0
        marker = self._marker
        if marker is not None and confirmed_lsn >= marker.lsn:
            for _ in range(_MAX_BATCHES_PER_RUN):
                cur = self.conn.execute(
                    """
                    DELETE FROM walsaga.outbox WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM walsaga.outbox
                        WHERE created_at < now() - make_interval(secs => %s)
                          AND age(xmin) > age(%s::xid)
                          AND NOT EXISTS (SELECT 1 FROM walsaga.relay_dead_letter d
                                          WHERE d.event_id = outbox.id::text
                                            AND d.replayed_at IS NULL)
                        LIMIT %s))
                    """,
                    (self.retention_s, marker.xid, _BATCH),
                )
                deleted += cur.rowcount
                if cur.rowcount < _BATCH:
                    self._marker = None
                    break
        if self._marker is None:
            row = self.conn.execute(
                """
                SELECT pg_current_wal_lsn()::text,
                       (pg_snapshot_xmin(pg_current_snapshot())::text::bigint % 4294967296)::text
                """
            ).fetchone()
            assert row is not None
            self._marker = _Marker(parse_lsn(row[0]), row[1])
        if deleted:
            self.deleted += deleted
            self.log.debug("outbox rows removed", rows=deleted)
        return deleted


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ReplayReport:
    published: int
    first_created_at: datetime | None
    last_created_at: datetime | None


def retained_events(
    conn: psycopg.Connection[Any],
    *,
    since: datetime | None = None,
    from_id: str | None = None,
    ids: Sequence[str] = (),
) -> Iterator[tuple[OutboxEvent, datetime]]:
    """Rows of the outbox from a time or an event id on, oldest first; or exactly `ids`.

    An id with no outbox row is looked up among the refused events the relay
    kept in full (``walsaga.relay_dead_letter``: events that had no row).
    """
    where = "true"
    params: list[Any] = []
    if ids:
        yield from _events_by_id(conn, ids)
        return
    if from_id is not None:
        found = (
            _is_uuid(from_id)
            and conn.execute(
                "SELECT 1 FROM walsaga.outbox WHERE id = %s::uuid", (from_id,)
            ).fetchone()
        )
        if not found:
            raise PermanentError(
                f"no outbox row with id {from_id} (already removed by retention, or an event "
                "without a row: re-publish it alone with --id)"
            )
        where = "(created_at, ctid) >= (SELECT created_at, ctid FROM walsaga.outbox WHERE id = %s)"
        params.append(from_id)
    elif since is not None:
        where = "created_at >= %s"
        params.append(since)
    query = f"""
        SELECT id::text, aggregatetype, aggregateid, type, payload::text AS payload,
               headers, created_at, xmin::text AS xid
        FROM walsaga.outbox WHERE {where} ORDER BY created_at, ctid
    """
    with conn.cursor(name="walsaga_replay", row_factory=dict_row) as cur:
        cur.itersize = 2000
        cur.execute(query, params)
        for row in cur:
            yield _row_event(row), row["created_at"]


def _row_event(row: dict[str, Any]) -> OutboxEvent:
    return OutboxEvent(
        row["id"],
        row["aggregatetype"],
        row["aggregateid"],
        row["type"],
        row["payload"].encode(),
        row["headers"] or None,
        int(row["xid"]) if row.get("xid") else None,
        None,
    )


def _events_by_id(
    conn: psycopg.Connection[Any], ids: Sequence[str]
) -> Iterator[tuple[OutboxEvent, datetime]]:
    for event_id in ids:
        with conn.cursor(row_factory=dict_row) as cur:
            row = None
            if _is_uuid(event_id):
                row = cur.execute(
                    """
                    SELECT id::text, aggregatetype, aggregateid, type, payload::text AS payload,
                           headers, created_at, xmin::text AS xid
                    FROM walsaga.outbox WHERE id = %s::uuid
                    """,
                    (event_id,),
                ).fetchone()
            if row is not None:
                yield _row_event(row), row["created_at"]
                continue
            kept = cur.execute(
                """
                SELECT event_id AS id, event->>'aggregatetype' AS aggregatetype,
                       event->>'aggregateid' AS aggregateid, event->>'type' AS type,
                       (event->'payload')::text AS payload, event->'headers' AS headers,
                       refused_at AS created_at, xid::text AS xid
                FROM walsaga.relay_dead_letter WHERE event_id = %s AND event IS NOT NULL
                """,
                (event_id,),
            ).fetchone()
        if kept is None:
            raise PermanentError(
                f"no event {event_id}: neither an outbox row (removed by retention?) nor a "
                "refused event the relay kept"
            )
        yield _row_event(kept), kept["created_at"]


def replay(
    conn: psycopg.Connection[Any],
    producer: Producer,
    router: Router,
    *,
    since: datetime | None = None,
    from_id: str | None = None,
    ids: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Publish retained rows again, waiting for Kafka to acknowledge every one.

    Consumers drop repeats by the ``id`` header, so replaying too much is safe;
    replaying too little is not, so when in doubt start earlier.
    """
    failures: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    count = 0
    first = last = None
    refused = {
        row[0]
        for row in conn.execute(
            "SELECT event_id FROM walsaga.relay_dead_letter WHERE replayed_at IS NULL"
        )
    }
    replayed: list[str] = []
    for event, created_at in retained_events(conn, since=since, from_id=from_id, ids=ids):
        if event.id in refused:
            replayed.append(event.id)
        topic, headers = router.route(event, 0)
        del headers["lsn"]
        headers["walsaga.replay"] = "1"
        # The commit time is not kept with a row: its transaction's start is
        # the nearest the table knows.
        started = created_at.isoformat()
        topic, value, key, headers, _ = router.shaped(
            topic, event.payload, event.aggregateid, headers, started
        )
        while True:
            try:
                producer.produce(
                    topic,
                    value,
                    key,
                    headers=headers,
                    on_delivery=delivered,
                    timestamp=int(created_at.timestamp() * 1000),
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        count += 1
        first = first or created_at
        last = created_at
        if progress is not None and count % 1000 == 0:
            progress(count)
    deadline = time.monotonic() + 60
    while len(producer) and time.monotonic() < deadline:
        producer.poll(0.1)
    if len(producer):
        raise TransientError(f"{len(producer)} replayed events not acknowledged by Kafka in 60s")
    if failures:
        raise TransientError(f"{len(failures)} replayed events failed: {failures[0]}")
    # Refused events that are now delivered: retention may take their rows again.
    conn.execute(
        "UPDATE walsaga.relay_dead_letter SET replayed_at = now() "
        "WHERE event_id = ANY(%s) AND replayed_at IS NULL",
        (replayed,),
    )
    conn.commit()
    if progress is not None:
        progress(count)
    return ReplayReport(count, first, last)
