"""Consumers written for other tools read walsaga's events unchanged.

The relay's presets against a real Postgres and broker: CloudEvents binary
mode checked with the CloudEvents SDK's own Kafka parser, and Debezium's
outbox event router checked with a consumer written from Debezium's
documentation (its example set-up: JsonConverter without schemas for key and
value, ``table.fields.additional.placement = type:header:eventType``), not
from walsaga's code. In every mode the record timestamp is the commit time.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event

from tests.support import WALSAGA, RelayProcess, consume, create_topics, relay_toml


def write(dsn: str, aggregatetype: str, count: int) -> list[dict[str, Any]]:
    """`count` events in transactions of their own; each with its commit window."""
    written = []
    with psycopg.connect(dsn) as conn:
        for n in range(count):
            payload = {"n": n, "price": "10.50", "note": "naïve"}
            conn.execute("BEGIN")
            row = conn.execute(
                "SELECT walsaga.publish(%s, %s, 'ThingHappened', %s::jsonb, %s::jsonb)::text",
                (aggregatetype, f"agg-{n % 3}", json.dumps(payload), '{"saga_id": "s-1"}'),
            ).fetchone()
            assert row is not None
            before = time.time()
            conn.commit()
            after = time.time()
            written.append(
                {
                    "id": row[0],
                    "key": f"agg-{n % 3}",
                    "payload": payload,
                    "committed": (before, after),
                }
            )
    return written


def committed_then(record: Any, event: dict[str, Any]) -> bool:
    """The record's timestamp is the event's commit time (to the millisecond)."""
    kind, stamp_ms = record.timestamp()
    before, after = event["committed"]
    return bool(kind != 0 and before * 1000 - 1 <= stamp_ms <= after * 1000 + 1)


def test_the_record_timestamp_is_the_commit_time_not_the_time_it_was_sent(
    walsaga_db: str, broker: str, tmp_path: Path
) -> None:
    topic = f"things-{uuid.uuid4().hex[:6]}"
    create_topics(broker, [topic], partitions=1)
    out = subprocess.run(
        [WALSAGA, "deploy", "--dsn", walsaga_db, "--slot", "walsaga_things"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    written = write(walsaga_db, topic, 5)
    time.sleep(2)  # the relay starts well after the commits
    config = relay_toml(tmp_path / "relay.toml", bootstrap=broker, sources={"things": walsaga_db})
    relay = RelayProcess(config, tmp_path / "relay.log")
    relay.launch()
    with relay:
        records = consume(broker, [topic], until=lambda r: len(r) >= len(written))
    by_id = {e["id"]: e for e in written}
    assert len(records) == len(written)
    for record in records:
        event = by_id[dict(record.headers())["id"].decode()]
        assert committed_then(record, event), (record.timestamp(), event["committed"])


def test_cloudevents_binary_mode_passes_the_sdk_parser(
    walsaga_db: str, broker: str, tmp_path: Path
) -> None:
    topic = f"things-{uuid.uuid4().hex[:6]}"
    create_topics(broker, [topic], partitions=2)
    relay = RelayProcess.start(
        tmp_path,
        bootstrap=broker,
        sources={"things": walsaga_db},
        relay={"cloudevents": "binary"},
    )
    with relay:
        relay.wait_streaming("things")
        written = write(walsaga_db, topic, 6)
        records = consume(broker, [topic], until=lambda r: len(r) >= len(written))
    by_id = {e["id"]: e for e in written}
    assert len(records) == len(written)
    for record in records:
        headers = dict(record.headers() or ())
        event = from_binary_event(KafkaMessage(headers, record.key(), record.value()))
        attributes = event.get_attributes()
        written_event = by_id[attributes["id"]]
        assert attributes["specversion"] == "1.0"
        assert attributes["source"] == "/walsaga/things"
        assert attributes["type"] == "ThingHappened"
        assert attributes["subject"] == written_event["key"]
        assert attributes["datacontenttype"] == "application/json"
        assert attributes["partitionkey"] == written_event["key"]
        before, after = written_event["committed"]
        assert before - 0.001 <= attributes["time"].timestamp() <= after + 0.001
        assert event.get_data() == written_event["payload"]
        assert committed_then(record, written_event)
        # walsaga's own consumers still find what they need.
        assert headers["saga_id"] == b"s-1" and headers["type"] == b"ThingHappened"


def debezium_consumer(record: Any) -> dict[str, Any]:
    """What the shipment service of Debezium's outbox example does with a record
    (KafkaEventConsumer + OrderEventHandler): key and value through Kafka Connect's
    JsonConverter, headers ``id`` (a UUID) and ``eventType``."""
    headers = {name: value.decode() for name, value in record.headers() or ()}
    event_id = uuid.UUID(headers["id"])
    event_type = headers["eventType"]
    key = json.loads(record.key())
    unescaped = json.loads(record.value())  # objectMapper.readValue(event, String.class)
    payload = json.loads(unescaped)  # objectMapper.readTree(unescaped)
    if isinstance(payload, dict) and "schema" in payload:
        payload = payload["payload"]
    return {"id": str(event_id), "type": event_type, "key": key, "payload": payload}


def test_a_consumer_of_debeziums_outbox_router_reads_the_events_unchanged(
    walsaga_db: str, broker: str, tmp_path: Path
) -> None:
    aggregatetype = f"order{uuid.uuid4().hex[:6]}"
    topic = f"outbox.event.{aggregatetype}"  # Debezium's default route.topic.replacement
    create_topics(broker, [topic], partitions=2)
    relay = RelayProcess.start(
        tmp_path, bootstrap=broker, sources={"orders": walsaga_db}, relay={"compat": "debezium"}
    )
    with relay:
        relay.wait_streaming("orders")
        written = write(walsaga_db, aggregatetype, 6)
        records = consume(broker, [topic], until=lambda r: len(r) >= len(written))
    by_id = {e["id"]: e for e in written}
    assert len(records) == len(written)
    for record in records:
        seen = debezium_consumer(record)
        event = by_id[seen["id"]]
        assert seen == {"id": event["id"], "type": "ThingHappened", "key": event["key"],
                        "payload": event["payload"]}  # fmt: skip
        assert committed_then(record, event)


def test_the_presets_cannot_be_combined(tmp_path: Path) -> None:
    config = relay_toml(
        tmp_path / "relay.toml",
        bootstrap="127.0.0.1:9",
        sources={"x": "dbname=x"},
        relay={"cloudevents": "binary", "compat": "debezium"},
    )
    out = subprocess.run(
        [WALSAGA, "relay", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "choose one of cloudevents and compat" in out.stderr
