"""Outbox upkeep and replay: what the relay does with rows of ``walsaga.outbox``.

The relay publishes from the WAL, never from the table, so rows are kept only
so that ``walsaga relay replay`` can re-publish them (after a lost slot, say).
Upkeep deletes rows older than the retention that are known to be published:
it notes the server's WAL position and the oldest running transaction id, and
once the slot's confirmed position has passed that WAL position, every row
written by an older transaction has been published.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
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


@dataclass(frozen=True)
class ReplayReport:
    published: int
    first_created_at: datetime | None
    last_created_at: datetime | None


def retained_events(
    conn: psycopg.Connection[Any], *, since: datetime | None = None, from_id: str | None = None
) -> Iterator[tuple[OutboxEvent, datetime]]:
    """Rows of the outbox from a time or an event id on, oldest first."""
    where = "true"
    params: list[Any] = []
    if from_id is not None:
        found = conn.execute("SELECT 1 FROM walsaga.outbox WHERE id = %s", (from_id,)).fetchone()
        if not found:
            raise PermanentError(f"no outbox row with id {from_id} (already removed by retention?)")
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
            event = OutboxEvent(
                row["id"],
                row["aggregatetype"],
                row["aggregateid"],
                row["type"],
                row["payload"].encode(),
                row["headers"] or None,
                int(row["xid"]),
                None,
            )
            yield event, row["created_at"]


def replay(
    conn: psycopg.Connection[Any],
    producer: Producer,
    router: Router,
    *,
    since: datetime | None = None,
    from_id: str | None = None,
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
    for event, created_at in retained_events(conn, since=since, from_id=from_id):
        topic, headers = router.route(event, 0)
        del headers["lsn"]
        headers["walsaga.replay"] = "1"
        while True:
            try:
                producer.produce(
                    topic, event.payload, event.aggregateid, headers=headers, on_delivery=delivered
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
    if progress is not None:
        progress(count)
    return ReplayReport(count, first, last)
