"""No single event may stop a database's stream; every payload arrives as written.

Against a real Postgres with wal2json and a real broker: an event Kafka refuses
for good (here: larger than the producer's ``message.max.bytes``) is reported on
the dead-letter topic while the events around it flow, or halts the source when
``on_refused = "halt"``; ``walsaga relay replay`` delivers it once the cause is
fixed. Payloads keep every digit, character and byte on the whole path.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from participants.examples.embedded import EmbeddedBroker
from relay import deploy
from relay.capture import parse_spec
from relay.delivery import Failure, Refused, classify, dead_letter_record, triage
from relay.wal2json import parse_lsn
from tests.support import (
    WALSAGA,
    RelayProcess,
    consume,
    create_topics,
    headers_of,
    relay_toml,
    wait_until,
)

BIG_BYTES = 3_000_000  # over librdkafka's default message.max.bytes (1,000,000)
DEAD_LETTERS = "walsaga.relay.dead-letter"


def _topic() -> str:
    return f"doc-{uuid.uuid4().hex[:8]}"


def publish(conn: psycopg.Connection[Any], topic: str, key: str, payload: Any) -> str:
    row = conn.execute(
        "SELECT walsaga.publish(%s, %s, 'Stored', %s::jsonb, '{}'::jsonb)::text",
        (topic, key, json.dumps(payload)),
    ).fetchone()
    assert row is not None
    return str(row[0])


def write_with_a_big_one(dsn: str, topic: str) -> tuple[list[str], str]:
    """Ten ordinary events on keys k1/k2 and one too large for Kafka, in the middle of
    a transaction; returns the ordinary ids in commit order and the big one's id."""
    ordinary: list[str] = []
    with psycopg.connect(dsn) as conn:
        for n in range(2):
            with conn.transaction():
                ordinary.append(publish(conn, topic, f"k{n % 2 + 1}", {"n": n}))
        with conn.transaction():
            ordinary.append(publish(conn, topic, "k1", {"n": 2}))
            big = publish(conn, topic, "k1", {"n": -1, "blob": "x" * BIG_BYTES})
            ordinary.append(publish(conn, topic, "k2", {"n": 3}))
        for n in range(4, 10):
            with conn.transaction():
                ordinary.append(publish(conn, topic, f"k{n % 2 + 1}", {"n": n}))
    return ordinary, big


def dead_letters(broker: str) -> list[Any]:
    """Every report on the dead-letter topic (none while the topic does not exist)."""
    topics = AdminClient({"bootstrap.servers": broker}).list_topics(timeout=10).topics
    if DEAD_LETTERS not in topics:
        return []
    return consume(broker, [DEAD_LETTERS], until=lambda r: False, timeout_s=4)


