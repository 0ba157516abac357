"""Relay benchmark: throughput against pg_recvlogical, latency, memory.

In one run, on its own Postgres cluster (durable, default settings) and the
embedded broker:

1. throughput: N outbox events are written while two slots wait at the same
   position; pg_recvlogical (same plugin, same options) decodes one slot to a
   file, the relay publishes the other to Kafka with every guarantee on. Both
   are clocked from the moment their slot turns active until they are past the
   end position: pg_recvlogical exits there; the relay's slot is confirmed
   there, which it does only once Kafka acknowledged every event (read from
   Postgres, so that watching does not load the relay).
2. latency: pgbench writes events at a steady rate while the relay runs
   (single-event transactions unless --events-per-txn says otherwise); the
   relay's own commit-to-ack percentiles are read from its /healthz after the
   run, with its CPU per event over the phase and its walsender's (at a
   steady rate the relay wakes for nearly every event: compare with the
   throughput phase's). The commit time is wal2json's, taken before the
   commit's WAL flush, so the figures include the flush (fsync is on).
3. memory: the relay's peak RSS (VmHWM) over the phases above, and then over
   one transaction of --big-txn events (0 skips it).

    .venv/bin/python bench/relay_bench.py [--events 200000] [--rate 5000] [--seconds 20] [--presets]

With ``--presets``, the same WAL is relayed again with each interoperability
preset (``cloudevents = "binary"``, ``compat = "debezium"``), each on a slot of
its own, and their throughput and CPU per event are printed beside the
default's. CPU per event is the relay process's user plus system time over the
throughput phase, divided by the events.
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
import tomllib
import urllib.request
from pathlib import Path

import psycopg

from participants.examples.embedded import EmbeddedBroker, LocalPostgres, free_port, postgres_bindir
from relay.wal2json import PLUGIN_OPTIONS
from walsaga import schema
from walsaga.config import write_toml

#: Relay runs over the same WAL besides the default: the interoperability presets.
PRESETS = {"cloudevents": {"cloudevents": "binary"}, "debezium": {"compat": "debezium"}}


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


def relay_config(
    path: Path, dsn: str, slot: str, bootstrap: str, http_port: int, **relay: object
) -> None:
    write_toml(
        path,
        {
            "kafka": {"bootstrap.servers": bootstrap},
            "relay": {
                "http_port": http_port,
                "http_host": "127.0.0.1",
                "log_level": "warning",
                **relay,
            },
            "source": [{"name": "bench", "dsn": dsn, "slot": slot}],
        },
    )


def relay_setting(text: str) -> tuple[str, object]:
    """KEY=VALUE of --relay-setting; the value read as TOML (numbers, booleans), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def confirmed_past(conn: psycopg.Connection, slot: str, lsn: str) -> bool:
    row = conn.execute(
        "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
        (lsn, slot),
    ).fetchone()
    return bool(row and row[0])


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
    ap.add_argument("--clients", type=int, default=4, help="pgbench clients in the latency phase")
    ap.add_argument("--events-per-txn", type=int, default=1, help="in the latency phase")
    ap.add_argument("--big-txn", type=int, default=1_000_000, help="events in one transaction")
    ap.add_argument(
        "--relay-setting",
        type=relay_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [relay] setting for every relay run, e.g. feedback_interval_s=0.1 (repeatable)",
    )
    ap.add_argument(
        "--presets",
        action="store_true",
        help="also relay the same WAL with each interoperability preset (cloudevents, debezium)",
    )
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
        presets = list(PRESETS) if args.presets else []
        for slot in ("bench_relay", "bench_recv", *(f"bench_{p}" for p in presets)):
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
        settings = dict(args.relay_setting)
        relay_config(config, dsn, "bench_relay", broker.bootstrap_servers, http_port, **settings)
        relay = start_relay(config)
        t_active = slot_active_at(admin, "bench_relay")
        cpu_start = cpu_seconds(relay.pid)
        while not confirmed_past(admin, "bench_relay", end_lsn):
            time.sleep(0.002)
        relay_s = time.monotonic() - t_active
        relay_cpu_us = (cpu_seconds(relay.pid) - cpu_start) / args.events * 1e6
        relay_rate = args.events / relay_s
        published = metric(http_port, "walsaga_relay_events_published")
        assert published == args.events, f"the relay published {published} events"

        # The presets, each a relay of its own over the same WAL, one after the other.
        preset_figures = {}
        for name in presets:
            port = free_port()
            path = base / f"relay-{name}.toml"
            relay_config(path, dsn, f"bench_{name}", broker.bootstrap_servers, port,
                         **settings, **PRESETS[name])  # fmt: skip
            other = start_relay(path)
            try:
                active = slot_active_at(admin, f"bench_{name}")
                cpu_at = cpu_seconds(other.pid)
                while not confirmed_past(admin, f"bench_{name}", end_lsn):
                    time.sleep(0.002)
                took = time.monotonic() - active
                preset_figures[name] = (
                    args.events / took,
                    (cpu_seconds(other.pid) - cpu_at) / args.events * 1e6,
                )
            finally:
                other.terminate()
                other.wait(30)

        # Latency at a steady rate through pgbench, measured by a relay started
        # afresh on the same slot: its percentiles know nothing of phase 1.
        rss_phase1 = peak_rss_mb(relay.pid)
        relay.terminate()
        relay.wait(30)
        relay = start_relay(config)
        slot_active_at(admin, "bench_relay")
        deadline = time.monotonic() + 30
        while health(http_port)["sources"]["bench"]["state"] != "streaming":
            if time.monotonic() > deadline:
                raise TimeoutError("the relay did not stream again")
            time.sleep(0.05)
        script = base / "publish.sql"
        publish = (
            "SELECT walsaga.publish('latency', (random() * 1000)::int::text, 'Measured', "
            "'{\"amount\": 12.5}');\n"
        )
        per_txn = args.events_per_txn
        script.write_text(publish if per_txn == 1 else "BEGIN;\n" + publish * per_txn + "COMMIT;\n")
        before = metric(http_port, "walsaga_relay_events_published")
        latency_cpu_at = cpu_seconds(relay.pid)
        walsender = admin.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'bench_relay'"
        ).fetchone()[0]  # type: ignore[index]
        walsender_cpu_at = cpu_seconds(walsender)
        out = subprocess.run(
            [str(postgres_bindir() / "pgbench"), "-n", "-c", str(args.clients), "-j", "2",
             "-R", str(args.rate / per_txn), "-T", str(args.seconds), "-f", str(script), dsn],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        committed = re.search(r"actually processed: (\d+)", out)
        assert committed, out
        expected = before + int(committed.group(1)) * per_txn
        deadline = time.monotonic() + 30
        while metric(http_port, "walsaga_relay_events_published") < expected:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        time.sleep(0.5)
        latency_events = metric(http_port, "walsaga_relay_events_published") - before
        per_event = 1e6 / max(latency_events, 1)
        latency_cpu_us = (cpu_seconds(relay.pid) - latency_cpu_at) * per_event
        walsender_cpu_us = (cpu_seconds(walsender) - walsender_cpu_at) * per_event
        lat = health(http_port)["sources"]["bench"]["commit_to_ack_ms"]
        rss = max(rss_phase1, peak_rss_mb(relay.pid))

        # One huge transaction: what the relay holds while publishing it.
        big_rss = big_s = float("nan")
        if args.big_txn:
            before = metric(http_port, "walsaga_relay_events_published")
            with psycopg.connect(dsn) as conn:
                conn.execute(
                    """
                    INSERT INTO walsaga.outbox (aggregatetype, aggregateid, type, payload)
                    SELECT 'bulk', (i %% 1000)::text, 'Bulk',
                           jsonb_build_object('n', i, 'pad', repeat('p', 100))
                    FROM generate_series(1, %s) AS i
                    """,
                    (args.big_txn,),
                )
            committed = time.monotonic()
            deadline = committed + 600
            while metric(http_port, "walsaga_relay_events_published") < before + args.big_txn:
                if time.monotonic() > deadline:
                    raise TimeoutError("the big transaction was not published in 10 minutes")
                time.sleep(0.2)
            big_s = time.monotonic() - committed
            big_rss = peak_rss_mb(relay.pid)

        generator = f"pgbench, {args.clients} clients, " + (
            "single-event transactions" if per_txn == 1 else f"{per_txn} events per transaction"
        )
        print()
        print(f"{'':38}{'figure':>14}{'target':>14}")
        print(f"{'pg_recvlogical to file (events/s)':38}{recv_rate:14,.0f}")
        print(f"{'relay to Kafka, acked (events/s)':38}{relay_rate:14,.0f}")
        print(f"{'relay / pg_recvlogical':38}{relay_rate / recv_rate:14.2f}{'>= 0.90':>14}")
        print(f"{'relay CPU per event (us)':38}{relay_cpu_us:14.2f}{'<= 5':>14}")
        for name, (rate, cpu_us) in preset_figures.items():
            print(f"{'  with ' + name + ' (events/s)':38}{rate:14,.0f}")
            print(f"{'  with ' + name + ' CPU per event (us)':38}{cpu_us:14.2f}")
        print(f"latency phase: {args.rate:,} events/s asked of {generator}")
        print(f"{'  events/s published':38}{latency_events / args.seconds:14,.0f}")
        print(f"{'  commit-to-ack p50 (ms)':38}{lat['p50']:14.2f}{'<= 5':>14}")
        print(f"{'  commit-to-ack p99 (ms)':38}{lat['p99']:14.2f}{'<= 20':>14}")
        print(f"{'  relay CPU per event (us)':38}{latency_cpu_us:14.2f}")
        print(f"{'  its walsender CPU per event (us)':38}{walsender_cpu_us:14.2f}")
        print(f"{'relay peak RSS, phases 1-2 (MB)':38}{rss:14.1f}{'< 200':>14}")
        if args.big_txn:
            label = f"relay peak RSS, {args.big_txn:,}-event txn (MB)"
            print(f"{label:38}{big_rss:14.1f}{'< 200':>14}")
            print(f"{'  published in (s)':38}{big_s:14.1f}")
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
