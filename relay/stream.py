"""One source's stream: its replication slot, read with wal2json, published to Kafka.

The thin edge around the pure core (:mod:`relay.wal2json`, :mod:`relay.window`,
:mod:`relay.routing`). One thread per source runs :meth:`SourceStream.run`:
connect, check the set-up, take the slot (or stand by while another instance
holds it), then loop: read what the socket has, produce each event, serve
delivery callbacks, confirm what Kafka acknowledged, and keep timers
(heartbeat, outbox upkeep, slot bookkeeping).

Delivery guarantee: at-least-once. The slot's confirmed position only moves
to positions the :class:`~relay.window.AckWindow` allows, i.e. past events
Kafka acknowledged together with everything before them. Any error restarts
the session from the slot, so unacknowledged events are read and sent again
with the same ``id``.
"""

from __future__ import annotations

import contextlib
import selectors
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
import structlog
from confluent_kafka import KafkaError, KafkaException, Producer
from psycopg import pq, sql

from relay import outbox
from relay.config import RelayConfig, SourceConfig
from relay.errors import (
    PermanentError,
    SetupError,
    SlotBusyError,
    SlotLostError,
    TransientError,
    from_psycopg,
)
from relay.metrics import LatencyWindow, RelayMetrics
from relay.routing import Record, Router
from relay.wal2json import (
    HEARTBEAT_PREFIX,
    PLUGIN_OPTIONS,
    CommitTimes,
    DecodeError,
    format_lsn,
    parse_lsn,
)
from relay.window import AckWindow, DeliveryError, Group

log = structlog.get_logger("walsaga.relay")

_PG_EPOCH_OFFSET_US = 946_684_800 * 1_000_000  # 2000-01-01 in Unix microseconds
_XLOGDATA = struct.Struct(">QQQ")
_KEEPALIVE = struct.Struct(">QQB")
_STATUS = struct.Struct(">cQQQQB")
_W, _K = ord("w"), ord("k")

#: Messages handled per read turn before serving acknowledgements and timers.
_READ_BUDGET = 5000
#: Standby status updates go out at least this often, events or not.
_STATUS_INTERVAL_S = 10.0
#: Slot lag and invalidation are checked this often.
_SLOT_CHECK_INTERVAL_S = 2.0


# Errors that a retry cannot fix: access rules (42: undefined objects, missing
# privileges), authorization (28), no such database (3D).
_SETUP_SQLSTATE_CLASSES = ("42", "28", "3D")


def _refused_for_good(error: psycopg.Error) -> bool:
    """A connection attempt that failed on the credentials or the database name."""
    text = str(error)
    return any(
        marker in text
        for marker in ("password authentication failed", "does not exist", "no pg_hba.conf entry")
    )


def _pg_now_us() -> int:
    return int(time.time() * 1_000_000) - _PG_EPOCH_OFFSET_US


@dataclass
class StreamStatus:
    """What /healthz reports for a source."""

    state: str = "starting"
    detail: str = ""
    confirmed_lsn: int = 0
    slot_lag_bytes: int | None = None
    events_published: int = 0
    since: float = field(default_factory=time.time)

    def set(self, state: str, detail: str = "") -> None:
        if state != self.state or detail != self.detail:
            self.state, self.detail, self.since = state, detail, time.time()


