"""Tracker benchmark: does `walsaga tracker` keep up with the saga benchmark's event rate?

The saga benchmark (bench/saga_bench.py) sustains 292 create-order sagas/s
on this machine, four records each (ReserveCredit, CreditReserved,
ConfirmCredit, CreditConfirmed): about 1,170 records/s. Here those records
are produced straight to Kafka, with the headers the relay and the
orchestrator give them (id, type, source, lsn, saga_id, saga_type,
saga_step, idempotency_key, causation_id), and the orchestrator's database
holds a COMPLETED row for each saga, which the tracker mirrors too.

- backlog: `--backlog` sagas' records wait in Kafka before the tracker
  starts; the rate at which it records them is its ceiling;
- steady: records are produced at `--rate` records/s for `--seconds`
  while the tracker runs; reported are the delay from each record's
  timestamp to its timeline row (p50, p99, from the tracker's histogram)
  and how long the tracker needs to finish after the load stops.

    .venv/bin/python bench/tracker_bench.py [--backlog 20000] [--rate 1170] [--seconds 20]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from participants.examples.embedded import EmbeddedBroker, LocalPostgres, free_port
from walsaga import schema
from walsaga.config import write_toml

WALSAGA = str(Path(sys.executable).parent / "walsaga")
SAGA_BENCH_RECORDS_PER_S = 292 * 4
COMMANDS, REPLIES = "customer-commands", "customer"


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def recorded(port: int) -> float:
    found = re.search(r'^walsaga_tracker_records_total\{outcome="recorded"\} (\S+)$',
                      metrics(port), re.M)  # fmt: skip
    return float(found.group(1)) if found else 0.0


def delay_quantiles(text: str, *qs: float) -> list[float]:
    """Quantiles of the record delay histogram (the upper bound of the bucket holding each)."""
    buckets = [
        (float("inf") if le == "+Inf" else float(le), float(n))
        for le, n in re.findall(
            r'^walsaga_tracker_record_delay_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M
        )
    ]
    total = buckets[-1][1] if buckets else 0.0
    return [next((le for le, n in buckets if n >= q * total), float("inf")) for q in qs]


def saga_records(saga_id: str) -> list[tuple[str, str, dict[str, str]]]:
    """(topic, type, headers) of one create-order saga's four records."""
    base = {"saga_id": saga_id, "saga_type": "create-order", "aggregatetype": COMMANDS,
            "aggregateid": "c1", "xid": "1234"}  # fmt: skip
    found = []
    cause = None
    for step, command, reply in (
        ("reserve-credit", "ReserveCredit", "CreditReserved"),
        ("confirm-credit", "ConfirmCredit", "CreditConfirmed"),
    ):
        command_id = str(uuid.uuid4())
        headers = {**base, "id": command_id, "type": command, "source": "orders",
                   "lsn": "0/16B3748", "saga_step": step,
                   "idempotency_key": f"{saga_id}/{step}/do"}  # fmt: skip
        if cause:
            headers["causation_id"] = cause
        found.append((COMMANDS, command, headers))
        cause = str(uuid.uuid4())
        reply_headers = {**base, "id": cause, "type": reply, "source": "customers",
                         "lsn": "0/16B3800", "causation_id": command_id}  # fmt: skip
        found.append((REPLIES, reply, reply_headers))
    return found


def produce(producer: Producer, saga_ids: list[str], *, rate: float | None = None) -> None:
    started = time.monotonic()
    sent = 0
    for saga_id in saga_ids:
        for topic, _, headers in saga_records(saga_id):
            value = b'{"order_id": "%s", "customer_id": "c1", "total": 10}' % saga_id.encode()
            while True:
                try:
                    producer.produce(topic, value, b"c1", headers=list(headers.items()))
                    break
                except BufferError:
                    producer.poll(0.01)
            sent += 1
            producer.poll(0)
            if rate is not None:
                ahead = started + sent / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
    producer.flush(60)


def completed_rows(dsn: str, saga_ids: list[str]) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            """
            INSERT INTO walsaga.saga (id, definition, version, status, step, completed, data,
                                      ended_at)
            SELECT id, 'create-order', 1, 'COMPLETED', 4, 4, '{}'::jsonb, now()
            FROM unnest(%s::text[]) AS id
            """,
            (saga_ids,),
        )


