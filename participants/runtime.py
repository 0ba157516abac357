"""The participant runtime: consume records, handle each in one local transaction.

Delivery guarantee: effectively once per message. Kafka delivers at least
once; every record's dedupe key (event id, or a command's idempotency key)
goes into ``walsaga.inbox`` in the same transaction as the handler's writes,
so a repeat finds its key taken and is skipped. Offsets are stored only after
that transaction commits. Replies, failure events and dead letters are written
to the outbox in the same transaction: the runtime never produces to Kafka.

Records are handled in batches: one transaction per batch, a savepoint per
record where the handler may fail for a business reason. What a failure means
is decided by :func:`participants.outcome.classify_failure`; this module only
carries it out: roll back and retry the batch after a backoff (one record per
transaction from then on, so a record that keeps failing holds back only
itself), publish a failure event, or dead-letter the record.

Stopping is bounded (``shutdown_timeout_s``): the batch under way finishes or
is abandoned, stored offsets are committed if the broker answers in time,
and the consumer is closed; offsets left uncommitted mean repeats after the
restart, which the inbox absorbs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException
from prometheus_client import CollectorRegistry, Counter, Histogram

from participants import commit, replies
from participants.handlers import Handler, HandlerContext, Route
from participants.kafka import consumer_settings, ensure_topics, next_offsets
from participants.message import Message
from participants.outcome import Outcome, classify_failure
from participants.schedule import Schedule
from walsaga import tracing
from walsaga.errors import SetupError, from_psycopg, is_transient_sqlstate
from walsaga.http import LATENCY_BUCKETS, new_registry
from walsaga.logs import Repeats
from walsaga.retry import BackoffPolicy

log = structlog.get_logger("walsaga.participant")


@dataclass
class ParticipantMetrics:
    registry: CollectorRegistry = field(default_factory=new_registry)

    def __post_init__(self) -> None:
        r = self.registry
        self.handled = Counter(
            "walsaga_participant_messages",
            "Records handled, by outcome",
            ["participant", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "walsaga_participant_retries",
            "Batches rolled back and retried",
            ["participant"],
            registry=r,
        )
        self.redone = Counter(
            "walsaga_participant_batches_redone",
            "Batches rolled back because a record failed without a savepoint of its own, "
            "then handled again with one for each record",
            ["participant"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "walsaga_participant_batch_seconds",
            "Time to handle and commit one batch",
            ["participant"],
            registry=r,
        )
        self.receive_delay = Histogram(
            "walsaga_participant_receive_delay_seconds",
            "From an event's commit (the record's timestamp) to the participant receiving it",
            ["participant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )


class HopTimes:
    """The time from an event's commit (the record's timestamp, set by the relay) to
    this participant receiving it, and from receiving it to the handling transaction's
    commit: the last two stages of a hop (the relay reports the first ones)."""

    def __init__(self, metrics: ParticipantMetrics, name: str) -> None:
        self.to_receive = deque[float](maxlen=5000)
        self.to_commit = deque[float](maxlen=5000)
        self._m_receive = metrics.receive_delay.labels(name)

    def add(self, records: Sequence[Any], received: float, committed: float) -> None:
        handled = committed - received
        for record in records:
            kind, stamp_ms = record.timestamp()
            if kind and stamp_ms > 0:
                delay = received - stamp_ms / 1000
                self.to_receive.append(delay)
                self._m_receive.observe(delay)
            self.to_commit.append(handled)

    def report(self) -> dict[str, dict[str, float | None]]:
        """p50 and p99 of each stage, in milliseconds."""
        found = {}
        for stage, window in (("commit_to_receive", self.to_receive),
                              ("receive_to_commit", self.to_commit)):  # fmt: skip
            ordered = sorted(window)
            found[stage] = {
                q: (round(ordered[min(len(ordered) - 1, int(f * len(ordered)))] * 1000, 3)
                    if ordered else None)
                for q, f in (("p50", 0.5), ("p99", 0.99))
            }  # fmt: skip
        return found


class _FailedAloneError(Exception):
    """The lone record of a transaction failed for good: roll back, then record
    what the failure calls for in a transaction of its own."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _RetryBatchError(Exception):
    """Roll the whole batch back and try again (after backoff)."""


