"""The relay's floor: what the steps every event needs cost on their own.

Any relay that keeps the contract parses each wal2json message and produces
one Kafka record with seven headers (id, type, aggregatetype, aggregateid,
source, lsn, xid) whose acknowledgement it must see. This measures those
steps alone, with no Postgres and none of the relay's bookkeeping, against
the embedded broker, as process CPU (the librdkafka threads included) per
event, so that the relay's own figure (``relay_bench.py``, ``relay_ab.py``)
can be read against it:

1. ``orjson.loads`` of an outbox insert as wal2json (format 2) sends it;
2. ``produce()`` of a record and its acknowledgement, with the relay's
   producer settings: bare, with the seven headers, and with the headers,
   a delivery callback and a timestamp, as the relay produces.

    .venv/bin/python bench/relay_floor.py [--events 200000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from participants.examples.embedded import EmbeddedBroker
from relay.config import PRODUCER_DEFAULTS

TOPIC = "relay-floor"
EVENT_ID = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
PAYLOAD = '{"id": 12345, "total": 42.50, "status": "PENDING", "customer_id": 77}'
MESSAGE = orjson.dumps(
    {
        "action": "I",
        "xid": 123456,
        "lsn": "0/1A2B3C4D",
        "nextlsn": "0/1A2B3D00",
        "timestamp": "2026-12-01 00:10:11.123456+00",
        "schema": "walsaga",
        "table": "outbox",
        "columns": [
            {"name": "id", "type": "uuid", "value": EVENT_ID},
            {"name": "aggregatetype", "type": "text", "value": "order"},
            {"name": "aggregateid", "type": "text", "value": "12345"},
            {"name": "type", "type": "text", "value": "OrderCreated"},
            {"name": "payload", "type": "jsonb", "value": PAYLOAD},
            {"name": "headers", "type": "jsonb", "value": "{}"},
            {
                "name": "created_at",
                "type": "timestamp with time zone",
                "value": "2026-12-01 00:10:11.123456+00",
            },
        ],
    }
)


def cpu_us_per_event(events: int, work: Callable[[], None]) -> float:
    started = time.process_time()
    work()
    return (time.process_time() - started) / events * 1e6


def produce_all(
    bootstrap: str, events: int, *, headers: bool, callback: bool
) -> Callable[[], None]:
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS})
    producer.produce(TOPIC, b"warm-up")
    producer.flush(30)
    value = PAYLOAD.encode()
    acknowledged = 0

    def ack(err: Any, msg: Any) -> None:
        nonlocal acknowledged
        acknowledged += 1

    def work() -> None:
        for i in range(events):
            record_headers = (
                {
                    "id": EVENT_ID,
                    "type": "OrderCreated",
                    "aggregatetype": "order",
                    "aggregateid": "12345",
                    "source": "orders",
                    "lsn": "0/1A2B3C4D",
                    "xid": "123456",
                }
                if headers
                else None
            )
            while True:
                try:
                    if callback:
                        producer.produce(TOPIC, value, "12345", headers=record_headers,
                                         on_delivery=ack, timestamp=1764547811123)  # fmt: skip
                    else:
                        producer.produce(TOPIC, value, "12345", headers=record_headers)
                    break
                except BufferError:
                    producer.poll(0.001)
            if i % 1000 == 0:
                producer.poll(0)
        if producer.flush(120):
            raise RuntimeError("the broker did not acknowledge every record")
        if callback and acknowledged != events:
            raise RuntimeError(f"{acknowledged} of {events} acknowledgements seen")

    return work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    args = ap.parse_args()
    events = args.events

    def parse_all() -> None:
        loads = orjson.loads
        for _ in range(events):
            loads(MESSAGE)  # and dropped, as the relay drops it once produced

    parse = cpu_us_per_event(events, parse_all)

    broker = EmbeddedBroker().start()
    try:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        admin.create_topics([NewTopic(TOPIC, 1, 1)])[TOPIC].result(30)
        rows = [("orjson.loads of a wal2json message", parse)]
        for label, headers, callback in (
            ("produce + acknowledgement, bare", False, False),
            ("  with the seven headers", True, False),
            ("  with headers, delivery callback, timestamp", True, True),
        ):
            work = produce_all(broker.bootstrap_servers, events, headers=headers, callback=callback)
            rows.append((label, cpu_us_per_event(events, work)))
    finally:
        broker.stop()

    print(f"\nCPU per event, {events:,} events (process CPU, librdkafka's threads included)")
    for label, us in rows:
        print(f"{label:<48} {us:6.2f} us")
    floor = rows[0][1] + rows[-1][1]
    print(f"{'floor: parse + produce as the relay does':<48} {floor:6.2f} us   target <= 5 us")


if __name__ == "__main__":
    main()
