"""What a consumer's ``fetch.wait.max.ms`` costs a hop, and what it costs idle.

A participant's consumer asks the broker for records with a fetch that the
broker may hold up to ``fetch.wait.max.ms`` while none are there. Apache
Kafka answers a held fetch as soon as records arrive. The embedded broker
(Tansu) does not: it reads the partitions again after half the time left,
then after half of what is left then, and so on (10, 15, 17.5, ... ms of a
20 ms wait), so a record waits about a sixth of the wait on average and at
most half of it. Each of those reads costs the broker CPU whether or not
anything arrived.

For each value given, this produces records one at a time at random gaps
(as saga steps arrive) to a topic with the participants' partition count and
measures, with the participants' other consumer settings:

- acknowledged by the broker → received by the consumer (p50, mean, p99);
- CPU with no record under way for --idle-seconds: the broker's (the
  embedded one only: an external broker's process is not on this machine)
  and the consumer process's own.

    .venv/bin/python bench/fetch_wait.py [--waits 5 10 20 40] [--records 200]
    .venv/bin/python bench/fetch_wait.py --bootstrap-servers kafka:9092
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent))

import relay_bench  # cpu_seconds

from participants.examples.embedded import EmbeddedBroker
from participants.kafka import CONSUMER_DEFAULTS
from relay.config import PRODUCER_DEFAULTS

PARTITIONS = 4  # what a participant creates its topics with (topic_partitions)


def measure(
    servers: str, broker_pid: int | None, wait_ms: int, records: int, idle_s: float
) -> dict[str, float | None]:
    topic = f"fetch-wait-{wait_ms}-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": servers})
    admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS)])[topic].result()
    consumer = Consumer({**CONSUMER_DEFAULTS, "bootstrap.servers": servers, "group.id": topic,
                         "fetch.wait.max.ms": wait_ms, "enable.auto.commit": False})  # fmt: skip
    producer = Producer({**PRODUCER_DEFAULTS, "bootstrap.servers": servers, "linger.ms": 0})
    try:
        consumer.subscribe([topic])
        while not consumer.assignment():
            consumer.poll(0.1)
        time.sleep(1.0)  # the group settles
        # Idle: nothing produced; the consumer polls as a participant's does.
        broker_before = relay_bench.cpu_seconds(broker_pid) if broker_pid else 0.0
        own_before, started = relay_bench.cpu_seconds(os.getpid()), time.monotonic()
        while time.monotonic() - started < idle_s:
            consumer.poll(0.5)
        elapsed = time.monotonic() - started
        broker_idle = None
        if broker_pid:
            broker_idle = (relay_bench.cpu_seconds(broker_pid) - broker_before) / elapsed * 100
        own_idle = (relay_bench.cpu_seconds(os.getpid()) - own_before) / elapsed * 100

        acked: dict[bytes, float] = {}
        delays: list[float] = []

        def receive() -> None:
            while len(delays) < records:
                msg = consumer.poll(0.5)
                if msg is None or msg.error():
                    continue
                received = time.monotonic()
                key = msg.value()
                while key not in acked:  # the callback runs in flush(), just after
                    time.sleep(0.0001)
                delays.append((received - acked[key]) * 1000)

        def on_delivery(err: object, msg: Any) -> None:
            acked[msg.value()] = time.monotonic()

        reader = threading.Thread(target=receive)
        reader.start()
        for i in range(records):
            time.sleep(random.uniform(0.02, 0.06))
            producer.produce(topic, str(i).encode(), partition=i % PARTITIONS,
                             on_delivery=on_delivery)  # fmt: skip
            producer.flush()
        reader.join()
    finally:
        consumer.close()
    q = statistics.quantiles(delays, n=100)
    return {"p50": q[49], "mean": statistics.mean(delays), "p99": q[98],
            "broker_idle": broker_idle, "consumer_idle": own_idle}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--waits", type=int, nargs="+", default=[5, 10, 20, 40],
                    help="fetch.wait.max.ms values to measure, in turn")  # fmt: skip
    ap.add_argument("--records", type=int, default=200, help="records per value")
    ap.add_argument("--idle-seconds", type=float, default=5)
    ap.add_argument("--bootstrap-servers", help="an external broker (default: the embedded one)")
    args = ap.parse_args()
    default = CONSUMER_DEFAULTS["fetch.wait.max.ms"]
    with ExitStack() as stack:
        if args.bootstrap_servers:
            servers, pid, where = args.bootstrap_servers, None, args.bootstrap_servers
        else:
            broker = stack.enter_context(EmbeddedBroker())
            servers, pid, where = broker.bootstrap_servers, broker.pid, "the embedded broker"
        print(f"{where}: {args.records} records per value, one at a time, "
              f"{PARTITIONS} partitions; the participants' default is {default}")  # fmt: skip
        print(f"{'fetch.wait.max.ms':>17}  {'ack→receive p50':>15}  {'mean':>6}  {'p99':>6}"
              f"  {'wait/6':>6}  {'broker idle':>11}  {'consumer idle':>13}")  # fmt: skip
        for wait_ms in args.waits:
            r = measure(servers, pid, wait_ms, args.records, args.idle_seconds)
            broker_idle = "n/a" if r["broker_idle"] is None else f"{r['broker_idle']:.1f}%"
            mark = " (default)" if wait_ms == default else ""
            print(f"{wait_ms:>17}  {r['p50']:>12.2f} ms  {r['mean']:>6.2f}  {r['p99']:>6.2f}"
                  f"  {wait_ms / 6:>6.2f}  {broker_idle:>11}  {r['consumer_idle']:>12.1f}%"
                  f"{mark}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