class SourceStream:
    """Streams one source database to Kafka until :attr:`stop` is set."""

    def __init__(
        self,
        source: SourceConfig,
        config: RelayConfig,
        metrics: RelayMetrics,
        stop: threading.Event,
        *,
        producer_factory: Callable[[dict[str, Any]], Producer] = Producer,
    ) -> None:
        self.source = source
        self.config = config
        self.settings = config.relay
        self.stop = stop
        self.status = StreamStatus()
        self.latencies = LatencyWindow()
        self.log = log.bind(source=source.name, slot=source.slot_name)
        self.router = Router(config.template_for(source), source.name)
        self._producer_factory = producer_factory
        self._producer: Producer | None = None
        self._producer_broken: str | None = None
        self._broker_down = False
        self._m_events = metrics.events.labels(source.name)
        self._m_bytes = metrics.bytes.labels(source.name)
        self._m_in_flight = metrics.in_flight.labels(source.name)
        self._m_lag = metrics.slot_lag.labels(source.name)
        self._m_confirmed = metrics.confirmed.labels(source.name)
        self._m_streaming = metrics.streaming.labels(source.name)
        self._m_latency = metrics.latency.labels(source.name)
        self._m_restarts = metrics.restarts.labels(source.name)
        self._metrics = metrics

    # -- lifecycle ---------------------------------------------------------

    def run(self) -> None:
        """Stream until stopped. Raises only for errors that retrying cannot fix."""
        delay = self.settings.retry_min_s
        standby_logged = False
        try:
            while not self.stop.is_set():
                try:
                    self._session()
                    delay = self.settings.retry_min_s
                except SlotBusyError as e:
                    self._m_streaming.set(0)
                    if not standby_logged:
                        self.log.info("standby: another relay streams this slot", detail=str(e))
                        standby_logged = True
                    self.status.set("standby", str(e))
                    self.stop.wait(self.settings.standby_retry_s)
                except (SetupError, SlotLostError) as e:
                    self._m_streaming.set(0)
                    self._error("fatal", e)
                    self.status.set("failed", str(e))
                    raise
                except (TransientError, DeliveryError, PermanentError, psycopg.Error) as e:
                    self._m_streaming.set(0)
                    standby_logged = False
                    self._m_restarts.inc()
                    self._error("stream", e)
                    self.status.set("retrying", f"{e}; retrying in {delay:.1f}s")
                    self.log.warning("stream interrupted, retrying", error=str(e), retry_in_s=delay)
                    self.stop.wait(delay)
                    delay = min(delay * 2, self.settings.retry_max_s)
        finally:
            self._m_streaming.set(0)
            self._close_producer()
            if self.status.state != "failed":
                self.status.set("stopped")

    def _error(self, kind: str, exc: BaseException) -> None:
        self._metrics.errors.labels(self.source.name, kind).inc()
        if kind == "fatal":
            self.log.error("source stopped", error=str(exc))

    # -- producer ----------------------------------------------------------

    def _on_kafka_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._producer_broken = err.str()
            self.log.error("kafka producer failed", error=err.str())
        elif err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            if not self._broker_down:
                self.log.warning("kafka unreachable, retrying", error=err.str())
            self._broker_down = True
        self._metrics.errors.labels(self.source.name, "kafka").inc()

    def _producer_ready(self) -> Producer:
        if self._producer is not None and self._producer_broken is None:
            return self._producer
        self._close_producer(flush=False)
        settings = self.config.producer_settings()
        settings["error_cb"] = self._on_kafka_error
        settings.setdefault("client.id", f"walsaga-relay-{self.source.name}")
        self._producer_broken = None
        self._producer = self._producer_factory(settings)
        return self._producer

    def _wait_for_broker(self, producer: Producer) -> None:
        """Take the slot only once Kafka answers: a standby that can publish is better."""
        waited = False
        while not self.stop.is_set():
            try:
                producer.list_topics(timeout=5.0)
                if waited:
                    self.log.info("kafka reachable again")
                self._broker_down = False
                return
            except KafkaException as e:
                if not waited:
                    self.log.warning(
                        "waiting for kafka",
                        bootstrap_servers=self.config.kafka.get("bootstrap.servers"),
                        error=str(e),
                    )
                waited = True
                self.status.set("waiting", f"kafka unreachable: {e}")

    def _close_producer(self, *, flush: bool = True) -> None:
        producer, self._producer = self._producer, None
        if producer is not None and flush:
            producer.flush(10.0)

    # -- session -----------------------------------------------------------

    def _session(self) -> None:
        try:
            conn = psycopg.connect(self.source.dsn, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            if _refused_for_good(e):
                raise SetupError(f"cannot connect to source {self.source.name!r}: {e}") from e
            raise from_psycopg(e, f"cannot connect to source {self.source.name!r}") from e
        with conn:
            try:
                check_source(conn, self.source)
                confirmed = ensure_slot(conn, self.source.slot_name, self.log)
            except psycopg.Error as e:
                if (e.sqlstate or "").startswith(_SETUP_SQLSTATE_CLASSES):
                    raise SetupError(f"source {self.source.name!r}: {e}") from e
                raise from_psycopg(e, f"source {self.source.name!r}") from e
            producer = self._producer_ready()
            self._wait_for_broker(producer)
            if self.stop.is_set():
                return
            repl = self._start_replication()
            try:
                self._m_streaming.set(1)
                self.status.set("streaming")
                self.log.info("streaming", from_lsn=format_lsn(confirmed))
                _Session(self, conn, repl, producer, confirmed).loop()
            finally:
                # Not `with repl`: leaving it would try to end a transaction
                # on a connection that is in COPY mode.
                repl.close()

    def _start_replication(self) -> psycopg.Connection[Any]:
        try:
            repl = psycopg.connect(
                self.source.dsn, replication="database", autocommit=True, connect_timeout=10
            )
        except psycopg.Error as e:
            raise from_psycopg(
                e, f"cannot open a replication connection to {self.source.name!r}"
            ) from e
        options = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v))
            for k, v in PLUGIN_OPTIONS.items()
        )
        command = sql.SQL("START_REPLICATION SLOT {} LOGICAL 0/0 ({})").format(
            sql.Identifier(self.source.slot_name), options
        )
        try:
            repl.execute(command)
        except psycopg.errors.ObjectInUse as e:
            repl.close()
            raise SlotBusyError(e.diag.message_primary or str(e)) from e
        except psycopg.errors.UndefinedFile as e:
            repl.close()
            raise SetupError(_no_wal2json(self.source.name)) from e
        except psycopg.Error as e:
            repl.close()
            raise from_psycopg(e, f"START_REPLICATION on {self.source.name!r}") from e
        if repl.pgconn.status != pq.ConnStatus.OK or repl.pgconn.transaction_status not in (
            pq.TransactionStatus.ACTIVE,
            pq.TransactionStatus.IDLE,
        ):
            repl.close()
            raise TransientError("replication did not start")
        return repl


