"""The saga tracker: a participant that keeps every saga's timeline in its own database.

It consumes the saga topics with the participant runtime (one transaction
per batch, the inbox, offsets stored only after the commit) and writes one
timeline row per record: its type, service, topic, partition and offset,
timestamp, the relay's ``lsn``, its headers and payload. Records are
correlated into sagas by their ``saga_id`` header or a configured header or
payload field (:mod:`participants.timeline`); each saga's summary (type,
status, start, end, deadline) is kept beside its timeline
(:mod:`participants.tracker_store`). Orchestrated sagas also take their
state from their orchestrators' databases, read every ``sync_every_s``.

Delivery: effectively once per record. Unlike a service, the tracker's inbox
holds event ids, not idempotency keys: a command sent again after a timeout
is the same request to its participant, but a second arrow on the timeline.
Timeline rows are keyed by event id too, so a repeat changes nothing even
after the inbox has forgotten it.

Metrics (``/metrics``): sagas started and ended by type and outcome, their
duration, and gauges of stuck and FAILED sagas of either style.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from participants import commit, orchestrated, tracker_store
from participants.handlers import HandlerContext, Route
from participants.message import Message
from participants.runtime import Participant, ParticipantMetrics
from participants.saga import Saga
from participants.timeline import entry_of
from participants.tracker_config import OrchestratorConfig, TrackerConfig, rules_of
from participants.tracker_store import Change
from walsaga import schema
from walsaga.errors import from_psycopg

log = structlog.get_logger("walsaga.tracker")

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 86400)
#: Pages of changed sagas read from one orchestrator per turn (the rest next turn).
MIRROR_PAGES_PER_TURN = 10
RETENTION_EVERY_S = 300.0


class TrackerMetrics:
    """The tracker's instruments: one set of saga metrics for both styles."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.started = Counter(
            "walsaga_tracker_sagas_started", "Sagas seen starting, by type",
            ["saga_type"], registry=r,
        )  # fmt: skip
        self.ended = Counter(
            "walsaga_tracker_sagas_ended",
            "Sagas that reached an end status (COMPLETED, COMPENSATED, FAILED, RESOLVED)",
            ["saga_type", "outcome"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "walsaga_tracker_saga_duration_seconds", "From a saga's start to its end",
            ["saga_type", "outcome"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.stuck = Gauge(
            "walsaga_tracker_sagas_stuck", "Sagas past their deadline without an end",
            ["saga_type"], registry=r,
        )  # fmt: skip
        self.failed = Gauge(
            "walsaga_tracker_sagas_failed", "Sagas FAILED (a compensation could not finish)",
            ["saga_type"], registry=r,
        )  # fmt: skip
        self.records = Counter(
            "walsaga_tracker_records", "Records seen, by what became of them",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.delay = Histogram(
            "walsaga_tracker_record_delay_seconds",
            "From a record's timestamp to its timeline row (before the commit)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self._gauge_labels: set[str] = set()

    def changed(self, change: Change) -> None:
        saga_type = change.saga_type or ""
        if change.started:
            self.started.labels(saga_type).inc()
        if change.ended:
            self.ended.labels(saga_type, change.status).inc()
            if change.duration_s is not None:
                self.duration.labels(saga_type, change.status).observe(change.duration_s)

    def attention(self, stuck: dict[str, int], failed: dict[str, int]) -> None:
        self._gauge_labels |= set(stuck) | set(failed)
        for saga_type in self._gauge_labels:
            self.stuck.labels(saga_type).set(stuck.get(saga_type, 0))
            self.failed.labels(saga_type).set(failed.get(saga_type, 0))


@dataclass(frozen=True)
class TrackedRecord(Message):
    """A record as the tracker takes it: deduplicated by event id, with its timestamp."""

    timestamp_ms: int | None = None

    @property
    def dedupe_key(self) -> str:
        return self.id

    @property
    def at(self) -> datetime:
        if self.timestamp_ms is None:
            return datetime.now(UTC)
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)

    @classmethod
    def of(cls, message: Message, timestamp_ms: int | None) -> TrackedRecord:
        return cls(
            **{f.name: getattr(message, f.name) for f in fields(Message)},
            timestamp_ms=timestamp_ms,
        )


class TrackerParticipant(Participant):
    """The participant runtime, taking records as :class:`TrackedRecord` s, a transaction's
    records recorded together.

    The runtime hands handlers a :class:`Message` without the record's
    timestamp: the batch's timestamps are noted as it is fetched, in the
    thread that then handles it. Each transaction of the runtime starts by
    claiming its records in the inbox; the ones that were new are noted, and
    the tracker's handler records all of them at its first call in that
    transaction (one statement, one round trip), the later calls finding
    nothing left. The transaction, the inbox and the retries stay the
    runtime's: a transaction rolled back claims its records again.
    """

    def __init__(self, name: str, **settings: Any) -> None:
        super().__init__(name, **settings)
        self._batch = threading.local()

    def _next_batch(self, consumer: Consumer) -> list[Any]:
        records: list[Any] = super()._next_batch(consumer)
        stamps = {}
        for record in records:
            kind, ms = record.timestamp()
            if kind != TIMESTAMP_NOT_AVAILABLE:
                stamps[(record.topic(), record.partition(), record.offset())] = ms
        self._batch.stamps = stamps
        return records

    def handle(self, messages: Sequence[Message]) -> bool:
        stamps: dict[tuple[str, int, int], int] = getattr(self._batch, "stamps", {})
        tracked = [
            m
            if isinstance(m, TrackedRecord)
            else TrackedRecord.of(m, stamps.get((m.topic, m.partition, m.offset)))
            for m in messages
        ]
        return super().handle(tracked)

    def _claimed(self, messages: Sequence[Message], fresh: set[str]) -> None:
        seen: set[str] = set()
        todo = []
        for m in messages:
            if m.dedupe_key in fresh and m.dedupe_key not in seen:
                seen.add(m.dedupe_key)
                todo.append(m)
        self._batch.todo = todo

    def take_fresh(self) -> list[Message]:
        """The records of this thread's transaction not recorded yet (then none)."""
        todo: list[Message] = getattr(self._batch, "todo", [])
        self._batch.todo = []
        return todo


class Tracker:
    """The tracker of one ``tracker.toml``: its participant, handler and periodic work."""

    def __init__(self, config: TrackerConfig, *, metrics: ParticipantMetrics | None = None) -> None:
        config.require_kafka()
        self.config = config
        self.rules = rules_of(config)
        settings = config.tracker
        self.participant = TrackerParticipant(
            settings.name,
            dsn=settings.dsn,
            kafka=dict(config.kafka),
            batch_size=settings.batch_size,
            workers=settings.workers,
            shutdown_timeout_s=settings.shutdown_timeout_s,
            metrics=metrics,
        )
        self.metrics = TrackerMetrics(self.participant.metrics.registry)
        for topic in settings.topics:
            self.participant.add_route(
                Route(topic, None, self._on_record, failure_event=False, savepoint=False)
            )
        self.mirrors = [Mirror(o, self) for o in config.orchestrator]
        if self.mirrors:
            self.participant.every(settings.sync_every_s, self.sync, name="orchestrated sagas")
        self.participant.every(settings.gauges_every_s, self.refresh_gauges, name="saga gauges")
        self.participant.every(RETENTION_EVERY_S, self.forget_old, name="timeline retention")

    # -- running ---------------------------------------------------------------

    def prepare(self) -> None:
        """Create or upgrade the tracker's tables in its database."""
        try:
            with psycopg.connect(self.config.tracker.dsn, connect_timeout=10) as conn:
                schema.apply(conn, "core")
                schema.apply(conn, "tracker")
        except psycopg.Error as e:
            raise from_psycopg(e, "tracker database") from e

    def run(self) -> None:
        self.prepare()
        try:
            self.participant.run()
        finally:
            for mirror in self.mirrors:
                mirror.close()

    def stop(self) -> None:
        self.participant.stop()

    # -- records ---------------------------------------------------------------

    def _on_record(self, ctx: HandlerContext, message: Message) -> None:
        """Record every new record of the transaction (at its first one; see
        :class:`TrackerParticipant`)."""
        now = datetime.now(UTC)
        entries = []
        uncorrelated = 0
        delays = []
        for record in self.participant.take_fresh():
            at = record.at if isinstance(record, TrackedRecord) else now
            entry = entry_of(record, self.rules, at)
            if entry is None:
                uncorrelated += 1
                continue
            entries.append((entry, self.rules.deadline_s(entry.saga_type)))
            delays.append(max(0.0, (now - at).total_seconds()))
        if not entries and not uncorrelated:
            return
        recorded, changes = tracker_store.record(ctx.conn, entries)

        def counted() -> None:
            for delay in delays:
                self.metrics.delay.observe(delay)
            self.metrics.records.labels("recorded").inc(recorded)
            self.metrics.records.labels("repeat").inc(len(entries) - recorded)
            self.metrics.records.labels("uncorrelated").inc(uncorrelated)
            self._counted(changes)

        ctx.after_commit(counted)

    # -- periodic work -----------------------------------------------------------

    def sync(self, conn: psycopg.Connection[Any]) -> None:
        """Mirror what changed in each orchestrator's database (a failing one is skipped)."""
        changes: list[Change] = []
        for mirror in self.mirrors:
            changes += mirror.sync(conn)
        if changes:
            commit.after_commit(conn, lambda: self._counted(changes))

    def _counted(self, changes: list[Change]) -> None:
        for change in changes:
            self.metrics.changed(change)

    def refresh_gauges(self, conn: psycopg.Connection[Any]) -> None:
        stuck, failed = tracker_store.attention_counts(conn)
        self.metrics.attention(stuck, failed)

    def forget_old(self, conn: psycopg.Connection[Any]) -> None:
        tracker_store.forget_ended(conn, older_than_s=self.config.tracker.retention_days * 86400)


class Mirror:
    """The tracker's reading of one orchestrator's database."""

    def __init__(self, config: OrchestratorConfig, tracker: Tracker) -> None:
        self.config = config
        self.tracker = tracker
        self.definitions: dict[str, Saga] = config.load_definitions()
        self._conn: psycopg.Connection[Any] | None = None
        self._warned = False

    def sync(self, conn: psycopg.Connection[Any]) -> list[Change]:
        """Mirror this orchestrator's changed sagas in the tracker's transaction `conn`."""
        name = self.config.name
        after = orchestrated.read_from(tracker_store.cursor(conn, name))
        changes: list[Change] = []
        last: tracker_store.Cursor | None = None
        for _ in range(MIRROR_PAGES_PER_TURN):
            rows = self._read(after)
            if not rows:
                break
            changes += tracker_store.mirror(conn, name, rows, self.tracker.rules.deadline_s)
            after = (rows[-1].updated_at, rows[-1].id)
            last = tracker_store.Cursor(*after, caught_up=len(rows) < orchestrated.PAGE)
            if last.caught_up:
                break
        if last is not None:
            tracker_store.save_cursor(conn, name, last)
        return changes

    def _read(self, after: tuple[datetime, str]) -> list[tracker_store.OrchestratedRow]:
        """The next page of changes; none while the orchestrator's database is unreachable."""
        try:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = psycopg.connect(self.config.dsn, autocommit=True, connect_timeout=5)
            rows = orchestrated.changed_sagas(self._conn, after, self.definitions)
        except psycopg.Error as e:
            if not self._warned:
                log.warning("cannot read orchestrator", orchestrator=self.config.name,
                            error=str(e))  # fmt: skip
                self._warned = True
            return []
        if self._warned:
            log.info("reading orchestrator again", orchestrator=self.config.name)
            self._warned = False
        return rows

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