class _RedoCarefullyError(Exception):
    """A record of a batch run without savepoints failed: roll the batch back
    and handle it again at once, each record under a savepoint of its own."""


#: After a batch had to be handled again with savepoints, this many batches
#: take savepoints from the start: failures come in runs (a customer out of
#: credit, a product out of stock), and redoing a batch costs more than its
#: savepoints. Then batches go without them again.
CAREFUL_BATCHES = 20


class Participant:
    """A service's consumer: routes records to handlers, one transaction per batch."""

    def __init__(
        self,
        name: str,
        *,
        dsn: str,
        kafka: dict[str, Any],
        batch_size: int = 200,
        max_attempts: int = 5,
        dead_letter_topic: str | None = None,
        business_sqlstates: Iterable[str] = (),
        poll_timeout_s: float = 0.05,
        topic_partitions: int | None = 4,
        workers: int = 1,
        retry_min_s: float = 0.05,
        retry_max_s: float = 5.0,
        inbox_retention_s: float = 7 * 24 * 3600,
        shutdown_timeout_s: float = 5.0,
        metrics: ParticipantMetrics | None = None,
    ) -> None:
        self.name = name
        self.dsn = dsn
        self.kafka = kafka
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.dead_letter_topic = dead_letter_topic or f"{name}.deadletter"
        self.business_sqlstates = frozenset(business_sqlstates)
        self.poll_timeout_s = poll_timeout_s
        self.topic_partitions = topic_partitions
        self.workers = max(1, workers)
        self.retry = BackoffPolicy(min_s=retry_min_s, max_s=retry_max_s)
        self.inbox_retention_s = inbox_retention_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.metrics = metrics or ParticipantMetrics()
        self.routes: list[Route] = []
        self.stop_event = threading.Event()
        self._stop_requested: float | None = None
        self.ready = threading.Event()  # set once the consumer has partitions
        self._kafka_errors = Repeats()
        self.log = log.bind(participant=name)
        self.schedule = Schedule(self.log)
        #: Where each hop's time goes on this side (commit to receive, handling).
        self.hops = HopTimes(self.metrics, name)
        self._attempts: dict[str, int] = {}
        self._local = threading.local()  # each worker thread's connection
        self._m_retries = self.metrics.retries.labels(name)
        self._m_redone = self.metrics.redone.labels(name)
        #: Batches still to take savepoints from the start (see CAREFUL_BATCHES).
        self._careful_batches = 0
        self._m_batch = self.metrics.batch_seconds.labels(name)
        self.every(60.0, self._trim_inbox, name="inbox retention")

    # -- configuration -----------------------------------------------------

    def add_route(self, route: Route) -> None:
        self.routes.append(route)

    def on(
        self,
        topic: str,
        type: str | None = None,
        *,
        failure_type: str | None = None,
        failure_topic: str | None = None,
        failure_event: bool = True,
    ) -> Callable[[Handler], Handler]:
        """Decorator: handle records of `type` (or all) on `topic`."""

        def register(handler: Handler) -> Handler:
            self.add_route(Route(topic, type, handler, failure_type, failure_topic, failure_event))
            return handler

        return register

    def every(
        self,
        interval_s: float,
        task: Callable[[psycopg.Connection[Any]], object],
        *,
        name: str = "",
    ) -> None:
        """Run ``task(conn)`` in its own transaction every `interval_s` (between batches)."""
        self.schedule.every(interval_s, task, name=name)

    @property
    def topics(self) -> list[str]:
        return sorted({r.topic for r in self.routes})

    def route_for(self, message: Message) -> Route | None:
        for route in self.routes:
            if route.matches(message):
                return route
        return None

    def consumer_settings(self) -> dict[str, Any]:
        return consumer_settings(self.name, self.kafka, error_cb=self._on_kafka_error)

    # -- running -----------------------------------------------------------

    def stop(self) -> None:
        """Stop taking records; :meth:`run` returns within ``shutdown_timeout_s`` from now."""
        if self._stop_requested is None:
            self._stop_requested = time.monotonic()
        self.stop_event.set()

    def _stop_deadline(self, fraction: float) -> float:
        """The monotonic time by which `fraction` of the stop's bound has passed."""
        if self._stop_requested is None:  # stopped by a failure, not asked to
            self._stop_requested = time.monotonic()
        return self._stop_requested + self.shutdown_timeout_s * fraction

    def _on_assign(self, consumer: Any, partitions: Any) -> None:
        self.ready.set()

    def _on_kafka_error(self, err: KafkaError) -> None:
        # Every failed connect while a broker is down comes here: one line per
        # window (walsaga.logs.Repeats) says it, with how many more there were.
        held = self._kafka_errors.admit(err.str())
        if held is not None:
            self.log.warning("kafka", error=err.str(), **({"repeated": held} if held else {}))

    def run(self) -> None:
        """Consume until :meth:`stop`; offsets of handled records are committed on the way out.

        With ``workers`` above one, that many consumers of the same group run
        in threads, each with its own connection: Kafka gives each some of
        the partitions, so records of one partition stay in order, while
        the workers' database round trips overlap.
        """
        if not self.routes:
            raise SetupError(f"participant {self.name!r} has no handlers")
        self._check_database()
        if self.topic_partitions:
            ensure_topics(self.kafka, self.topics, partitions=self.topic_partitions, log=self.log)
        self.log.info("consuming", topics=self.topics, workers=self.workers)
        failures: list[BaseException] = []

        def worker(index: int) -> None:
            try:
                self._consume(index)
            except BaseException as e:
                failures.append(e)
                self.stop_event.set()

        extra = [
            threading.Thread(target=worker, args=(i,), name=f"{self.name}-worker-{i}", daemon=True)
            for i in range(1, self.workers)
        ]
        for thread in extra:
            thread.start()
        try:
            self._consume(0)
        except BaseException:
            self.stop_event.set()  # the other workers go with it
            raise
        finally:
            # The other workers close their consumers meanwhile, by the same deadline.
            deadline = self._stop_deadline(0.9)
            for thread in extra:
                thread.join(max(0.0, deadline - time.monotonic()))
            self.log.info("stopped")
        if failures:
            raise failures[0]

    def _consume(self, index: int) -> None:
        consumer = Consumer(self.consumer_settings())
        consumer.subscribe(self.topics, on_assign=self._on_assign)
        try:
            while not self.stop_event.is_set():
                batch = self._next_batch(consumer)
                if batch:
                    received = time.time()
                    messages = [Message.from_kafka(r) for r in batch]
                    if not self.handle(messages):
                        break  # stopped while retrying: leave the offsets alone
                    self.hops.add(batch, received, time.time())
                    try:
                        consumer.store_offsets(offsets=next_offsets(batch))
                    except KafkaException as e:
                        # Partitions revoked meanwhile: their new owner sees the
                        # records again and the inbox skips them.
                        self.log.info("offsets not stored", error=str(e))
                if index == 0:
                    self.schedule.run_due(
                        self._connection,
                        committed=commit.committed,
                        rolled_back=commit.rolled_back,
                    )
        finally:
            self._close(consumer)
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()

    def _next_batch(self, consumer: Consumer) -> list[Any]:
        # What the client has fetched already, without waiting; if nothing,
        # wait for one record and take what came with it. (consume(n, timeout)
        # alone waits for n records or the whole timeout, which would add the
        # timeout to every hop of a saga.)
        records = consumer.consume(self.batch_size, 0)
        if not records:
            first = consumer.poll(self.poll_timeout_s)
            if first is not None:
                records = [first, *consumer.consume(self.batch_size - 1, 0)]
        batch = []
        for record in records:
            err = record.error()
            if err is None:
                batch.append(record)
            elif err.code() != KafkaError._PARTITION_EOF:
                self.log.warning("consume error", error=err.str())
        return batch

    def _close(self, consumer: Consumer) -> None:
        """Commit stored offsets and leave the group, within the shutdown bound.

        ``Consumer.close()`` waits for the broker as long as it takes; with the
        broker gone that is forever. It runs in a thread of its own and is
        abandoned at 80% of the bound, counted from the stop request (the
        batch under way had the time before): the offsets it could not commit
        mean repeats after the restart, which the inbox drops.
        """
        deadline = self._stop_deadline(0.8)
        done = threading.Event()

        def close() -> None:
            try:
                consumer.close()
            except (KafkaException, RuntimeError) as e:
                self.log.info("consumer closed with an error", error=str(e))
            finally:
                done.set()

        threading.Thread(target=close, name=f"{self.name}-kafka-close", daemon=True).start()
        if not done.wait(max(0.0, deadline - time.monotonic())):
            self.log.warning(
                "kafka did not answer the close in time: leaving without committing offsets "
                "(the records are delivered again after the restart, the inbox drops repeats)",
                within_s=self.shutdown_timeout_s,
            )

    def _check_database(self) -> None:
        conn = self._connection()
        try:
            with conn.transaction():
                row = conn.execute("SELECT to_regclass('walsaga.inbox') IS NOT NULL").fetchone()
        except psycopg.Error as e:
            raise from_psycopg(e, f"participant {self.name!r}") from e
        if not (row and row[0]):
            raise SetupError(
                f"participant {self.name!r}: its database has no walsaga schema; "
                "deploy it first with: walsaga deploy --dsn <dsn of that database>"
            )

    # -- handling ----------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        backoff = self.retry.backoff()
        while True:
            try:
                self._local.conn = conn = psycopg.connect(self.dsn, connect_timeout=10)
                return conn
            except psycopg.OperationalError as e:
                error = from_psycopg(e, f"participant {self.name!r}: cannot connect")
                if self.stop_event.is_set() or isinstance(error, SetupError):
                    raise error from e
                delay = backoff.next_delay()
                self.log.warning(
                    "database unreachable, retrying", error=str(e), retry_in_s=round(delay, 2)
                )
                self.stop_event.wait(delay)

    def handle(self, messages: Sequence[Message]) -> bool:
        """Handle a batch until it commits; False if stopped before that.

        After a failed attempt the records are handled one transaction each,
        so a record that keeps failing holds back only itself, and reaches
        the dead-letter topic after ``max_attempts``.
        """
        backoff = self.retry.backoff()
        isolate = False
        while True:
            started = time.monotonic()
            try:
                conn = self._connection()
            except (psycopg.OperationalError, SetupError):
                if self.stop_event.is_set():
                    return False
                raise
            try:
                if isolate:
                    for message in messages:
                        self._handle_batch(conn, [message], isolated=True)
                else:
                    careful = len(messages) > 1 and self._careful_batches > 0
                    if careful:
                        self._careful_batches -= 1
                    try:
                        self._handle_batch(conn, messages, careful=careful)
                    except _FailedAloneError as failed:
                        self._handle_batch(conn, messages, isolated=True, failure=failed.error)
                    except _RedoCarefullyError:
                        self._m_redone.inc()
                        self._careful_batches = CAREFUL_BATCHES
                        self._handle_batch(conn, messages, careful=True)
                self._m_batch.observe(time.monotonic() - started)
                return True
            except _RetryBatchError as e:
                reason = str(e)
            except psycopg.OperationalError as e:
                reason = f"connection lost: {e}"
            self._m_retries.inc()
            isolate = len(messages) > 1
            delay = backoff.next_delay()
            self.log.warning(
                "batch rolled back, retrying", reason=reason, retry_in_s=round(delay, 3)
            )
            if self.stop_event.wait(delay):
                return False

    def _handle_batch(
        self,
        conn: psycopg.Connection[Any],
        messages: Sequence[Message],
        *,
        isolated: bool = False,
        careful: bool = False,
        failure: Exception | None = None,
    ) -> None:
        """Handle `messages` in one transaction. `failure`: what the handler of the
        one record in `messages` raised in a transaction that was rolled back;
        the handler is not run again, the failure is recorded. `careful`: each
        record whose route asks for a savepoint gets one; otherwise a batch of
        several records takes none, and a failure raises _RedoCarefullyError."""
        outcomes: list[Outcome] = []
        try:
            with conn.transaction():
                lone = len(messages) == 1 and not isolated
                if lone:
                    outcomes.append(self._handle_lone(conn, messages[0]))
                    messages = ()
                else:
                    fresh = self._claim(conn, messages)
                traced = False
                for message in messages:
                    key = message.dedupe_key
                    if key not in fresh:
                        outcomes.append(Outcome.DUPLICATE)
                        continue
                    fresh.discard(key)  # a second copy in the same batch is a duplicate
                    parent = tracing.from_headers(message.headers)
                    if parent is None:
                        if traced:  # not the previous record's trace
                            set_trace(conn, None)
                            traced = False
                        outcomes.append(
                            self._handle_one(
                                conn, message, isolated, None, careful=careful, failure=failure
                            )
                        )
                        continue
                    with self._hop(message, parent) as hop:
                        set_trace(conn, hop, cause=message.id)
                        traced = True
                        outcomes.append(
                            self._handle_one(
                                conn, message, isolated, hop, careful=careful, failure=failure
                            )
                        )
        except psycopg.Error as e:
            commit.rolled_back(conn)
            if conn.broken:
                raise
            if is_transient_sqlstate(e.sqlstate):
                raise _RetryBatchError(f"{type(e).__name__}: {e}") from e
            raise _RetryBatchError(f"commit failed: {e}") from e
        except BaseException:
            commit.rolled_back(conn)
            raise
        commit.committed(conn)
        for outcome in outcomes:
            self.metrics.handled.labels(self.name, outcome).inc()
        for message in messages:
            self._attempts.pop(message.dedupe_key, None)

    def _hop(self, message: Message, parent: tracing.TraceContext) -> Any:
        """The span of this participant's hop for `message`, a child of `parent`."""
        return tracing.span(
            f"{self.name} {message.type or message.topic}",
            parent,
            attributes={"messaging.destination.name": message.topic,
                        "messaging.message.id": message.id},
        )  # fmt: skip

    def _claim(self, conn: psycopg.Connection[Any], messages: Sequence[Message]) -> set[str]:
        """Insert every dedupe key into the inbox; return those that were new."""
        rows = conn.execute(
            """
            INSERT INTO walsaga.inbox (consumer, message_id)
            SELECT %s, unnest(%s::text[])
            ON CONFLICT DO NOTHING
            RETURNING message_id
            """,
            (self.name, [m.dedupe_key for m in messages]),
        ).fetchall()
        fresh = {r[0] for r in rows}
        self._claimed(messages, fresh)
        return fresh

    def _claimed(self, messages: Sequence[Message], fresh: set[str]) -> None:
        """Called in the transaction once `messages` are claimed, `fresh` the dedupe
        keys that were new: every claim, the batch's and a lone record's, comes here."""

    def _handle_lone(self, conn: psycopg.Connection[Any], message: Message) -> Outcome:
        """The only record of its transaction: claimed, with its trace context set,
        in one statement (the round trip a hop pays for being traced)."""
        parent = tracing.from_headers(message.headers)
        if parent is None:
            if message.dedupe_key not in self._claim(conn, (message,)):
                return Outcome.DUPLICATE
            return self._handle_one(conn, message, False, None, lone=True)
        with self._hop(message, parent) as hop:
            claimed = conn.execute(
                """
                WITH trace AS MATERIALIZED (
                    SELECT set_config('walsaga.traceparent', %s, true),
                           set_config('walsaga.tracestate', %s, true),
                           set_config('walsaga.causation_id', %s, true))
                INSERT INTO walsaga.inbox (consumer, message_id)
                SELECT %s, %s FROM trace
                ON CONFLICT DO NOTHING
                RETURNING message_id
                """,
                (hop.traceparent, hop.state or "", message.id, self.name, message.dedupe_key),
            ).fetchone()
            self._claimed((message,), {claimed[0]} if claimed is not None else set())
            if claimed is None:
                return Outcome.DUPLICATE
            return self._handle_one(conn, message, False, hop, lone=True)

    def _handle_one(
        self,
        conn: psycopg.Connection[Any],
        message: Message,
        isolated: bool,
        trace: tracing.TraceContext | None,
        *,
        lone: bool = False,
        careful: bool = False,
        failure: Exception | None = None,
    ) -> Outcome:
        route = self.route_for(message)
        compensates = message.headers.get("compensates")
        if compensates:
            # A compensation seals its command: if that command has not run
            # yet (slow, retried), it never will.
            conn.execute(
                "INSERT INTO walsaga.inbox (consumer, message_id) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING",
                (self.name, compensates),
            )
        if route is None:
            return Outcome.IGNORED
        if failure is not None:
            return self._failed(conn, route, message, failure)
        ctx = HandlerContext(conn, message, self.name, trace=trace)
        try:
            if lone and route.savepoint:
                # The only record of its transaction: a savepoint would only
                # undo what rolling the transaction back undoes, at two more
                # round trips. Should the handler fail for good, the transaction
                # is rolled back and the failure recorded in a new one
                # (_FailedAloneError), without running the handler again.
                try:
                    route.handler(ctx, message)
                except Exception as e:
                    if isinstance(e, psycopg.Error) and conn.broken:
                        raise
                    verdict = classify_failure(
                        e,
                        attempts=self._attempts.get(message.dedupe_key, 0) + 1,
                        max_attempts=self.max_attempts,
                        business_sqlstates=self.business_sqlstates,
                    )
                    if verdict.outcome is Outcome.RETRY:
                        return self._failed(conn, route, message, e)  # rolls back, backs off
                    raise _FailedAloneError(e) from e
            elif isolated or (route.savepoint and (careful or not route.transactional)):
                with conn.transaction():
                    route.handler(ctx, message)
            elif route.savepoint:
                # One record of several, none has failed lately, and running
                # the handler again leaves no trace: no savepoint (two round
                # trips a record). Should it fail, the batch is rolled back and
                # handled again with a savepoint for each record, where the
                # failure is recorded as usual.
                try:
                    route.handler(ctx, message)
                except Exception as e:
                    if isinstance(e, psycopg.Error) and conn.broken:
                        raise
                    raise _RedoCarefullyError(f"{message.describe()}: {e}") from e
            else:
                # No business failure expected: an error rolls the batch back
                # and the records are retried one transaction each.
                try:
                    route.handler(ctx, message)
                except psycopg.Error as e:
                    raise _RetryBatchError(f"{message.describe()}: {e}") from e
            return Outcome.HANDLED
        except (_RetryBatchError, _FailedAloneError, _RedoCarefullyError):
            raise
        except Exception as e:
            if isinstance(e, psycopg.Error) and conn.broken:
                raise
            return self._failed(conn, route, message, e)

    def _failed(
        self, conn: psycopg.Connection[Any], route: Route, message: Message, error: Exception
    ) -> Outcome:
        key = message.dedupe_key
        attempts = self._attempts.get(key, 0) + 1
        verdict = classify_failure(
            error,
            attempts=attempts,
            max_attempts=self.max_attempts,
            business_sqlstates=self.business_sqlstates,
        )
        if verdict.outcome is Outcome.BUSINESS_FAILURE:
            replies.failure_event(conn, self.name, route, message, verdict.reason, verdict.code)
        elif verdict.outcome is Outcome.DEAD_LETTER:
            replies.dead_letter(conn, self.name, self.dead_letter_topic, message, verdict.reason)
        else:
            self._attempts[key] = attempts
            self.log.warning(
                "handler failed", record=message.describe(), error=verdict.reason, attempt=attempts
            )
            raise _RetryBatchError(f"{message.describe()}: {verdict.reason}") from error
        return verdict.outcome

    # -- periodic work -----------------------------------------------------

    def _trim_inbox(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            "DELETE FROM walsaga.inbox WHERE consumer = %s "
            "AND processed_at < now() - make_interval(secs => %s)",
            (self.name, self.inbox_retention_s),
        )


def set_trace(
    conn: psycopg.Connection[Any], hop: tracing.TraceContext | None, *, cause: str | None = None
) -> None:
    """Make `hop` the trace context of `conn`'s transaction (None: no trace): the
    events it writes, through walsaga.publish or capture triggers, carry it, and
    `cause` (the id of the message being handled) as their ``causation_id``."""
    conn.execute(
        "SELECT set_config('walsaga.traceparent', %s, true), "
        "set_config('walsaga.tracestate', %s, true), "
        "set_config('walsaga.causation_id', %s, true)",
        (
            hop.traceparent if hop else "",
            (hop.state or "") if hop else "",
            (cause or "") if hop else "",
        ),
    )