def _no_wal2json(source: str) -> str:
    return (
        f"source {source!r}: the wal2json output plugin is not installed on the server "
        "(Debian: apt-get install postgresql-15-wal2json)"
    )


def check_source(conn: psycopg.Connection[Any], source: SourceConfig) -> None:
    """Refuse to start, with what to do, when the source is not set up for the relay."""
    row = conn.execute(
        """
        SELECT current_setting('wal_level'),
               EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE n.nspname = 'walsaga' AND c.relname = 'outbox'),
               (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
               current_database(), current_user
        """
    ).fetchone()
    assert row is not None
    wal_level, deployed, may_replicate, dbname, user = row
    if wal_level != "logical":
        raise SetupError(
            f"source {source.name!r}: wal_level is {wal_level!r}; the relay needs "
            "wal_level=logical (set it in postgresql.conf and restart Postgres)"
        )
    if not deployed:
        raise SetupError(
            f"source {source.name!r}: database {dbname!r} has no walsaga schema; "
            "deploy it first with: walsaga deploy --dsn <dsn of that database>"
        )
    if not may_replicate:
        raise SetupError(
            f"source {source.name!r}: role {user!r} lacks the REPLICATION attribute "
            "(ALTER ROLE ... REPLICATION, or use the role `walsaga deploy --relay-role` creates)"
        )
    missing = conn.execute(
        """
        SELECT array_remove(ARRAY[
            CASE WHEN NOT has_schema_privilege('walsaga', 'USAGE')
                 THEN 'USAGE on schema walsaga' END,
            CASE WHEN NOT has_table_privilege('walsaga.outbox', 'SELECT, DELETE')
                 THEN 'SELECT, DELETE on walsaga.outbox' END,
            CASE WHEN NOT has_table_privilege('walsaga.relay_slot', 'SELECT, INSERT, UPDATE')
                 THEN 'SELECT, INSERT, UPDATE on walsaga.relay_slot' END
        ], NULL)
        """
    ).fetchone()
    if missing and missing[0]:
        raise SetupError(
            f"source {source.name!r}: role {user!r} lacks {'; '.join(missing[0])} "
            "(grant them, or use the role `walsaga deploy --relay-role` creates)"
        )


