"""The participant runtime against real Postgres and a real broker: effects once,
business failures, dead letters, retries, declared SQL handlers."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from confluent_kafka import OFFSET_INVALID, Consumer, Producer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from participants import declarative, runtime
from participants.declarative import SqlHandler, _placeholders
from participants.handlers import HandlerContext
from participants.message import Message
from participants.runtime import Participant
from tests.support import create_topics, wait_until
from walsaga.errors import BusinessError

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def produce(broker: str, topic: str, records: list[dict[str, Any]]) -> None:
    """Write records as the relay would: key, JSON value, contract headers."""
    producer = Producer({"bootstrap.servers": broker})
    for r in records:
        value = r.get("raw", json.dumps(r.get("payload", {})).encode())
        headers = {"id": r.get("id", str(uuid.uuid4())), "type": r["type"], **r.get("headers", {})}
        producer.produce(topic, value, r.get("key", "k"), headers=headers)
    assert producer.flush(30) == 0


@contextmanager
def running(participant: Participant) -> Iterator[Participant]:
    thread = threading.Thread(target=participant.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: participant.ready.is_set() or not thread.is_alive(), timeout_s=60)
        assert thread.is_alive()
        yield participant
    finally:
        participant.stop()
        thread.join(30)


@pytest.fixture
def ledger(walsaga_db: str) -> str:
    with psycopg.connect(walsaga_db) as conn:
        conn.execute("CREATE TABLE ledger (entry text PRIMARY KEY, amount numeric NOT NULL)")
        conn.execute(
            """
            CREATE PROCEDURE book(p_entry text, p_amount numeric) LANGUAGE plpgsql AS $$
            BEGIN
                IF p_amount < 0 THEN
                    RAISE EXCEPTION 'negative amount %', p_amount USING ERRCODE = 'WS010';
                END IF;
                INSERT INTO ledger VALUES (p_entry, p_amount);
            END $$
            """
        )
    return walsaga_db


def rows(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, params or None).fetchall()


def outbox(dsn: str, aggregatetype: str) -> list[tuple[Any, ...]]:
    return rows(
        dsn,
        "SELECT type, aggregateid, payload, headers FROM walsaga.outbox "
        "WHERE aggregatetype = %s ORDER BY created_at",
        aggregatetype,
    )


def group_offsets(
    broker: str, group: str, topic: str, *, partitions: int
) -> tuple[list[int], list[int]]:
    """The committed offset of `group`, and the end offset, of each partition of `topic`."""
    consumer = Consumer(
        {"bootstrap.servers": broker, "group.id": group, "enable.auto.commit": False}
    )
    try:
        wanted = [TopicPartition(topic, p) for p in range(partitions)]
        committed = [tp.offset for tp in consumer.committed(wanted, timeout=30)]
        ends = [consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in wanted]
    finally:
        consumer.close()
    return committed, ends


class Recording(Participant):
    """A participant that keeps every record it is given, handled or not."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Message] = []

    def handle(self, messages: Sequence[Message]) -> bool:
        self.seen.extend(messages)
        return super().handle(messages)


def topic() -> str:
    return f"t_{uuid.uuid4().hex[:8]}"


def test_a_repeated_message_takes_effect_once(ledger: str, broker: str) -> None:
    t = topic()
    create_topics(broker, [t], partitions=2)
    participant = Participant(f"p-{t}", dsn=ledger, kafka={"bootstrap.servers": broker})
    calls: list[str] = []

    @participant.on(t, "Booked")
    def book(ctx: HandlerContext, message: Message) -> None:
        calls.append(message.id)
        ctx.execute("INSERT INTO ledger VALUES (%s, %s)", (message.field("entry"), 1))

    same = str(uuid.uuid4())
    records = [{"id": same, "type": "Booked", "payload": {"entry": "a"}}] * 3
    records += [{"type": "Booked", "payload": {"entry": "b"}}]
    with running(participant):
        produce(broker, t, records)
        wait_until(lambda: len(rows(ledger, "SELECT * FROM ledger")) == 2, timeout_s=30)
        produce(broker, t, [{"id": same, "type": "Booked", "payload": {"entry": "a"}}])
        wait_until(
            lambda: (
                participant.metrics.handled.labels(participant.name, "duplicate")._value.get() >= 3
            ),
            timeout_s=30,
        )
    assert sorted(r[0] for r in rows(ledger, "SELECT entry FROM ledger")) == ["a", "b"]
    assert calls.count(same) == 1
    # Offsets were committed, repeats included: the group's position is the
    # end of every partition that holds records.
    committed, ends = group_offsets(broker, f"p-{t}", t, partitions=2)
    assert sum(ends) == 5
    for position, end in zip(committed, ends, strict=True):
        if end:
            assert position == end, (committed, ends)
        else:  # nothing there: nothing to commit
            assert position in (OFFSET_INVALID, 0), (committed, ends)
    # So a new run of the same participant is given no record at all (the
    # inbox would hide repeats from the handler: count what is consumed).
    again = Recording(f"p-{t}", dsn=ledger, kafka={"bootstrap.servers": broker})
    again.add_route(participant.routes[0])
    with running(again):
        time.sleep(2)
    assert again.seen == []
    assert calls.count(same) == 1


