"""The relay as the console shows it: per source, the slot's lag and retained WAL, the
confirmed position, the event rate, which relay instance streams, and the events
Kafka refused (``walsaga.relay_dead_letter``).

Read from each source database (``pg_replication_slots``, ``pg_stat_replication``,
the outbox) and, where configured, from the relay instances' ``/healthz``.
The rate of published events needs two readings of a relay's count: the
console keeps the last reading of each, so the first page shows none.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from participants.tracker_config import RelaySourceConfig

#: The window over which the rate of written events is measured.
WRITE_RATE_WINDOW_S = 10


@dataclass(frozen=True)
class Slot:
    """A source's replication slot, as its database reports it."""

    exists: bool
    active: bool = False
    active_pid: int | None = None
    confirmed_lsn: str | None = None
    current_lsn: str | None = None
    lag_bytes: int | None = None
    retained_bytes: int | None = None
    lag_s: float | None = None
    wal_status: str | None = None


@dataclass(frozen=True)
class Instance:
    """One relay instance serving a source, as its ``/healthz`` tells."""

    url: str
    state: str  # streaming, standby, starting, ... or unreachable
    detail: str | None = None
    events_published: int | None = None


@dataclass(frozen=True)
class DeadLetter:
    event_id: str
    lsn: str
    topic: str
    key: str
    type: str
    reason: str
    code: str
    refused_at: datetime
    replayed_at: datetime | None


@dataclass(frozen=True)
class SourceReport:
    name: str
    slot_name: str
    slot: Slot | None
    instances: list[Instance]
    written_per_s: float | None
    published_per_s: float | None
    dead_letters: list[DeadLetter]
    dead_letters_waiting: int
    error: str | None = None

    @property
    def role(self) -> str:
        """Who streams the source: the instance that does, else the slot's word."""
        streaming = [i for i in self.instances if i.state == "streaming"]
        if streaming:
            standby = sum(1 for i in self.instances if i.state == "standby")
            return "active" + (f" ({standby} standby)" if standby else "")
        if self.instances and all(i.state == "standby" for i in self.instances):
            return "standby"
        if self.slot is not None and self.slot.active:
            return "active"
        return "inactive"


_SLOT = """
SELECT s.active, s.active_pid, s.confirmed_flush_lsn::text, pg_current_wal_lsn()::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, s.wal_status,
       extract(epoch FROM coalesce(r.flush_lag, r.write_lag))
FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
WHERE s.slot_name = %s
"""


@dataclass
class RelayWatch:
    """Reads the state of the configured sources; remembers relay counts for rates."""

    sources: list[RelaySourceConfig]
    timeout_s: float = 3.0
    _last: dict[str, tuple[float, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self) -> list[SourceReport]:
        return [self._source(s) for s in self.sources]

    def _source(self, source: RelaySourceConfig) -> SourceReport:
        instances = [self._instance(url, source.name) for url in source.relay_urls]
        published = self._rate(source.name, instances)
        try:
            with psycopg.connect(
                source.dsn, autocommit=True, connect_timeout=max(1, int(self.timeout_s))
            ) as conn:
                slot = _slot(conn, source.slot_name)
                written = _written_per_s(conn)
                letters, waiting = _dead_letters(conn)
        except psycopg.Error as e:
            return SourceReport(source.name, source.slot_name, None, instances, None, published,
                                [], 0, error=str(e).strip().splitlines()[0])  # fmt: skip
        return SourceReport(source.name, source.slot_name, slot, instances, written, published,
                            letters, waiting)  # fmt: skip

    def _instance(self, url: str, source: str) -> Instance:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:  # noqa: S310
                report = json.loads(response.read())
        except urllib.error.HTTPError as e:  # 503 while degraded: the report still says why
            try:
                report = json.loads(e.read())
            except ValueError:
                return Instance(url, "unreachable", f"HTTP {e.code}")
        except (OSError, ValueError) as e:
            return Instance(url, "unreachable", str(e))
        found = (report.get("sources") or {}).get(source)
        if not isinstance(found, dict):
            return Instance(url, "not serving this source")
        published = found.get("events_published")
        return Instance(url, str(found.get("state")), found.get("detail"),
                        int(published) if published is not None else None)  # fmt: skip

    def _rate(self, source: str, instances: list[Instance]) -> float | None:
        counts = [i.events_published for i in instances if i.events_published is not None]
        if not counts:
            return None
        now, total = time.monotonic(), sum(counts)
        with self._lock:
            last = self._last.get(source)
            self._last[source] = (now, total)
        if last is None or now - last[0] < 0.5 or total < last[1]:
            return None
        return (total - last[1]) / (now - last[0])


def _slot(conn: psycopg.Connection[Any], name: str) -> Slot:
    row = conn.execute(_SLOT, (name,)).fetchone()
    if row is None:
        return Slot(exists=False)
    active, pid, confirmed, current, lag, retained, wal_status, lag_s = row
    if lag_s is None and lag == 0:
        lag_s = 0.0
    return Slot(True, bool(active), pid, confirmed, current, lag, retained,
                None if lag_s is None else float(lag_s), wal_status)  # fmt: skip


def _written_per_s(conn: psycopg.Connection[Any]) -> float | None:
    row = conn.execute(
        "SELECT CASE WHEN to_regclass('walsaga.outbox') IS NOT NULL THEN ("
        " SELECT count(*) FROM walsaga.outbox"
        " WHERE created_at > now() - make_interval(secs => %s)) END",
        (WRITE_RATE_WINDOW_S,),
    ).fetchone()
    return None if row is None or row[0] is None else row[0] / WRITE_RATE_WINDOW_S


def _dead_letters(conn: psycopg.Connection[Any], limit: int = 50) -> tuple[list[DeadLetter], int]:
    exists = conn.execute("SELECT to_regclass('walsaga.relay_dead_letter') IS NOT NULL").fetchone()
    if not (exists and exists[0]):
        return [], 0
    rows = conn.execute(
        """
        SELECT event_id, lsn::text, topic, key, type, reason, code, refused_at, replayed_at
        FROM walsaga.relay_dead_letter
        ORDER BY replayed_at IS NULL DESC, refused_at DESC LIMIT %s
        """,
        (limit,),
    ).fetchall()
    waiting = conn.execute(
        "SELECT count(*) FROM walsaga.relay_dead_letter WHERE replayed_at IS NULL"
    ).fetchone()
    return [DeadLetter(*r) for r in rows], int(waiting[0]) if waiting else 0
