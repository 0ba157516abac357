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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import orjson
import psycopg
from confluent_kafka import KafkaException, Producer

from relay import delivery, outbox, protocol, slot
from relay.config import OnRefused, RelaySettings, SourceConfig
from relay.delivery import DEAD_LETTER_TOPIC, GAP_HEADER, Failure, Refused, SourceHaltedError
from relay.feedback import Feedback
from relay.metrics import HopStages, LatencyWindow, SourceMetrics
from relay.routing import Record, Router
from relay.wal2json import HEARTBEAT_PREFIX, CommitTimes, format_lsn, parse_lsn
from relay.window import AckWindow, Group
from walsaga.errors import DecodeError, DeliveryError, TransientError, from_psycopg

#: Messages handled per read turn before serving acknowledgements and timers.
READ_BUDGET = 5000
#: How long a send at once waits for its acknowledgement (``linger_when_idle``).
SEND_NOW_WAIT_S = 0.005
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
    stages: HopStages
    log: Any
    #: Set when the relay should stop; checked every turn.
    stopping: Callable[[], bool]
    #: Why the producer cannot be used any more (a fatal error), or None.
    producer_broken: Callable[[], str | None]
    #: What to do with an event Kafka refuses for good.
    on_refused: OnRefused = "dead-letter"
    dead_letter_topic: str = DEAD_LETTER_TOPIC
    #: The producer's size limit for one record (bounds the dead-letter report).
    message_max_bytes: int = 1_000_000
    #: The time a clean stop may take (draining gets most of it).
    drain_s: float = DRAIN_S
    #: Where the source halted last (None: not halted); cleared once confirmed past it.
    halted_at: int | None = None


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
        self.commit_times = CommitTimes()  # of groups retiring (older transactions)
        self.record_times = CommitTimes()  # of events read (the transaction being read)
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
        #: (topic, key) -> id of a dead-lettered event whose key has not had a next event yet.
        self.gaps: dict[tuple[str, str], str] = {}
        self.gaps_reported: list[tuple[str, str]] = []
        #: Set by a dead-letter report Kafka would not take either.
        self.halt_reason: str | None = None
        self._load_gaps()

    def _retired(self, group: Group) -> None:
        if group.first_commit is not None:
            acked = time.time()
            commit = self.commit_times.epoch(group.first_commit)
            latency = acked - commit
            self.metrics.latency.observe(latency)
            self.ctx.latencies.add(latency, group.size)
            if group.sent_clock:
                sent = (group.sent_clock + protocol.PG_EPOCH_OFFSET_US) / 1e6
                self.ctx.stages.add(commit, sent, group.read_at, acked)
        self.metrics.events.inc(group.size)
        self.metrics.bytes.inc(group.nbytes)
        self.published += group.size

    def loop(self) -> None:
        """Stream until the relay stops (then drain and confirm) or an error ends the session."""
        stopping = self.ctx.stopping
        window = self.window
        producer = self.producer
        feedback = self.feedback
        send_at_once = not self.settings.linger_when_idle
        selector = selectors.DefaultSelector()
        selector.register(self.pgconn.socket, selectors.EVENT_READ)
        try:
            while not stopping():
                idle = send_at_once and not len(producer)
                read = self._read()
                if idle and 0 < read < READ_BUDGET and len(producer):
                    # Nothing was in flight and the relay has caught up with
                    # the WAL: no batch is forming, so waiting linger.ms would
                    # only delay this one (a saga's next step). Under load
                    # something is always in flight and linger.ms batches.
                    self._send_now()
                else:
                    self._poll(0)
                if window.failed:
                    self._resolve_failures()
                if self.halt_reason is not None:
                    raise SourceHaltedError(self.halt_reason)
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
                if read < READ_BUDGET:
                    # The socket is drained (a read stops short of its budget
                    # only then): sleep until it has more, rather than turn
                    # again to read nothing. Acknowledgements arrive through
                    # poll(): while any are due, wake often; otherwise sleep
                    # until the socket or a timer.
                    in_flight = len(producer)
                    self.metrics.in_flight.set(in_flight)
                    timeout = 0.001 if in_flight or len(window) else 0.05
                    selector.select(timeout)
            self._drain()
        except SourceHaltedError:
            self._settle()
            raise
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
        commit_ms = self.record_times.millis
        gaps = self.gaps
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
                if gaps:
                    self._close_gap(topic, key, headers)
                g = event(lsn, commit_time)
                if g is not group:
                    group = g
                    ack = g.ack
                    if not g.sent_clock:  # the group's first event: its hop's stages
                        g.sent_clock = unpack_start(data, 1)[2]
                        g.read_at = time.time()
                g.nbytes += len(value) + len(key)
                try:
                    produce(topic, value, key, headers=headers, on_delivery=ack,
                            timestamp=commit_ms(commit_time))  # fmt: skip
                except BufferError:
                    self._produce_when_possible(rec, g, lsn)
                except KafkaException as e:
                    self._refused_at_once(g, rec, lsn, e)
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

    def _produce_when_possible(self, rec: Record, group: Group, lsn: int) -> None:
        """The producer's queue was full: serve acknowledgements until the record fits."""
        topic, value, key, headers, _ = rec
        while True:
            self._backpressure()
            try:
                self.produce(topic, value, key, headers=headers, on_delivery=group.ack,
                             timestamp=self.record_times.millis(rec[4]))  # fmt: skip
                return
            except BufferError:
                continue
            except KafkaException as e:
                self._refused_at_once(group, rec, lsn, e)
                return

    # -- events Kafka does not take (see relay.delivery) ------------------

    def _refused_at_once(self, group: Group, rec: Record, lsn: int, exc: KafkaException) -> None:
        """produce() itself refused the record (too large for the producer, say)."""
        topic, value, key, headers, _ = rec
        error = exc.args[0] if exc.args else None
        code = error.code() if error is not None else None
        failure = delivery.classify(code) if code is not None else Failure.TRANSIENT
        event_id = str(headers.get("id"))
        if failure is Failure.TRANSIENT:
            raise DeliveryError(f"cannot produce event {event_id!r} to {topic!r}: {exc}") from exc
        reason = error.str() if error is not None else str(exc)
        if failure is Failure.BLOCKED:
            self._halt(failure, f"event {event_id} to {topic!r}: {reason}", lsn)
        text_key = key.decode(errors="replace") if isinstance(key, bytes) else key
        refused = Refused(
            event_id, topic, text_key, value, headers, lsn, reason, delivery.error_name(error)
        )
        self._refuse(group, refused)

    def _resolve_failures(self) -> None:
        """Delivery reports with errors: decide per record what they mean.

        A broker fails a whole produce batch for one record it refuses, so
        every refused record is first sent again on its own, after everything
        in flight has settled: only one refused alone is refused for good.
        """
        items: list[tuple[Group, Any, Any]] = []
        deadline = time.monotonic() + 30.0
        while self.window.failed:
            for group in self.window.take_failed():
                items.extend((group, err, msg) for err, msg in group.failures or ())
                group.resolved()
            found = delivery.triage([(err, msg) for _, err, msg in items])
            if found.next_step is Failure.BLOCKED:
                err, msg = found.blocked[0]
                self._halt(Failure.BLOCKED, f"{_describe(msg)}: {err.str()}", _lsn_of(msg))
            if found.next_step is Failure.TRANSIENT:
                err, msg = found.transient[0]
                raise DeliveryError(f"kafka failed {_describe(msg)}: {err.str()}")
            # Let everything in flight settle, so each record sent again is alone.
            while len(self.producer) and time.monotonic() < deadline:
                self._poll(0.05)
                self._check_producer()
            if len(self.producer):
                raise TransientError("kafka did not settle in-flight events in time")
        for group, err, msg in items:
            self.ctx.log.warning(
                "kafka refused an event, sending it again alone",
                record=_describe(msg),
                error=err.str(),
            )
            group.pending += 1  # the retry takes the event's place again
            again = self._send_alone(msg)
            if again is None:
                group.pending -= 1  # delivered on its own: its batch was refused for another
                continue
            failure = delivery.classify(again.code())
            if failure is Failure.TRANSIENT:
                raise DeliveryError(f"kafka failed {_describe(msg)}: {again.str()}")
            if failure is Failure.BLOCKED:
                self._halt(failure, f"{_describe(msg)}: {again.str()}", _lsn_of(msg))
            refused = Refused(
                _header(msg, "id"),
                msg.topic(),
                (msg.key() or b"").decode(errors="replace"),
                msg.value() or b"",
                dict(msg.headers() or ()),
                _lsn_of(msg),
                again.str(),
                delivery.error_name(again),
            )
            self._refuse(group, refused)

    def _send_alone(self, msg: Any) -> Any:
        """Produce `msg` again with nothing else in flight; its error, or None once delivered."""
        outcome: list[Any] = []
        self.producer.produce(
            msg.topic(),
            msg.value(),
            msg.key(),
            headers=msg.headers(),
            on_delivery=lambda err, _msg: outcome.append(err),
        )
        deadline = time.monotonic() + 30.0
        while not outcome:
            if time.monotonic() > deadline or self.ctx.stopping():
                raise TransientError(f"kafka did not answer for {_describe(msg)} in time")
            self._poll(0.05)
            self._check_producer()
        return outcome[0]

    def _refuse(self, group: Group, refused: Refused) -> None:
        """`refused` will never be accepted: the source's policy decides.

        The event still counts as pending in `group`; with "dead-letter" that
        count passes to the report, so the position moves past the event once
        Kafka has the report. With "halt" it stays, and the position stops
        before the event.
        """
        ctx = self.ctx
        fields = {
            "event_id": refused.id,
            "type": refused.type,
            "topic": refused.topic,
            "key": refused.key,
            "lsn": format_lsn(refused.lsn),
            "bytes": refused.size,
            "reason": refused.reason,
        }
        if ctx.on_refused == "halt":
            self.metrics.refused(refused.code, "halted")
            what = (
                f"event {refused.id} ({refused.type}) at {format_lsn(refused.lsn)} to "
                f"{refused.topic!r} refused by Kafka"
            )
            self._halt(Failure.REFUSED, f"{what}: {refused.reason}", refused.lsn)
        self._record_dead_letter(refused)
        topic, value, key, headers = delivery.dead_letter_record(
            refused,
            topic=ctx.dead_letter_topic,
            source=ctx.source.name,
            max_bytes=ctx.message_max_bytes,
        )

        def reported(err: Any, msg: Any) -> None:
            group.pending -= 1
            if err is not None and self.halt_reason is None:
                self.halt_reason = (
                    f"the dead-letter topic {ctx.dead_letter_topic!r} did not take the report "
                    f"of refused event {refused.id}: {err.str()}"
                )

        while True:
            try:
                self.produce(topic, value, key, headers=headers, on_delivery=reported)
                break
            except BufferError:
                self._backpressure()
            except KafkaException as e:
                what = f"the dead-letter topic {ctx.dead_letter_topic!r} did not take the report"
                self._halt(Failure.BLOCKED, f"{what} of event {refused.id}: {e}", refused.lsn)
        self.gaps[(refused.topic, refused.key)] = refused.id
        self.metrics.refused(refused.code, "dead-lettered")
        ctx.log.error(
            "event refused by kafka: dead-lettered, the events after it go on",
            dead_letter_topic=ctx.dead_letter_topic,
            **fields,
        )

    def _halt(self, failure: Failure, what: str, lsn: int | None) -> NoReturn:
        advice = delivery.HALT_ADVICE[failure].format(retry_s=self.settings.retry_max_s)
        raise SourceHaltedError(f"{what}. {advice}", lsn=lsn)

    def _record_dead_letter(self, refused: Refused) -> None:
        """Note the event in walsaga.relay_dead_letter: retention keeps its outbox row, and
        an event that has no row (a logical message) is kept there in full."""
        whole = orjson.dumps(
            {
                "id": refused.id,
                "aggregatetype": _text(refused.headers.get("aggregatetype")),
                "aggregateid": refused.key,
                "type": refused.type,
                "payload": orjson.Fragment(refused.value) if _is_json(refused.value) else None,
                "headers": {
                    name: _text(value)
                    for name, value in refused.headers.items()
                    if name not in _STANDARD_HEADERS
                },
            }
        ).decode()
        try:
            uuid.UUID(refused.id)
            has_row = "EXISTS (SELECT 1 FROM walsaga.outbox WHERE id = %(uuid)s::uuid)"
        except ValueError:
            has_row = "false"
        try:
            self.conn.execute(
                f"""
                INSERT INTO walsaga.relay_dead_letter
                    (event_id, source, lsn, xid, topic, key, type, reason, code, size_bytes, event)
                SELECT %(id)s::text, %(source)s, %(lsn)s::pg_lsn, %(xid)s::bigint, %(topic)s,
                       %(key)s, %(type)s, %(reason)s, %(code)s, %(size)s::bigint,
                       CASE WHEN {has_row} THEN NULL ELSE %(event)s::jsonb END
                ON CONFLICT (event_id) DO UPDATE
                SET reason = EXCLUDED.reason, code = EXCLUDED.code, lsn = EXCLUDED.lsn,
                    refused_at = now(), replayed_at = NULL
                """,
                {
                    "id": refused.id,
                    "uuid": refused.id,
                    "source": self.ctx.source.name,
                    "lsn": format_lsn(refused.lsn),
                    "xid": _int(refused.headers.get("xid")),
                    "topic": refused.topic,
                    "key": refused.key,
                    "type": refused.type,
                    "reason": refused.reason[:2000],
                    "code": refused.code,
                    "size": refused.size,
                    "event": whole,
                },
            )
        except psycopg.Error as e:
            raise from_psycopg(e, f"source {self.ctx.source.name!r}: noting a refused event") from e

    def _load_gaps(self) -> None:
        """Dead-lettered events whose key has had no event since (from earlier sessions)."""
        try:
            rows = self.conn.execute(
                """
                SELECT event_id, topic, key FROM walsaga.relay_dead_letter
                WHERE source = %s AND gap_reported_by IS NULL AND replayed_at IS NULL
                ORDER BY refused_at
                """,
                (self.ctx.source.name,),
            ).fetchall()
        except psycopg.Error as e:
            raise from_psycopg(e, f"source {self.ctx.source.name!r}") from e
        for event_id, topic, key in rows:
            self.gaps[(topic, key)] = event_id

    def _close_gap(
        self, topic: str, key: str | bytes, headers: dict[str, str | bytes | None]
    ) -> None:
        text = key if isinstance(key, str) else key.decode(errors="replace")
        missing = self.gaps.pop((topic, text), None)
        if missing is not None:
            headers[GAP_HEADER] = missing
            self.gaps_reported.append((missing, str(headers.get("id"))))

    def _poll(self, timeout_s: float) -> None:
        try:
            self.producer.poll(timeout_s)
        except KafkaException as e:
            # confluent-kafka raises a fatal producer error from poll() rather
            # than passing it to error_cb: the session restarts with a new
            # producer, from the slot's confirmed position.
            raise TransientError(f"kafka producer failed: {e}") from e

    def _send_now(self) -> None:
        """Send what is queued without waiting for linger.ms: only flush() does
        that, so wait for the acknowledgement too, briefly (the loop serves the
        rest)."""
        try:
            self.producer.flush(SEND_NOW_WAIT_S)
        except KafkaException as e:
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
        if self.ctx.halted_at is not None and lsn > self.ctx.halted_at:
            self.ctx.halted_at = None
            self.metrics.halted.set(0)
            self.ctx.status.set("streaming")
            self.ctx.log.info("no longer halted: streaming past the event it stopped at")

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
            if self.gaps_reported:
                reported, self.gaps_reported = self.gaps_reported, []
                with self.conn.cursor() as cur:
                    cur.executemany(
                        "UPDATE walsaga.relay_dead_letter SET gap_reported_by = %s "
                        "WHERE event_id = %s AND gap_reported_by IS NULL",
                        [(next_id, missing) for missing, next_id in reported],
                    )
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

    def _settle(self) -> None:
        """Halting: let what is in flight be acknowledged and confirm up to the halt."""
        deadline = time.monotonic() + min(5.0, self.ctx.drain_s)
        with contextlib.suppress(TransientError, DeliveryError, SourceHaltedError):
            while len(self.producer) and time.monotonic() < deadline:
                self._poll(0.05)
            self.window.advance()
            self._feedback(time.monotonic())

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


_STANDARD_HEADERS = frozenset(
    {"id", "type", "aggregatetype", "aggregateid", "source", "lsn", "xid", GAP_HEADER}
)


def _text(value: str | bytes | None) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _int(value: str | bytes | None) -> int | None:
    text = _text(value)
    return int(text) if text and text.isdigit() else None


def _is_json(value: bytes) -> bool:
    try:
        orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return True


def _header(msg: Any, name: str) -> str:
    for key, value in msg.headers() or ():
        if key == name:
            return _text(value) or ""
    return ""


def _lsn_of(msg: Any) -> int:
    text = _header(msg, "lsn")
    try:
        return parse_lsn(text)
    except ValueError:
        return 0


def _describe(msg: Any) -> str:
    return f"event {_header(msg, 'id')} ({_header(msg, 'type')}) to {msg.topic()!r}"
