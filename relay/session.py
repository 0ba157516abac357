"""One replication session of a source: the hot loop and its timers.

The loop asks the pure parts what to do: :mod:`relay.protocol` reads and
writes the wire messages, :class:`~relay.routing.Router` turns a wal2json
message into a Kafka record, :class:`~relay.window.AckWindow` says which
position Kafka's acknowledgements allow to confirm, :class:`~relay.feedback.Feedback`
says when to tell the server. Each turn it reads what the socket has (up to a
budget), serves delivery callbacks, reports the position when due, and runs
the timers (slot check, heartbeat, outbox upkeep).

Delivery guarantee: at-least-once. Every event joins the window before it is
produced, so its acknowledgement is always counted, and the position reported
to the server never passes an event Kafka has not acknowledged. Any error
ends the session; the next one starts from the slot's confirmed position.
"""

from __future__ import annotations

import contextlib
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import KafkaException, Producer

from relay import outbox, protocol, slot
from relay.config import RelaySettings, SourceConfig
from relay.feedback import Feedback
from relay.metrics import LatencyWindow, SourceMetrics
from relay.routing import Record, Router
from relay.wal2json import HEARTBEAT_PREFIX, CommitTimes, format_lsn
from relay.window import AckWindow, Group
from walsaga.errors import DecodeError, DeliveryError, TransientError, from_psycopg

#: Messages handled per read turn before serving acknowledgements and timers.
READ_BUDGET = 5000
#: Slot lag and invalidation are checked this often.
SLOT_CHECK_INTERVAL_S = 2.0
#: How long a clean stop waits for Kafka to acknowledge what is in flight.
DRAIN_S = 30.0


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


@dataclass
class SessionContext:
    """What a session shares with the stream that runs it, across sessions."""

    source: SourceConfig
    settings: RelaySettings
    router: Router
    metrics: SourceMetrics
    status: StreamStatus
    latencies: LatencyWindow
    log: Any
    #: Set when the relay should stop; checked every turn.
    stopping: Callable[[], bool]
    #: Why the producer cannot be used any more (a fatal error), or None.
    producer_broken: Callable[[], str | None]
    #: The time a clean stop may take (draining gets most of it).
    drain_s: float = DRAIN_S