def test_a_business_failure_rolls_back_and_publishes_a_correlated_failure_event(
    ledger: str, broker: str
) -> None:
    t = topic()
    participant = Participant(f"p-{t}", dsn=ledger, kafka={"bootstrap.servers": broker})
    calls: list[str] = []

    @participant.on(t, "Reserve", failure_type="ReservationRefused", failure_topic="stock")
    def reserve(ctx: HandlerContext, message: Message) -> None:
        calls.append(message.payload["sku"])
        ctx.execute("INSERT INTO ledger VALUES (%s, 1)", (f"half-done {message.payload['sku']}",))
        raise BusinessError("out of stock", code="NO_STOCK")

    # Three records waiting (handled as a batch), then one alone with a trace:
    # each handler runs once, whichever way its transaction is shaped.
    produce(broker, t, [{"type": "Reserve", "key": f"sku-{i}", "payload": {"sku": f"sku-{i}"},
                         "headers": {"saga_id": f"saga-{i}"}} for i in (1, 2, 3)])  # fmt: skip
    with running(participant):
        wait_until(lambda: len(outbox(ledger, "stock")) == 3, timeout_s=30)
        traced = {"saga_id": "saga-4", "traceparent": TRACEPARENT}
        produce(broker, t, [{"type": "Reserve", "key": "sku-4", "payload": {"sku": "sku-4"},
                             "headers": traced}])  # fmt: skip
        wait_until(lambda: len(outbox(ledger, "stock")) == 4, timeout_s=30)
    assert sorted(calls) == ["sku-1", "sku-2", "sku-3", "sku-4"], "each handler ran once"
    assert rows(ledger, "SELECT * FROM ledger") == []
    refusals = {key: (type_, payload, headers) for type_, key, payload, headers
                in outbox(ledger, "stock")}  # fmt: skip
    for i in (1, 2, 3, 4):
        type_, payload, headers = refusals[f"sku-{i}"]
        assert type_ == "ReservationRefused"
        assert payload["reason"] == "out of stock"
        assert payload["code"] == "NO_STOCK"
        assert payload["sku"] == f"sku-{i}"
        assert headers["saga_id"] == f"saga-{i}"
    # The lone record's failure event continues its trace.
    assert refusals["sku-4"][2]["traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]


def test_declared_sql_handlers_bind_fields_and_turn_ws_errors_into_failure_events(
    ledger: str, broker: str
) -> None:
    t = topic()
    config = declarative.ParticipantConfig.model_validate(
        {
            "participant": {"name": f"p-{t}", "dsn": ledger},
            "kafka": {"bootstrap.servers": broker},
            "handler": [
                {"topic": t, "type": "Book", "sql": "CALL book(:entry, :amount)",
                 "failure_type": "BookingRefused", "failure_topic": "ledger"},
            ],
        }
    )  # fmt: skip
    with running(declarative.build(config)):
        produce(broker, t, [
            {"type": "Book", "payload": {"entry": "e1", "amount": 12.5}},
            {"type": "Book", "payload": {"entry": "e2", "amount": -1}},
            {"type": "Book", "payload": {"entry": "e3"}},  # no amount: dead letter
            {"type": "Book", "raw": b"\xff not json"},  # dead letter
            {"type": "Book", "payload": {"entry": "e4", "amount": 3}},
        ])  # fmt: skip
        wait_until(lambda: len(rows(ledger, "SELECT * FROM ledger")) == 2, timeout_s=30)
        wait_until(lambda: len(outbox(ledger, f"p-{t}.deadletter")) == 2, timeout_s=30)
    assert rows(ledger, "SELECT entry, amount::float FROM ledger ORDER BY entry") == [
        ("e1", 12.5),
        ("e4", 3.0),
    ]
    [(type_, _, payload, _)] = outbox(ledger, "ledger")
    assert type_ == "BookingRefused"
    assert payload["code"] == "WS010"
    assert "negative amount" in payload["reason"]
    letters = outbox(ledger, f"p-{t}.deadletter")
    reasons = sorted(h["walsaga.deadletter.reason"] for _, _, _, h in letters)
    assert "payload has no field 'amount'" in reasons[1] or "payload has no field" in reasons[0]
    assert any("not JSON" in r for r in reasons)
    assert all(h["walsaga.deadletter.topic"] == t for _, _, _, h in letters)
    raw = next(p for _, _, p, _ in letters if p["encoding"] == "base64")
    assert raw["value"]


def test_a_handler_that_keeps_failing_is_dead_lettered_and_the_rest_goes_on(
    ledger: str, broker: str
) -> None:
    t = topic()
    participant = Participant(f"p-{t}", dsn=ledger, kafka={"bootstrap.servers": broker},
                              max_attempts=3, retry_min_s=0.01, retry_max_s=0.05)  # fmt: skip

    @participant.on(t)
    def handle(ctx: HandlerContext, message: Message) -> None:
        if message.field("entry") == "bad":
            raise RuntimeError("bug in the handler")
        ctx.execute("INSERT INTO ledger VALUES (%s, 1)", (message.field("entry"),))

    with running(participant):
        produce(broker, t, [{"type": "X", "payload": {"entry": e}} for e in ("a", "bad", "c")])
        wait_until(lambda: len(outbox(ledger, f"p-{t}.deadletter")) == 1, timeout_s=30)
        wait_until(lambda: len(rows(ledger, "SELECT * FROM ledger")) == 2, timeout_s=30)
    [(_, _, payload, headers)] = outbox(ledger, f"p-{t}.deadletter")
    assert (
        "failed 3 times: RuntimeError: bug in the handler" in headers["walsaga.deadletter.reason"]
    )
    assert payload["value"] == {"entry": "bad"}


def test_transient_errors_are_retried_until_the_effect_lands_once(ledger: str, broker: str) -> None:
    t = topic()
    participant = Participant(f"p-{t}", dsn=ledger, kafka={"bootstrap.servers": broker},
                              retry_min_s=0.01)  # fmt: skip
    failures = {"left": 3}

    @participant.on(t)
    def handle(ctx: HandlerContext, message: Message) -> None:
        ctx.execute("INSERT INTO ledger VALUES (%s, 1)", (message.field("entry"),))
        if failures["left"]:
            failures["left"] -= 1
            raise psycopg.errors.SerializationFailure("could not serialize access")

    with running(participant):
        produce(broker, t, [{"type": "X", "payload": {"entry": "once"}}])
        wait_until(lambda: rows(ledger, "SELECT entry FROM ledger") == [("once",)], timeout_s=30)
    assert failures["left"] == 0
    assert participant.metrics.retries.labels(participant.name)._value.get() >= 3


def test_a_compensation_seals_its_command_against_a_late_copy(ledger: str, broker: str) -> None:
    t = topic()
    participant = Participant(f"p-{t}", dsn=ledger, kafka={"bootstrap.servers": broker})

    @participant.on(t, "Do")
    def do(ctx: HandlerContext, message: Message) -> None:
        ctx.execute("INSERT INTO ledger VALUES ('done', 1)")

    @participant.on(t, "Undo")
    def undo(ctx: HandlerContext, message: Message) -> None:
        ctx.execute("INSERT INTO ledger VALUES ('undone', 1)")

    with running(participant):
        produce(broker, t, [
            {"type": "Undo", "headers": {"idempotency_key": "s/1/compensate",
                                         "compensates": "s/1/do"}},
            {"type": "Do", "headers": {"idempotency_key": "s/1/do"}},
            {"type": "Do", "headers": {"idempotency_key": "s/2/do"}},
        ])  # fmt: skip
        wait_until(
            lambda: (
                participant.metrics.handled.labels(participant.name, "duplicate")._value.get() >= 1
            ),
            timeout_s=30,
        )
        wait_until(lambda: len(rows(ledger, "SELECT * FROM ledger")) == 2, timeout_s=30)
    assert sorted(r[0] for r in rows(ledger, "SELECT entry FROM ledger")) == ["done", "undone"]


def test_sql_parameters_leave_casts_and_percent_signs_alone() -> None:
    query, names = _placeholders(
        "SELECT :a::int, :header.saga_id, '50%' AS pct, :b.c, x::text FROM t WHERE y = :a"
    )
    assert names == ["a", "header.saga_id", "b.c", "a"]
    assert query == (
        "SELECT %(p0)s::int, %(p1)s, '50%%' AS pct, %(p2)s, x::text FROM t WHERE y = %(p3)s"
    )
    handler = SqlHandler("CALL f(:message.id, :n)")
    assert handler.parameters == ["message.id", "n"]


def booking_participant(ledger: str, broker: str) -> Participant:
    """The declared SQL handler of the ledger: ``CALL book(:entry, :amount)``, refusals
    (a negative amount) published as BookingRefused."""
    config = declarative.ParticipantConfig.model_validate(
        {
            "participant": {"name": f"p-{topic()}", "dsn": ledger},
            "kafka": {"bootstrap.servers": broker},
            "handler": [
                {"topic": "bookings", "type": "Book", "sql": "CALL book(:entry, :amount)",
                 "failure_type": "BookingRefused", "failure_topic": "refusals"},
            ],
        }
    )  # fmt: skip
    return declarative.build(config)


def bookings(entries: Sequence[tuple[str, int]]) -> list[Message]:
    """Records of a batch, as the consumer hands them over."""
    return [
        Message(
            topic="bookings",
            partition=0,
            offset=offset,
            key=entry,
            value=json.dumps({"entry": entry, "amount": amount}).encode(),
            headers={"id": str(uuid.uuid4()), "type": "Book"},
        )
        for offset, (entry, amount) in enumerate(entries)
    ]


def redone(participant: Participant) -> float:
    value = participant.metrics.registry.get_sample_value(
        "walsaga_participant_batches_redone_total", {"participant": participant.name}
    )
    return value or 0.0


def booked(ledger: str) -> list[str]:
    return sorted(r[0] for r in rows(ledger, "SELECT entry FROM ledger"))


def refused(ledger: str) -> list[str]:
    return sorted(key for _, key, _, _ in outbox(ledger, "refusals"))


def test_a_batch_of_declared_handlers_runs_without_savepoints_until_a_record_fails(
    ledger: str, broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "CAREFUL_BATCHES", 2)
    participant = booking_participant(ledger, broker)

    assert participant.handle(bookings([("a1", 1), ("a2", 2), ("a3", 3)]))
    assert booked(ledger) == ["a1", "a2", "a3"]
    assert redone(participant) == 0

    # A refusal in the middle: the batch is rolled back and handled again, each
    # record under a savepoint; the others land once, the refusal is published.
    assert participant.handle(bookings([("b1", 1), ("b2", -1), ("b3", 3)]))
    assert booked(ledger) == ["a1", "a2", "a3", "b1", "b3"]
    assert refused(ledger) == ["b2"]
    assert redone(participant) == 1

    # The next two batches take savepoints from the start: a refusal costs no redo.
    assert participant.handle(bookings([("c1", -1), ("c2", 2)]))
    assert participant.handle(bookings([("d1", 1), ("d2", 2)]))
    assert redone(participant) == 1
    assert refused(ledger) == ["b2", "c1"]

    # Then batches go without savepoints again.
    assert participant.handle(bookings([("e1", 1), ("e2", -2)]))
    assert redone(participant) == 2
    assert booked(ledger) == ["a1", "a2", "a3", "b1", "b3", "c2", "d1", "d2", "e1"]
    assert refused(ledger) == ["b2", "c1", "e2"]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    batches=st.lists(st.lists(st.integers(min_value=-2, max_value=3), max_size=6), max_size=6),
    careful_batches=st.integers(min_value=0, max_value=3),
)
def test_however_batches_fail_each_record_lands_or_is_refused_once(
    ledger: str, broker: str, batches: list[list[int]], careful_batches: int
) -> None:
    """Declared handlers, batches of any mix of bookings and refusals (a negative
    amount): every booking lands once, every refusal is published once."""
    run = uuid.uuid4().hex[:6]
    participant = booking_participant(ledger, broker)
    original = runtime.CAREFUL_BATCHES
    runtime.CAREFUL_BATCHES = careful_batches
    try:
        expected_booked, expected_refused = [], []
        for b, amounts in enumerate(batches):
            entries = [(f"{run}-{b}-{i}", amount) for i, amount in enumerate(amounts)]
            if entries:
                assert participant.handle(bookings(entries))
            expected_booked += [e for e, amount in entries if amount >= 0]
            expected_refused += [e for e, amount in entries if amount < 0]
    finally:
        runtime.CAREFUL_BATCHES = original
    assert [e for e in booked(ledger) if e.startswith(run)] == sorted(expected_booked)
    assert [e for e in refused(ledger) if e.startswith(run)] == sorted(expected_refused)