def ensure_slot(conn: psycopg.Connection[Any], slot: str, logger: Any) -> int:
    """Create the slot if it never existed; refuse if it was invalidated or lost.

    Returns the slot's confirmed position.
    """
    row = conn.execute(
        """
        SELECT plugin, database, wal_status, confirmed_flush_lsn::text
        FROM pg_replication_slots WHERE slot_name = %s
        """,
        (slot,),
    ).fetchone()
    dbname = conn.info.dbname
    if row is not None:
        plugin, database, wal_status, confirmed = row
        if plugin != "wal2json" or database != dbname:
            raise SetupError(
                f"slot {slot!r} exists but belongs to plugin {plugin!r} on database {database!r}; "
                "choose another slot name in the relay config"
            )
        if wal_status == "lost":
            raise SlotLostError(
                f"slot {slot!r} was invalidated by Postgres (max_slot_wal_keep_size exceeded): "
                "events in the WAL it needed are gone. Run `walsaga relay reset-slot`, start the "
                "relay, then re-publish from the outbox with `walsaga relay replay --since ...`"
            )
        return parse_lsn(confirmed) if confirmed else 0
    known = conn.execute(
        """
        SELECT created_at, confirmed_lsn::text, seen_at
        FROM walsaga.relay_slot WHERE slot_name = %s
        """,
        (slot,),
    ).fetchone()
    if known is not None:
        created_at, last_lsn, seen_at = known
        since = (seen_at or created_at) - timedelta(minutes=10)
        raise SlotLostError(
            f"slot {slot!r}, created by the relay at {created_at}, has disappeared "
            f"(last confirmed {last_lsn or 'unknown'} at {seen_at or 'unknown'}): events written "
            "since may never have been published. Run `walsaga relay reset-slot`, start the "
            "relay, then re-publish what it may have missed with `walsaga relay replay --since "
            f"'{since.isoformat(sep=' ', timespec='seconds')}'` (a margin before the last "
            "confirmation: a transaction may have started earlier than it committed)"
        )
    try:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))
    except psycopg.errors.DuplicateObject:
        pass  # another instance created it a moment ago
    except psycopg.errors.UndefinedFile as e:
        raise SetupError(_no_wal2json(dbname)) from e
    conn.execute(
        "INSERT INTO walsaga.relay_slot (slot_name) VALUES (%s) ON CONFLICT DO NOTHING", (slot,)
    )
    logger.info("created replication slot")
    got = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    return parse_lsn(got[0]) if got and got[0] else 0