def metric(relay: RelayProcess, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(relay.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def confirmed_lsn(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
            "WHERE database = current_database()"
        ).fetchone()
    assert row is not None and row[0]
    return parse_lsn(row[0])


def test_an_oversized_event_is_dead_lettered_and_the_stream_goes_on(
    walsaga_db: str, broker: str, tmp_path: Path
) -> None:
    topic = _topic()
    create_topics(broker, [topic], partitions=1)
    relay = RelayProcess.start(
        tmp_path,
        bootstrap=broker,
        sources={"docs": walsaga_db},
        relay={"outbox_retention_s": 0, "cleanup_interval_s": 0.5},
    )
    with relay:
        relay.wait_streaming("docs")
        ordinary, big = write_with_a_big_one(walsaga_db, topic)
        consume(broker, [topic], until=lambda r: len(r) >= len(ordinary))
        time.sleep(2)  # anything more (a repeat, the big one) would arrive by now
        records = consume(broker, [topic], until=lambda r: False, timeout_s=4)
        ids = [headers_of(r)["id"] for r in records]
        assert ids == ordinary, "every ordinary event once, in commit order, none other"

        reports = consume(broker, [DEAD_LETTERS], until=lambda r: any(
            headers_of(m).get("id") == big for m in r))  # fmt: skip
        report = next(m for m in reports if headers_of(m).get("id") == big)
        body = json.loads(report.value())
        assert body["id"] == big
        assert body["source"] == "docs"
        assert body["topic"] == topic and body["key"] == "k1"
        assert body["code"] == "MSG_SIZE_TOO_LARGE"
        assert "too large" in body["reason"].lower()
        assert "payload" not in body and "too large to include" in body["payload_omitted"]
        assert headers_of(report)["walsaga.deadletter.code"] == "MSG_SIZE_TOO_LARGE"

        # The next event of the same key says which event is missing before it.
        after = [r for r in records if r.key() == b"k1" and json.loads(r.value())["n"] > 2]
        assert headers_of(after[0]).get("walsaga.gap") == big
        assert all("walsaga.gap" not in headers_of(r) for r in records if r is not after[0])

        # The position moved past it, and its outbox row outlives retention.
        big_lsn = parse_lsn(body["lsn"])
        wait_until(lambda: confirmed_lsn(walsaga_db) > big_lsn, timeout_s=30, what="confirm")
        with psycopg.connect(walsaga_db) as conn:
            wait_until(
                lambda: conn.execute("SELECT count(*) FROM walsaga.outbox").fetchone() == (1,),
                timeout_s=30,
                what="retention of the published rows",
            )
            kept = conn.execute("SELECT id::text FROM walsaga.outbox").fetchone()
            noted = conn.execute(
                "SELECT source, topic, code, replayed_at FROM walsaga.relay_dead_letter "
                "WHERE event_id = %s",
                (big,),
            ).fetchone()
        assert kept == (big,)
        assert noted == ("docs", topic, "MSG_SIZE_TOO_LARGE", None)
        assert metric(relay, "walsaga_relay_events_refused_total", source="docs",
                      reason="MSG_SIZE_TOO_LARGE", action="dead-lettered") == 1  # fmt: skip
        assert relay.state("docs") == "streaming"

    # The cause fixed (a larger limit, which this broker accepts), it is delivered.
    fixed = relay_toml(
        tmp_path / "fixed.toml",
        bootstrap=broker,
        sources={"docs": walsaga_db},
        kafka={"message.max.bytes": 10_000_000},
    )
    done = subprocess.run(
        [WALSAGA, "relay", "--config", str(fixed), "replay", "--from-id", big],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "re-published 1 events" in done.stdout
    again = consume(broker, [topic], until=lambda r: any(
        headers_of(m)["id"] == big for m in r))  # fmt: skip
    delivered = next(m for m in again if headers_of(m)["id"] == big)
    assert json.loads(delivered.value())["blob"] == "x" * BIG_BYTES
    assert headers_of(delivered)["walsaga.replay"] == "1"
    with psycopg.connect(walsaga_db) as conn:
        row = conn.execute(
            "SELECT replayed_at IS NOT NULL FROM walsaga.relay_dead_letter WHERE event_id = %s",
            (big,),
        ).fetchone()
    assert row == (True,)


def test_with_on_refused_halt_nothing_after_the_refused_event_is_published(
    walsaga_db: str, broker: str, tmp_path: Path
) -> None:
    topic = _topic()
    create_topics(broker, [topic], partitions=1)
    relay = RelayProcess.start(
        tmp_path, bootstrap=broker, sources={"docs": walsaga_db}, relay={"on_refused": "halt"}
    )
    with relay:
        relay.wait_streaming("docs")
        ordinary, big = write_with_a_big_one(walsaga_db, topic)
        before = ordinary[:3]  # committed before the big one, or before it in its transaction
        wait_until(lambda: relay.state("docs") == "halted", timeout_s=60, what="halted")
        time.sleep(3)  # time for anything after it to arrive, if it wrongly would
        records = consume(broker, [topic], until=lambda r: False, timeout_s=4)
        assert [headers_of(r)["id"] for r in records] == before
        assert big not in {headers_of(m).get("id") for m in dead_letters(broker)}
        health = relay.health()
        assert health is not None and health["status"] == "degraded"
        detail = health["sources"]["docs"]["detail"]
        assert big in detail and "message.max.bytes" in detail and "on_refused" in detail
        assert metric(relay, "walsaga_relay_halted", source="docs") == 1
        assert "source halted" in relay.read_log()
        at = re.search(r" at ([0-9A-F]+/[0-9A-F]+) ", detail)
        assert at is not None, detail
        assert confirmed_lsn(walsaga_db) < parse_lsn(at.group(1)), "stays before the event"

    # Raising the limit lets it and everything after it through, in order.
    relay = RelayProcess.start(
        tmp_path,
        bootstrap=broker,
        sources={"docs": walsaga_db},
        relay={"on_refused": "halt"},
        kafka={"message.max.bytes": 10_000_000},
        name="fixed",
    )
    with relay:
        everything = [*before, big, *ordinary[3:]]
        records = consume(broker, [topic], until=lambda r: len(
            {headers_of(m)["id"] for m in r}) >= len(everything))  # fmt: skip
        seen: list[str] = []
        for record in records:
            event_id = headers_of(record)["id"]
            if event_id not in seen:
                seen.append(event_id)
        assert seen == everything
        wait_until(lambda: metric(relay, "walsaga_relay_halted", source="docs") == 0,
                   timeout_s=30, what="no longer halted")  # fmt: skip


@pytest.mark.slow
def test_a_broker_outage_loses_and_dead_letters_nothing(
    walsaga_db: str, own_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    broker = own_broker.bootstrap_servers
    topic = _topic()
    create_topics(broker, [topic], partitions=1)
    relay = RelayProcess.start(tmp_path, bootstrap=broker, sources={"docs": walsaga_db})
    with relay:
        relay.wait_streaming("docs")
        first, big = write_with_a_big_one(walsaga_db, topic)
        own_broker.pause()
        try:
            with psycopg.connect(walsaga_db) as conn:
                during = [publish(conn, topic, f"k{n % 3}", {"n": 100 + n}) for n in range(200)]
                conn.commit()
            time.sleep(5)
        finally:
            own_broker.resume()
        want = len(first) + len(during)
        records = consume(
            broker,
            [topic],
            until=lambda r: len({headers_of(m)["id"] for m in r}) >= want,
            timeout_s=120,
        )
        seen = {headers_of(r)["id"] for r in records}
        assert seen == {*first, *during}
        assert [headers_of(m)["id"] for m in dead_letters(broker)] == [big]


# -- payload fidelity ------------------------------------------------------------

DOCUMENT = {
    "amount": "12345678901234567890.123456789012345678",
    "price": "10.50",
    "tiny": "0.000000000000000000000000000001",
    "int": "123456789012345678901234567890",
}

LEGACY = """
CREATE TABLE public.invoices (
    id      bigint PRIMARY KEY,
    amount  numeric NOT NULL,
    price   numeric(10, 2) NOT NULL,
    note    text NOT NULL,
    doc     jsonb NOT NULL
);
"""


def spec(mode: str, topic: str) -> str:
    return f"""
[[capture]]
table = "public.invoices"
on = ["insert"]
event = "InvoiceStored"
aggregate_type = "{topic}"
aggregate_id = "id"
mode = "{mode}"
"""


def exact(text: bytes | str) -> Any:
    """JSON with every number kept as its text, so 10.50 and 10.5 differ."""
    return json.loads(text, parse_float=lambda s: ("number", s), parse_int=lambda s: ("number", s))


def test_payloads_arrive_exactly_as_written_on_every_path(
    walsaga_db: str, broker: str, tmp_path: Path
) -> None:
    topics = {path: _topic() for path in ("publish", "emit", "outbox", "message")}
    create_topics(broker, topics.values(), partitions=1)
    note = 'naïve — 日本語 "quoted" back\\slash\nnew line\ttab \u2028 \U0001f680 \x01'
    doc_text = (
        json.dumps(
            {
                "numbers": [1.10, 2.50],
                "nested": {"list": [1, {"x": None, "y": [True, False]}], "empty": {}},
                "text": note,
                "large": "y" * 300_000,
            }
        )
        .replace("1.1,", "1.10,")
        .replace("2.5]", "2.50]")
    )
    payload_sql = (
        "jsonb_build_object('amount', %(amount)s::numeric, 'price', %(price)s::numeric(10,2), "
        "'tiny', %(tiny)s::numeric, 'int', %(int)s::numeric, 'note', %(note)s::text, "
        "'doc', %(doc)s::jsonb)"
    )
    params = {**DOCUMENT, "note": note, "doc": doc_text}
    relay = RelayProcess.start(tmp_path, bootstrap=broker, sources={"docs": walsaga_db})
    relay.wait_streaming("docs")
    with psycopg.connect(walsaga_db) as conn:
        conn.execute(LEGACY)
        conn.commit()
        for mode in ("outbox", "message"):
            deploy.deploy(conn, parse_spec(spec(mode, topics[mode]), source=f"{mode}.toml"))
            conn.execute(
                "INSERT INTO public.invoices VALUES (%(id)s, %(amount)s, %(price)s, %(note)s, "
                "%(doc)s)",
                {**params, "id": 1 if mode == "outbox" else 2},
            )
            conn.commit()
            deploy.drop(conn, parse_spec(spec(mode, topics[mode]), source=f"{mode}.toml"))
        expected_row = conn.execute(
            "SELECT to_jsonb(i)::text FROM public.invoices i WHERE id = 1"
        ).fetchone()
        expected_doc = conn.execute(f"SELECT ({payload_sql})::text", params).fetchone()
        for path in ("publish", "emit"):
            conn.execute(
                f"SELECT walsaga.{path}(%(topic)s, 'i', 'InvoiceStored', {payload_sql}, "
                "'{}'::jsonb)",
                {**params, "topic": topics[path]},
            )
        conn.commit()
    assert expected_row is not None and expected_doc is not None
    with relay:
        for path, topic in topics.items():
            records = consume(broker, [topic], until=lambda r: len(r) >= 1)
            assert len(records) == 1, path
            value = records[0].value()
            assert value is not None
            got = exact(value)
            if path in ("outbox", "message"):
                want = exact(expected_row[0])
                want["id"] = ("number", "2") if path == "message" else ("number", "1")
            else:
                want = exact(expected_doc[0])
            assert got == want, f"{path}: the payload changed on the way"
            assert got.get("price") == ("number", "10.50"), path
            assert got["doc"]["text"] == note and len(got["doc"]["large"]) == 300_000, path


def broker_enforces_topic_limits(broker: str, topic: str) -> bool:
    """Whether the broker refuses a record over the topic's max.message.bytes (Apache Kafka
    does; the embedded broker does not), probed on a topic of its own."""
    probe = Producer({"bootstrap.servers": broker, "message.max.bytes": 10_000_000})
    outcome: list[Any] = []
    probe.produce(topic, b"p" * 200_000, on_delivery=lambda err, msg: outcome.append(err))
    probe.flush(30)
    return bool(outcome and outcome[0] is not None)


def test_a_batch_the_broker_refuses_for_one_record_delivers_the_others(
    walsaga_db: str, broker: str, tmp_path: Path
) -> None:
    limited = {"max.message.bytes": "100000"}
    probe_topic, topic = _topic(), _topic()
    admin = AdminClient({"bootstrap.servers": broker})
    for future in admin.create_topics(
        [NewTopic(t, num_partitions=1, config=limited) for t in (probe_topic, topic)]
    ).values():
        future.result(30)
    if not broker_enforces_topic_limits(broker, probe_topic):
        pytest.skip("this broker does not enforce a topic's max.message.bytes (run against "
                    "Apache Kafka with WALSAGA_TEST_KAFKA)")  # fmt: skip
    relay = RelayProcess.start(
        tmp_path,
        bootstrap=broker,
        sources={"docs": walsaga_db},
        kafka={"message.max.bytes": 10_000_000, "linger.ms": 50},
    )
    with relay:
        relay.wait_streaming("docs")
        with psycopg.connect(walsaga_db) as conn:  # one transaction: one produce batch
            small = [publish(conn, topic, "k", {"n": n}) for n in range(5)]
            big = publish(conn, topic, "k", {"blob": "x" * 200_000})
            small += [publish(conn, topic, "k", {"n": n}) for n in range(5, 10)]
            conn.commit()
        records = consume(broker, [topic], until=lambda r: {
            headers_of(m)["id"] for m in r} >= set(small))  # fmt: skip
        assert {headers_of(m)["id"] for m in records} == set(small)
        reports = consume(broker, [DEAD_LETTERS], until=lambda r: any(
            headers_of(m)["id"] == big for m in r))  # fmt: skip
        assert any(headers_of(m)["id"] == big for m in reports)


# -- the pure part -------------------------------------------------------------------


def refused(value: bytes) -> Refused:
    return Refused(
        "e-1",
        "orders",
        "o-1",
        value,
        {"id": "e-1", "type": "OrderStored", "lsn": "0/16B3748", "xid": "7", "saga_id": "s"},
        0x16B3748,
        "Broker: Message size too large",
        "MSG_SIZE_TOO_LARGE",
    )


def test_the_dead_letter_report_carries_the_event_and_its_payload_when_it_fits() -> None:
    topic, value, key, headers = dead_letter_record(
        refused(b'{"price": 10.50}'), topic=DEAD_LETTERS, source="shop", max_bytes=1_000_000
    )
    assert (topic, key) == (DEAD_LETTERS, "o-1")
    body = exact(value)
    assert body["payload"] == {"price": ("number", "10.50")}
    assert (body["id"], body["source"], body["topic"], body["lsn"], body["xid"]) == (
        "e-1", "shop", "orders", "0/16B3748", "7")  # fmt: skip
    assert body["headers"]["saga_id"] == "s"
    assert headers["walsaga.deadletter.code"] == "MSG_SIZE_TOO_LARGE"
    assert headers["id"] == "e-1" and headers["source"] == "shop"


def test_the_dead_letter_report_leaves_out_a_payload_that_does_not_fit() -> None:
    _, value, _, _ = dead_letter_record(
        refused(b'"' + b"x" * 600_000 + b'"'), topic=DEAD_LETTERS, source="s", max_bytes=1_000_000
    )
    body = json.loads(value)
    assert "payload" not in body
    assert body["payload_omitted"].startswith("600002 bytes")
    assert len(value) < 2_000


def test_failures_are_sorted_by_what_they_ask_for() -> None:
    def error(code: int) -> KafkaError:
        return KafkaError(code)

    assert classify(KafkaError.MSG_SIZE_TOO_LARGE) is Failure.REFUSED
    assert classify(KafkaError.TOPIC_AUTHORIZATION_FAILED) is Failure.BLOCKED
    assert classify(KafkaError._UNKNOWN_TOPIC) is Failure.BLOCKED
    assert classify(KafkaError._TRANSPORT) is Failure.TRANSIENT
    assert classify(KafkaError.NOT_LEADER_FOR_PARTITION) is Failure.TRANSIENT
    found = triage(
        [(error(KafkaError.MSG_SIZE_TOO_LARGE), "a"), (error(KafkaError._TRANSPORT), "b")]
    )
    assert found.next_step is Failure.TRANSIENT  # restart: the refusal may be collateral
    found = triage(
        [(error(KafkaError.MSG_SIZE_TOO_LARGE), "a"), (error(KafkaError.INVALID_RECORD), "b")]
    )
    assert found.next_step is Failure.REFUSED and [m for _, m in found.refused] == ["a", "b"]
    found = triage(
        [(error(KafkaError._TRANSPORT), "a"), (error(KafkaError.CLUSTER_AUTHORIZATION_FAILED), "b")]
    )
    assert found.next_step is Failure.BLOCKED
