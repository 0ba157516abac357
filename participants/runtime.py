"""The participant runtime: consume records, handle each in one local transaction.

Delivery guarantee: effectively once per message. Kafka delivers at least
once; every record's dedupe key (event id, or a command's idempotency key)
goes into ``walsaga.inbox`` in the same transaction as the handler's writes,
so a repeat finds its key taken and is skipped. Offsets are stored only after
that transaction commits. Replies, failure events and dead letters are written
to the outbox in the same transaction: the runtime never produces to Kafka.

Records are handled in batches: one transaction per batch, a savepoint per
record. A transient error (lost connection, serialization failure, deadlock)
rolls the batch back and retries it with backoff; a business failure becomes
a failure event; a record that cannot be handled at all goes to the
dead-letter topic with the reason in its headers, and the partition moves on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from prometheus_client import CollectorRegistry, Counter, Histogram

from participants.handlers import Handler, HandlerContext, Route, failure_payload, publish
from participants.message import Message, UnreadableMessageError
from relay.errors import BusinessError, PermanentError, SetupError, is_transient_sqlstate

log = structlog.get_logger("walsaga.participant")

#: SQLSTATE class reserved for business-rule failures raised by SQL handlers:
#: ``RAISE EXCEPTION '...' USING ERRCODE = 'WS001'``.
BUSINESS_SQLSTATE_CLASS = "WS"


@dataclass
class ParticipantMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

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
        self.batch_seconds = Histogram(
            "walsaga_participant_batch_seconds",
            "Time to handle and commit one batch",
            ["participant"],
            registry=r,
        )


@dataclass
class _Periodic:
    interval_s: float
    task: Callable[[psycopg.Connection[Any]], object]
    name: str
    due: float = 0.0


class _RetryBatchError(Exception):
    """Roll the whole batch back and try again (after backoff)."""


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
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.metrics = metrics or ParticipantMetrics()
        self.routes: list[Route] = []
        self.stop_event = threading.Event()
        self.ready = threading.Event()  # set once the consumer has partitions
        self._periodic: list[_Periodic] = []
        self._attempts: dict[str, int] = {}
        self._local = threading.local()  # each worker thread's connection
        self.log = log.bind(participant=name)
        self._m_retries = self.metrics.retries.labels(name)
        self._m_batch = self.metrics.batch_seconds.labels(name)
        self.every(60.0, self._trim_inbox, name="inbox retention")
        self.inbox_retention_s = inbox_retention_s

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
        self._periodic.append(_Periodic(interval_s, task, name or getattr(task, "__name__", "?")))

    @property
    def topics(self) -> list[str]:
        return sorted({r.topic for r in self.routes})

    def route_for(self, message: Message) -> Route | None:
        for route in self.routes:
            if route.matches(message):
                return route
        return None

    # -- running -----------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()

    def consumer_settings(self) -> dict[str, Any]:
        return {
            "group.id": self.name,
            "auto.offset.reset": "earliest",
            "auto.commit.interval.ms": 500,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "fetch.wait.max.ms": 20,
            "partition.assignment.strategy": "cooperative-sticky",
            **self.kafka,
            # Not negotiable: offsets are stored by hand after each database
            # commit and committed in the background from what was stored.
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            "error_cb": self._on_kafka_error,
        }

    def _on_assign(self, consumer: Any, partitions: Any) -> None:
        self.ready.set()

    def _on_kafka_error(self, err: KafkaError) -> None:
        self.log.warning("kafka", error=err.str())

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
            self._create_missing_topics()
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
            for thread in extra:
                thread.join()
            self.log.info("stopped")
        if failures:
            raise failures[0]

    def _consume(self, index: int) -> None:
        consumer = Consumer(self.consumer_settings())
        consumer.subscribe(self.topics, on_assign=self._on_assign)
        try:
            while not self.stop_event.is_set():
                # What the client has fetched already, without waiting; if
                # nothing, wait for one record and take what came with it.
                # (consume(n, timeout) alone waits for n records or the whole
                # timeout, which would add the timeout to every hop of a saga.)
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
                if batch:
                    messages = [Message.from_kafka(r) for r in batch]
                    if not self.handle(messages):
                        break  # stopped while retrying: leave the offsets alone
                    try:
                        consumer.store_offsets(offsets=_next_offsets(batch))
                    except KafkaException as e:
                        # Partitions revoked meanwhile: their new owner sees the
                        # records again and the inbox skips them.
                        self.log.info("offsets not stored", error=str(e))
                if index == 0:
                    self._run_periodic()
        finally:
            consumer.close()  # commits what was stored
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()

    def _check_database(self) -> None:
        conn = self._connection()
        with conn.transaction():
            row = conn.execute("SELECT to_regclass('walsaga.inbox') IS NOT NULL").fetchone()
        if not (row and row[0]):
            raise SetupError(
                f"participant {self.name!r}: its database has no walsaga schema; "
                "deploy it first with: walsaga deploy --dsn <dsn of that database>"
            )

    def _create_missing_topics(self) -> None:
        """Create the subscribed topics that do not exist yet (a consumer of a
        missing topic would not notice it appear for minutes)."""
        connection = ("bootstrap.", "security.", "sasl.", "ssl.", "client.")
        admin = AdminClient({k: v for k, v in self.kafka.items() if k.startswith(connection)})
        try:
            existing = set(admin.list_topics(timeout=10).topics)
        except KafkaException as e:
            self.log.warning("cannot list topics", error=str(e))
            return
        missing = [t for t in self.topics if t not in existing]
        if not missing:
            return
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=self.topic_partitions or 1) for t in missing]
        )
        for topic, future in futures.items():
            try:
                future.result(10)
                self.log.info("created topic", topic=topic, partitions=self.topic_partitions)
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    self.log.warning("cannot create topic", topic=topic, error=str(e))

    # -- handling ----------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        delay = self.retry_min_s
        while True:
            try:
                self._local.conn = conn = psycopg.connect(self.dsn, connect_timeout=10)
                return conn
            except psycopg.OperationalError as e:
                if self.stop_event.is_set():
                    raise
                self.log.warning("database unreachable, retrying", error=str(e), retry_in_s=delay)
                self.stop_event.wait(delay)
                delay = min(delay * 2, self.retry_max_s)

    def handle(self, messages: Sequence[Message]) -> bool:
        """Handle a batch until it commits; False if stopped before that.

        After a failed attempt the records are handled one transaction each,
        so a record that keeps failing holds back only itself, and reaches
        the dead-letter topic after ``max_attempts``.
        """
        delay = self.retry_min_s
        isolate = False
        while True:
            started = time.monotonic()
            try:
                conn = self._connection()
            except psycopg.OperationalError:
                return False
            try:
                if isolate:
                    for message in messages:
                        self._handle_batch(conn, [message], isolated=True)
                else:
                    self._handle_batch(conn, messages)
                self._m_batch.observe(time.monotonic() - started)
                return True
            except _RetryBatchError as e:
                reason = str(e)
            except psycopg.OperationalError as e:
                reason = f"connection lost: {e}"
            self._m_retries.inc()
            isolate = len(messages) > 1
            self.log.warning("batch rolled back, retrying", reason=reason, retry_in_s=delay)
            if self.stop_event.wait(delay):
                return False
            delay = min(delay * 2, self.retry_max_s)

    def _handle_batch(
        self, conn: psycopg.Connection[Any], messages: Sequence[Message], *, isolated: bool = False
    ) -> None:
        outcomes: list[str] = []
        try:
            with conn.transaction():
                fresh = self._claim(conn, messages)
                for message in messages:
                    key = message.dedupe_key
                    if key not in fresh:
                        outcomes.append("duplicate")
                        continue
                    fresh.discard(key)  # a second copy in the same batch is a duplicate
                    outcomes.append(self._handle_one(conn, message, isolated))
        except psycopg.Error as e:
            if conn.broken:
                raise
            if is_transient_sqlstate(e.sqlstate):
                raise _RetryBatchError(f"{type(e).__name__}: {e}") from e
            raise _RetryBatchError(f"commit failed: {e}") from e
        for outcome in outcomes:
            self.metrics.handled.labels(self.name, outcome).inc()
        for message in messages:
            self._attempts.pop(message.dedupe_key, None)

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
        return {r[0] for r in rows}

    def _handle_one(self, conn: psycopg.Connection[Any], message: Message, isolated: bool) -> str:
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
            return "ignored"
        ctx = HandlerContext(conn, message, self.name)
        try:
            if route.savepoint or isolated:
                with conn.transaction():
                    route.handler(ctx, message)
            else:
                # No business failure expected: an error rolls the batch back
                # and the records are retried one transaction each.
                try:
                    route.handler(ctx, message)
                except psycopg.Error as e:
                    raise _RetryBatchError(f"{message.describe()}: {e}") from e
            return "handled"
        except BusinessError as e:
            self._failure_event(conn, route, message, e.reason, e.code)
            return "business_failure"
        except UnreadableMessageError as e:
            self._dead_letter(conn, message, str(e))
            return "dead_letter"
        except psycopg.Error as e:
            if conn.broken:
                raise
            sqlstate = e.sqlstate or ""
            if sqlstate.startswith(BUSINESS_SQLSTATE_CLASS) or sqlstate in self.business_sqlstates:
                reason = e.diag.message_primary or str(e)
                self._failure_event(conn, route, message, reason, sqlstate)
                return "business_failure"
            if is_transient_sqlstate(sqlstate):
                raise _RetryBatchError(f"{message.describe()}: {e}") from e
            return self._unexpected(conn, message, e)
        except PermanentError as e:
            self._dead_letter(conn, message, str(e))
            return "dead_letter"
        except Exception as e:
            return self._unexpected(conn, message, e)

    def _unexpected(self, conn: psycopg.Connection[Any], message: Message, e: Exception) -> str:
        key = message.dedupe_key
        attempts = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempts
        reason = f"{type(e).__name__}: {e}"
        if attempts >= self.max_attempts:
            self.log.error("giving up on a record", record=message.describe(), error=reason)
            self._dead_letter(conn, message, f"failed {attempts} times: {reason}")
            return "dead_letter"
        self.log.warning(
            "handler failed", record=message.describe(), error=reason, attempt=attempts
        )
        raise _RetryBatchError(f"{message.describe()}: {reason}") from e

    def _failure_event(
        self, conn: psycopg.Connection[Any], route: Route, message: Message, reason: str, code: str
    ) -> None:
        self.log.info("business failure", record=message.describe(), reason=reason)
        if not route.failure_event:
            return
        failure_type = route.failure_type or f"{message.type or 'Message'}Failed"
        publish(
            conn,
            route.failure_topic or self.name,
            message.key or "",
            failure_type,
            failure_payload(route, message, reason, code),
            message.correlation(),
        )

    def _dead_letter(self, conn: psycopg.Connection[Any], message: Message, reason: str) -> None:
        self.log.error("dead-lettered", record=message.describe(), reason=reason)
        headers = {
            **message.correlation(),
            "walsaga.deadletter.reason": reason[:1000],
            "walsaga.deadletter.consumer": self.name,
            "walsaga.deadletter.topic": message.topic,
            "walsaga.deadletter.partition": str(message.partition),
            "walsaga.deadletter.offset": str(message.offset),
            "walsaga.deadletter.id": message.id,
        }
        payload = {"headers": message.headers, **message.value_for_dead_letter()}
        publish(
            conn,
            self.dead_letter_topic,
            message.key or "",
            message.type or "Unknown",
            payload,
            headers,
        )

    # -- periodic work -----------------------------------------------------

    def _run_periodic(self) -> None:
        now = time.monotonic()
        for job in self._periodic:
            if now < job.due:
                continue
            job.due = now + job.interval_s
            try:
                conn = self._connection()
                with conn.transaction():
                    job.task(conn)
            except psycopg.Error as e:
                self.log.warning("periodic task failed", task=job.name, error=str(e))
            except Exception as e:
                self.log.error("periodic task failed", task=job.name, error=repr(e))

    def _trim_inbox(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            "DELETE FROM walsaga.inbox WHERE consumer = %s "
            "AND processed_at < now() - make_interval(secs => %s)",
            (self.name, self.inbox_retention_s),
        )


def _next_offsets(records: Sequence[Any]) -> list[TopicPartition]:
    """The offsets to commit after `records`: one past the last of each partition."""
    last: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic(), r.partition())
        last[key] = max(last.get(key, -1), r.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
