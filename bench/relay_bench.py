"""Relay benchmark: throughput against pg_recvlogical, latency, memory.

In one run, on its own Postgres cluster (durable, default settings) and the
embedded broker:

1. throughput: N outbox events are written while two slots wait at the same
   position; pg_recvlogical (same plugin, same options) decodes one slot to a
   file, the relay publishes the other to Kafka with every guarantee on. Both
   are clocked from the moment their slot turns active to the last record
   (pg_recvlogical: reaching the end position; relay: the last Kafka ack).
2. latency: pgbench writes single-event transactions at a steady rate while
   the relay runs; the relay's own commit-to-ack percentiles are read from
   its /healthz after the run.
3. memory: the relay's peak RSS (VmHWM) over both phases.

    .venv/bin/python bench/relay_bench.py [--events 200000] [--rate 5000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg

from participants.embedded import EmbeddedBroker, LocalPostgres, free_port, postgres_bindir
from relay import schema
from relay.wal2json import PLUGIN_OPTIONS


def slot_active_at(conn: psycopg.Connection, slot: str, timeout_s: float = 60) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        if row and row[0]:
            return time.monotonic()
        time.sleep(0.001)
    raise TimeoutError(f"slot {slot} never became active")


def generate(dsn: str, events: int, txn_size: int) -> str:
    """Write `events` outbox rows in transactions of `txn_size`; return the end LSN."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""
            DO $$
            BEGIN
              FOR t IN 0 .. {events // txn_size - 1} LOOP
                INSERT INTO walsaga.outbox (aggregatetype, aggregateid, type, payload, headers)
                SELECT 'bench', ((t * {txn_size} + i) % 1000)::text, 'Benchmarked',
                       jsonb_build_object('n', t * {txn_size} + i, 'amount', 12.5,
                                          'customer', 'c-' || (i % 97)),
                       '{{"saga_id": "s"}}'
                FROM generate_series(1, {txn_size}) AS i;
                COMMIT;
              END LOOP;
            END $$
            """
        )
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row
        return str(row[0])


def relay_config(path: Path, dsn: str, slot: str, bootstrap: str, http_port: int) -> None:
    path.write_text(
        f"""
[kafka]
"bootstrap.servers" = "{bootstrap}"

[relay]
http_port = {http_port}
http_host = "127.0.0.1"
log_level = "warning"

[[source]]
name = "bench"
dsn = "{dsn}"
slot = "{slot}"
"""
    )


def start_relay(config: Path) -> subprocess.Popen[bytes]:
    walsaga = Path(sys.executable).parent / "walsaga"
    return subprocess.Popen([str(walsaga), "relay", "--config", str(config)])


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    m = re.search(rf'^{name}_total{{source="bench"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
        return json.loads(resp.read())


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--txn-size", type=int, default=10)
    ap.add_argument("--rate", type=int, default=5000, help="events/s in the latency phase")
    ap.add_argument("--seconds", type=int, default=20, help="length of the latency phase")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="walsaga-bench-relay-"))
    base.chmod(0o755)
    cluster = LocalPostgres(base / "pg", durable=True)
    broker = EmbeddedBroker()
    relay = None
    try:
        cluster.start()
        broker.start()
        dsn = cluster.create_database("bench")
        with psycopg.connect(dsn) as conn:
            schema.apply(conn, "core")
        admin = psycopg.connect(dsn, autocommit=True)
        for slot in ("bench_relay", "bench_recv"):
            admin.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))

        print(f"writing {args.events} outbox events in transactions of {args.txn_size} ...")
        end_lsn = generate(dsn, args.events, args.txn_size)

        # pg_recvlogical: same plugin options, to a file, until the end position.
        out = base / "recvlogical.json"
        cmd = [str(postgres_bindir() / "pg_recvlogical"), "-d", dsn, "--slot", "bench_recv",
               "--start", "--endpos", end_lsn, "-f", str(out), "--no-loop"]  # fmt: skip
        for k, v in PLUGIN_OPTIONS.items():
            cmd += ["-o", f"{k}={v}"]
        proc = subprocess.Popen(cmd)
        t_active = slot_active_at(admin, "bench_recv")
        proc.wait()
        recv_s = time.monotonic() - t_active
        lines = sum(1 for _ in out.open("rb"))
        recv_rate = lines / recv_s

        # The relay, on the other slot.
        http_port = free_port()
        config = base / "relay.toml"
        relay_config(config, dsn, "bench_relay", broker.bootstrap_servers, http_port)
        relay = start_relay(config)
        t_active = slot_active_at(admin, "bench_relay")
        while metric(http_port, "walsaga_relay_events_published") < args.events:
            time.sleep(0.002)
        relay_s = time.monotonic() - t_active
        relay_rate = args.events / relay_s

        # Latency at a steady rate, single-event transactions, through pgbench.
        script = base / "publish.sql"
        script.write_text(
            "SELECT walsaga.publish('latency', (random() * 1000)::int::text, 'Measured', "
            "'{\"amount\": 12.5}');\n"
        )
        before = metric(http_port, "walsaga_relay_events_published")
        subprocess.run(
            [str(postgres_bindir() / "pgbench"), "-n", "-c", "4", "-j", "2",
             "-R", str(args.rate), "-T", str(args.seconds), "-f", str(script), dsn],
            check=True, capture_output=True,
        )  # fmt: skip
        expected = before + args.rate * args.seconds * 0.95
        deadline = time.monotonic() + 30
        while metric(http_port, "walsaga_relay_events_published") < expected:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        time.sleep(0.5)
        published = metric(http_port, "walsaga_relay_events_published") - before
        lat = health(http_port)["sources"]["bench"]["commit_to_ack_ms"]
        rss = peak_rss_mb(relay.pid)

        print()
        print(f"{'':38}{'figure':>14}{'target':>14}")
        print(f"{'pg_recvlogical to file (events/s)':38}{recv_rate:14,.0f}")
        print(f"{'relay to Kafka, acked (events/s)':38}{relay_rate:14,.0f}")
        print(f"{'relay / pg_recvlogical':38}{relay_rate / recv_rate:14.2f}{'>= 0.90':>14}")
        print(f"{'latency phase: events published':38}{published:14,.0f}")
        print(f"{'commit-to-ack p50 (ms)':38}{lat['p50']:14.2f}{'<= 5':>14}")
        print(f"{'commit-to-ack p99 (ms)':38}{lat['p99']:14.2f}{'<= 20':>14}")
        print(f"{'relay peak RSS (MB)':38}{rss:14.1f}{'< 200':>14}")
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(30)
        broker.stop()
        cluster.stop(mode="immediate")
        if not os.environ.get("WALSAGA_BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