def wait_recorded(port: int, count: float, timeout_s: float) -> float:
    """Seconds until the tracker has recorded `count` records."""
    started = time.monotonic()
    while recorded(port) < count:
        if time.monotonic() - started > timeout_s:
            raise SystemExit(f"the tracker recorded {recorded(port):.0f} of {count:.0f}")
        time.sleep(0.05)
    return time.monotonic() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backlog", type=int, default=20_000, help="sagas waiting in Kafka")
    ap.add_argument("--rate", type=float, default=SAGA_BENCH_RECORDS_PER_S, help="records/s")
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="walsaga-bench-tracker-"))
    base.chmod(0o755)
    cluster = LocalPostgres(base / "pg", durable=True)
    broker = EmbeddedBroker()
    tracker: subprocess.Popen[bytes] | None = None
    clients: list[object] = []  # dropped before the broker stops, so they say nothing
    try:
        cluster.start()
        broker.start()
        tracker_dsn = cluster.create_database("tracker")
        orders_dsn = cluster.create_database("orders")
        with psycopg.connect(orders_dsn) as conn:
            schema.apply(conn, "core")
            schema.apply(conn, "saga")
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        for future in admin.create_topics(
            [NewTopic(t, num_partitions=4) for t in (COMMANDS, REPLIES)]
        ).values():
            future.result(30)
        clients += [admin, Producer({"bootstrap.servers": broker.bootstrap_servers})]
        del admin
        producer = clients[-1]

        backlog = [f"backlog-{i}" for i in range(args.backlog)]
        completed_rows(orders_dsn, backlog)
        produce(producer, backlog)
        port = free_port()
        config = write_toml(base / "tracker.toml", {
            "tracker": {"dsn": tracker_dsn, "topics": [COMMANDS, REPLIES], "http_port": port,
                        "http_host": "127.0.0.1", "log_level": "warning"},
            "kafka": {"bootstrap.servers": broker.bootstrap_servers},
            "saga": [{"type": "create-order", "deadline_s": 60}],
            "orchestrator": [{"name": "orders", "dsn": orders_dsn}],
        })  # fmt: skip
        log = (base / "tracker.log").open("ab")
        tracker = subprocess.Popen([WALSAGA, "tracker", "--config", str(config)],
                                   stdout=log, stderr=log)  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                if recorded(port) > 0:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or tracker.poll() is not None:
                print((base / "tracker.log").read_text()[-3000:])
                return 1
            time.sleep(0.02)
        first = recorded(port)
        took = wait_recorded(port, args.backlog * 4, timeout_s=600)
        ceiling = (args.backlog * 4 - first) / took
        print(f"backlog: {args.backlog * 4:,} records of {args.backlog:,} sagas recorded at "
              f"{ceiling:,.0f} records/s ({ceiling / 4:,.0f} sagas/s)")  # fmt: skip

        steady = [f"steady-{i}" for i in range(int(args.rate * args.seconds / 4))]
        completed_rows(orders_dsn, steady)
        before = metrics(port)
        thread = threading.Thread(
            target=produce, args=(producer, steady), kwargs={"rate": args.rate}
        )
        began = time.monotonic()
        thread.start()
        thread.join()
        offered = len(steady) * 4 / (time.monotonic() - began)
        drain = wait_recorded(port, (args.backlog + len(steady)) * 4, timeout_s=600)
        after = metrics(port)
        p50, p99 = delay_quantiles(_minus(after, before), 0.5, 0.99)
        print(f"steady: {len(steady) * 4:,} records offered at {offered:,.0f} records/s for "
              f"{args.seconds:.0f}s; record delay p50 <= {p50 * 1000:.0f} ms, "
              f"p99 <= {p99 * 1000:.0f} ms; done {drain:.2f}s after the load stopped")  # fmt: skip
        with psycopg.connect(tracker_dsn) as conn:
            row = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = 'COMPLETED') "
                "FROM walsaga.tracked_saga"
            ).fetchone()
        assert row is not None
        print(
            f"tracker database: {row[0]:,} sagas, {row[1]:,} COMPLETED (mirrored from the "
            "orchestrator)"
        )
        keeps_up = ceiling >= SAGA_BENCH_RECORDS_PER_S and drain < 2.0
        print(
            f"keeps up with the saga benchmark ({SAGA_BENCH_RECORDS_PER_S:,} records/s): "
            f"{'yes' if keeps_up else 'NO'} ({ceiling / SAGA_BENCH_RECORDS_PER_S:.1f}x)"
        )
        return 0 if keeps_up else 1
    finally:
        if tracker is not None:
            tracker.terminate()
            tracker.wait(15)
        clients.clear()
        broker.stop()
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def _minus(after: str, before: str) -> str:
    """The delay histogram's buckets of `after` less those of `before` (as metrics text)."""
    pattern = r'^walsaga_tracker_record_delay_seconds_bucket\{le="([^"]+)"\} (\S+)$'
    earlier = dict(re.findall(pattern, before, re.M))
    return "\n".join(
        f'walsaga_tracker_record_delay_seconds_bucket{{le="{le}"}} '
        f"{float(n) - float(earlier.get(le, 0))}"
        for le, n in re.findall(pattern, after, re.M)
    )


if __name__ == "__main__":
    raise SystemExit(main())