class _Session:
    """One replication session: the hot loop and its timers."""

    def __init__(
        self,
        stream: SourceStream,
        conn: psycopg.Connection[Any],
        repl: psycopg.Connection[Any],
        producer: Producer,
        confirmed: int,
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.pgconn = repl.pgconn
        self.producer = producer
        self.settings = stream.settings
        self.window = AckWindow(confirmed, on_retired=self._retired)
        self.sent = confirmed  # last position reported to the server
        self.server_wal_end = confirmed
        self.commit_times = CommitTimes()
        self.upkeep = outbox.Upkeep(
            conn,
            retention_s=self.settings.outbox_retention_s,
            log=stream.log,
        )
        now = time.monotonic()
        self.last_feedback = now
        self.last_data = now
        self.record = stream.router.record
        self.produce = producer.produce
        self.next_heartbeat = now + self.settings.heartbeat_interval_s
        self.next_upkeep = now + self.settings.cleanup_interval_s
        self.next_slot_check = now
        self.reply_requested = False
        self.published = 0

    def _retired(self, group: Group) -> None:
        if group.first_commit is not None:
            latency = time.time() - self.commit_times.epoch(group.first_commit)
            self.stream._m_latency.observe(latency)
            self.stream.latencies.add(latency, group.size)
        self.stream._m_events.inc(group.size)
        self.stream._m_bytes.inc(group.nbytes)
        self.published += group.size

    def loop(self) -> None:
        stream = self.stream
        stop = stream.stop
        pgconn = self.pgconn
        window = self.window
        producer = self.producer
        selector = selectors.DefaultSelector()
        selector.register(pgconn.socket, selectors.EVENT_READ)
        try:
            while not stop.is_set():
                read = self._read()
                try:
                    producer.poll(0)
                except KafkaException as e:
                    raise self._producer_failed(e) from e
                confirmable = window.advance()
                now = time.monotonic()
                if (
                    self.reply_requested
                    or (
                        confirmable > self.sent
                        and now - self.last_feedback >= self.settings.feedback_interval_s
                    )
                    or now - self.last_feedback >= _STATUS_INTERVAL_S
                ):
                    self._feedback(now)
                if (
                    now >= self.next_slot_check
                    or now >= self.next_heartbeat
                    or (now >= self.next_upkeep)
                ):
                    self._timers(now)
                if stream._producer_broken:
                    raise TransientError(f"kafka producer failed: {stream._producer_broken}")
                if not read:
                    in_flight = len(producer)
                    stream._m_in_flight.set(in_flight)
                    # Acknowledgements arrive through poll(): while any are due,
                    # wake often; otherwise sleep until the socket or a timer.
                    timeout = 0.001 if in_flight or len(window) else 0.05
                    selector.select(timeout)
            self._drain()
        finally:
            selector.close()

    def _read(self) -> int:
        """Handle what the socket has, up to the budget; return how many messages.

        The hot path: one call builds an event's Kafka record
        (:meth:`~relay.routing.Router.record`) and the event joins the window
        before it is produced, so its acknowledgement is always counted.
        """
        pgconn = self.pgconn
        window = self.window
        get_copy_data = pgconn.get_copy_data
        unpack_lsn = _XLOGDATA.unpack_from
        record = self.record
        produce = self.produce
        event = window.event
        consume_input = self._consume_input
        group: Group | None = None
        ack: Callable[[Any, Any], None] | None = None
        consume_input()
        n = 0
        data_seen = False
        refilled = False
        while n < _READ_BUDGET:
            nbytes, data = get_copy_data(1)
            if nbytes <= 0:
                if nbytes < 0:
                    self._stream_ended()
                # While Postgres keeps sending, keep reading: each turn of the
                # loop costs system calls and bookkeeping, better spread over
                # many messages.
                if refilled or not data_seen:
                    break
                refilled = True
                consume_input()
                continue
            refilled = False
            n += 1
            kind = data[0]
            if kind == _W:
                data_seen = True
                lsn = unpack_lsn(data, 1)[0]
                try:
                    rec = record(data[25:], lsn)
                except DecodeError as e:
                    self._undecodable(lsn, e)
                    continue
                if type(rec) is not tuple:
                    window.position(lsn)  # a heartbeat, or nothing to publish
                    continue
                topic, value, key, headers, commit_time = rec
                g = event(lsn, commit_time)
                if g is not group:
                    group = g
                    ack = g.ack
                g.nbytes += len(value) + len(key)
                try:
                    produce(topic, value, key, headers=headers, on_delivery=ack)
                except BufferError:
                    self._produce_when_possible(rec, ack)  # type: ignore[arg-type]
                except KafkaException as e:
                    raise DeliveryError(
                        f"cannot produce event {headers.get('id')!r} to {topic!r}: {e}"
                    ) from e
            elif kind == _K:
                wal_end, _clock, reply = _KEEPALIVE.unpack_from(data, 1)
                if wal_end > self.server_wal_end:
                    self.server_wal_end = wal_end
                window.position(wal_end)
                if reply:
                    self.reply_requested = True
        if data_seen:
            window.seal()
            self.last_data = time.monotonic()
        return n

    def _consume_input(self) -> None:
        try:
            self.pgconn.consume_input()
        except psycopg.OperationalError as e:
            raise TransientError(f"replication connection lost: {e}") from e

    def _undecodable(self, lsn: int, error: DecodeError) -> None:
        # Not an event we can publish, and retrying cannot change that: say so
        # loudly and move past it (the row, if any, stays in the outbox).
        self.stream._error("decode", error)
        self.stream.log.error("undecodable message skipped", lsn=format_lsn(lsn), error=str(error))
        self.window.position(lsn)

    def _produce_when_possible(self, rec: Record, ack: Callable[[Any, Any], None]) -> None:
        """The producer's queue was full: serve acknowledgements until the record fits."""
        topic, value, key, headers, _ = rec
        while True:
            self._backpressure()
            try:
                self.produce(topic, value, key, headers=headers, on_delivery=ack)
                return
            except BufferError:
                continue
            except KafkaException as e:
                raise DeliveryError(
                    f"cannot produce event {headers.get('id')!r} to {topic!r}: {e}"
                ) from e

    def _poll(self, timeout_s: float) -> None:
        try:
            self.producer.poll(timeout_s)
        except KafkaException as e:
            raise self._producer_failed(e) from e

    def _producer_failed(self, error: KafkaException) -> TransientError:
        # confluent-kafka raises a fatal producer error from poll() rather than
        # passing it to error_cb: the session restarts with a new producer, from
        # the slot's confirmed position.
        self.stream._producer_broken = str(error)
        return TransientError(f"kafka producer failed: {error}")

    def _backpressure(self) -> None:
        """The producer's queue is full: stop reading, serve acks, keep the server informed."""
        self._poll(0.05)
        confirmable = self.window.advance()
        now = time.monotonic()
        if confirmable > self.sent or now - self.last_feedback >= _STATUS_INTERVAL_S:
            self._feedback(now)
        self.stream._m_in_flight.set(len(self.producer))
        if self.stream._producer_broken:
            raise TransientError(f"kafka producer failed: {self.stream._producer_broken}")
        if self.stream.stop.is_set():
            raise TransientError("stopping while Kafka is not accepting events")

    def _stream_ended(self) -> None:
        result = self.pgconn.get_result()
        message = "replication stream ended"
        if result is not None and result.error_message:
            message = f"{message}: {result.error_message.decode(errors='replace').strip()}"
        raise TransientError(message)

    def _feedback(self, now: float) -> None:
        lsn = self.window.confirmable
        msg = _STATUS.pack(b"r", lsn, lsn, lsn, _pg_now_us(), 0)
        try:
            self.pgconn.put_copy_data(msg)
            self.pgconn.flush()
        except psycopg.OperationalError as e:
            raise TransientError(f"replication connection lost: {e}") from e
        self.sent = lsn
        self.last_feedback = now
        self.reply_requested = False
        self.stream.status.confirmed_lsn = lsn
        self.stream._m_confirmed.set(lsn)

    def _timers(self, now: float) -> None:
        try:
            if now >= self.next_slot_check:
                self.next_slot_check = now + _SLOT_CHECK_INTERVAL_S
                self._check_slot()
            if now >= self.next_heartbeat:
                self.next_heartbeat = now + self.settings.heartbeat_interval_s
                if now - self.last_data >= self.settings.heartbeat_interval_s:
                    self.conn.execute(
                        "SELECT pg_logical_emit_message(false, %s, '')", (HEARTBEAT_PREFIX,)
                    )
            if now >= self.next_upkeep:
                self.next_upkeep = now + self.settings.cleanup_interval_s
                self.upkeep.run(self.window.confirmable)
        except psycopg.Error as e:
            raise from_psycopg(e, f"source {self.stream.source.name!r}") from e

    def _check_slot(self) -> None:
        row = self.conn.execute(
            """
            SELECT pg_current_wal_lsn()::text, confirmed_flush_lsn::text, wal_status
            FROM pg_replication_slots WHERE slot_name = %s
            """,
            (self.stream.source.slot_name,),
        ).fetchone()
        if row is None:
            raise SlotLostError(
                f"slot {self.stream.source.slot_name!r} was dropped while streaming"
            )
        current, confirmed, wal_status = row
        if wal_status == "lost":
            raise SlotLostError(
                f"slot {self.stream.source.slot_name!r} was invalidated by Postgres"
            )
        lag = parse_lsn(current) - parse_lsn(confirmed) if confirmed else None
        self.stream.status.slot_lag_bytes = lag
        self.stream.status.events_published += self.published
        self.published = 0
        if lag is not None:
            self.stream._m_lag.set(lag)
        self.conn.execute(
            """
            UPDATE walsaga.relay_slot SET confirmed_lsn = %s, seen_at = now()
            WHERE slot_name = %s
            """,
            (confirmed, self.stream.source.slot_name),
        )

    def _drain(self) -> None:
        """Clean stop: wait for Kafka, confirm, leave.

        Events already read are still published. For a moment the loop goes on
        reading, so that a server keepalive can confirm past the last commit
        and a restart repeats nothing; under steady load it stops regardless.
        """
        deadline = time.monotonic() + 30.0
        with contextlib.suppress(TransientError):
            while len(self.producer) and time.monotonic() < deadline:
                self._poll(0.05)
        settle_until = time.monotonic() + 0.5
        with contextlib.suppress(TransientError, DeliveryError):
            while time.monotonic() < settle_until:
                self._feedback(time.monotonic())
                time.sleep(0.01)
                self._read()
                self._poll(0.01)
                self.window.advance()
                if not len(self.window) and self.window.confirmable >= self.server_wal_end:
                    break
            self._feedback(time.monotonic())
        self.stream.status.events_published += self.published
        self.published = 0
        self.stream.log.info("stopped", confirmed_lsn=format_lsn(self.window.confirmable))