class Session:
    """One replication session: reads the slot, produces, confirms, until stopped or broken."""

    def __init__(
        self,
        ctx: SessionContext,
        conn: psycopg.Connection[Any],
        repl: psycopg.Connection[Any],
        producer: Producer,
        confirmed: int,
    ) -> None:
        self.ctx = ctx
        self.conn = conn
        self.pgconn = repl.pgconn
        self.producer = producer
        self.settings = ctx.settings
        self.metrics = ctx.metrics
        self.window = AckWindow(confirmed, on_retired=self._retired)
        self.server_wal_end = confirmed
        self.commit_times = CommitTimes()
        self.upkeep = outbox.Upkeep(conn, retention_s=self.settings.outbox_retention_s, log=ctx.log)
        now = time.monotonic()
        self.feedback = Feedback(confirmed, now, interval_s=self.settings.feedback_interval_s)
        self.last_data = now
        self.record = ctx.router.record
        self.produce = producer.produce
        self.next_heartbeat = now + self.settings.heartbeat_interval_s
        self.next_upkeep = now + self.settings.cleanup_interval_s
        self.next_slot_check = now
        self.published = 0

    def _retired(self, group: Group) -> None:
        if group.first_commit is not None:
            latency = time.time() - self.commit_times.epoch(group.first_commit)
            self.metrics.latency.observe(latency)
            self.ctx.latencies.add(latency, group.size)
        self.metrics.events.inc(group.size)
        self.metrics.bytes.inc(group.nbytes)
        self.published += group.size

    def loop(self) -> None:
        """Stream until the relay stops (then drain and confirm) or an error ends the session."""
        stopping = self.ctx.stopping
        window = self.window
        producer = self.producer
        feedback = self.feedback
        selector = selectors.DefaultSelector()
        selector.register(self.pgconn.socket, selectors.EVENT_READ)
        try:
            while not stopping():
                read = self._read()
                self._poll(0)
                confirmable = window.advance()
                now = time.monotonic()
                if feedback.due(now, confirmable):
                    self._feedback(now)
                if (
                    now >= self.next_slot_check
                    or now >= self.next_heartbeat
                    or now >= self.next_upkeep
                ):
                    self._timers(now)
                self._check_producer()
                if not read:
                    in_flight = len(producer)
                    self.metrics.in_flight.set(in_flight)
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
        unpack_start = protocol.XLOGDATA.unpack_from
        payload_at = protocol.XLOGDATA_PAYLOAD
        xlog_data, keepalive = protocol.XLOG_DATA, protocol.PRIMARY_KEEPALIVE
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
        while n < READ_BUDGET:
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
            if kind == xlog_data:
                data_seen = True
                lsn = unpack_start(data, 1)[0]
                try:
                    rec = record(data[payload_at:], lsn)
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
            elif kind == keepalive:
                wal_end, reply = protocol.keepalive(data)
                if wal_end > self.server_wal_end:
                    self.server_wal_end = wal_end
                window.position(wal_end)
                if reply:
                    self.feedback.reply_requested = True
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
        self.metrics.error("decode")
        self.ctx.log.error("undecodable message skipped", lsn=format_lsn(lsn), error=str(error))
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
            # confluent-kafka raises a fatal producer error from poll() rather
            # than passing it to error_cb: the session restarts with a new
            # producer, from the slot's confirmed position.
            raise TransientError(f"kafka producer failed: {e}") from e

    def _check_producer(self) -> None:
        broken = self.ctx.producer_broken()
        if broken:
            raise TransientError(f"kafka producer failed: {broken}")

    def _backpressure(self) -> None:
        """The producer's queue is full: stop reading, serve acks, keep the server informed."""
        self._poll(0.05)
        confirmable = self.window.advance()
        now = time.monotonic()
        if self.feedback.due(now, confirmable):
            self._feedback(now)
        self.metrics.in_flight.set(len(self.producer))
        self._check_producer()
        if self.ctx.stopping():
            raise TransientError("stopping while Kafka is not accepting events")

    def _stream_ended(self) -> None:
        result = self.pgconn.get_result()
        message = "replication stream ended"
        if result is not None and result.error_message:
            message = f"{message}: {result.error_message.decode(errors='replace').strip()}"
        raise TransientError(message)

    def _feedback(self, now: float) -> None:
        lsn = self.window.confirmable
        try:
            self.pgconn.put_copy_data(protocol.standby_status(lsn))
            self.pgconn.flush()
        except psycopg.OperationalError as e:
            raise TransientError(f"replication connection lost: {e}") from e
        self.feedback.sent(lsn, now)
        self.ctx.status.confirmed_lsn = lsn
        self.metrics.confirmed.set(lsn)

    def _timers(self, now: float) -> None:
        try:
            if now >= self.next_slot_check:
                self.next_slot_check = now + SLOT_CHECK_INTERVAL_S
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
            raise from_psycopg(e, f"source {self.ctx.source.name!r}") from e

    def _check_slot(self) -> None:
        state = slot.check_slot(self.conn, self.ctx.source.slot_name)
        status = self.ctx.status
        status.slot_lag_bytes = state.lag_bytes
        status.events_published += self.published
        self.published = 0
        if state.lag_bytes is not None:
            self.metrics.slot_lag.set(state.lag_bytes)

    def _drain(self) -> None:
        """Clean stop: wait for Kafka, confirm, leave.

        Events already read are still published. For a moment the loop goes on
        reading, so that a server keepalive can confirm past the last commit
        and a restart repeats nothing; under steady load it stops regardless.
        """
        deadline = time.monotonic() + self.ctx.drain_s * 0.7
        with contextlib.suppress(TransientError):
            while len(self.producer) and time.monotonic() < deadline:
                self._poll(0.05)
        settle_until = min(deadline, time.monotonic() + 0.5)
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
        self.ctx.status.events_published += self.published
        self.published = 0
        self.ctx.log.info("stopped", confirmed_lsn=format_lsn(self.window.confirmable))
