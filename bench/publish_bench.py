"""walsaga.publish: what one call costs the server, beside the same INSERT written out.

Every command a saga sends and every event a service writes through the API
is one call of ``walsaga.publish``. This measures, on one durable local
cluster and one session per variant, the backend's CPU time (read from
/proc) and the client's wall time per call:

1. ``walsaga.publish`` as installed (the schema's current version);
2. the SQL-language function of core schema version 4, created beside it
   from that migration's own text as the baseline: a SQL function whose body
   writes is parsed and planned again on every call;
3. the INSERT it performs, written out by the client (the floor).

The variants take turns, round after round, each call with the arguments a
saga's command carries, ten calls per transaction.

    .venv/bin/python bench/publish_bench.py [--calls 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parent))

import relay_bench  # cpu_seconds

from participants.examples.embedded import LocalPostgres
from walsaga import schema


def sql_language_publish() -> str:
    """Core schema version 4's walsaga.publish, as its migration creates it, renamed."""
    v4 = next(m for m in schema.migrations("core") if m.version == 4).sql
    found = re.search(r"CREATE OR REPLACE FUNCTION walsaga\.publish\(.*?\$\$;", v4, re.S)
    if found is None or "LANGUAGE sql" not in found.group(0):
        raise SystemExit("core migration 4 no longer holds the SQL-language walsaga.publish")
    return found.group(0).replace("walsaga.publish(", "walsaga_bench.publish_v4(", 1)


VARIANTS = {
    "walsaga.publish (this release)": "SELECT walsaga.publish(%s, %s, %s, %s, %s)",
    "SQL-language publish (schema v4)": "SELECT walsaga_bench.publish_v4(%s, %s, %s, %s, %s)",
    "the INSERT written out (floor)": (
        "INSERT INTO walsaga.outbox (aggregatetype, aggregateid, type, payload, headers) "
        "VALUES (%s, %s, %s, coalesce(%s, '{}'::jsonb), "
        "walsaga.trace_headers() || coalesce(%s, '{}'::jsonb)) RETURNING id"
    ),
}

PER_TRANSACTION = 10


def run(conn: psycopg.Connection[Any], query: str, calls: int, pid: int) -> tuple[float, float]:
    """(server CPU, client wall) per call, in microseconds."""
    args = [
        (
            "customer",
            f"c{i % 200}",
            "ReserveCredit",
            Jsonb({"order_id": f"o-{i}", "customer_id": f"c{i % 200}", "total": 42.5}),
            Jsonb({"saga_id": f"o-{i}", "idempotency_key": f"o-{i}:reserve:1"}),
        )
        for i in range(calls)
    ]
    cpu = relay_bench.cpu_seconds(pid)
    started = time.perf_counter()
    for i, params in enumerate(args):
        conn.execute(query, params).fetchone()
        if i % PER_TRANSACTION == PER_TRANSACTION - 1:
            conn.commit()
    conn.commit()
    wall = time.perf_counter() - started
    return (relay_bench.cpu_seconds(pid) - cpu) / calls * 1e6, wall / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="walsaga-publish-bench-"))
    base.chmod(0o755)  # the cluster runs as another user when started as root
    cluster = LocalPostgres(base / "pg", durable=True)
    cluster.start()
    try:
        dsn = cluster.create_database("bench")
        with psycopg.connect(dsn) as conn:
            schema.apply(conn, "core")
            conn.execute("CREATE SCHEMA walsaga_bench")
            conn.execute(sql_language_publish())
        sessions = {name: psycopg.connect(dsn) for name in VARIANTS}
        pids = {name: conn.info.backend_pid for name, conn in sessions.items()}
        for name, conn in sessions.items():  # warm up: prepared, plans cached
            run(conn, VARIANTS[name], 200, pids[name])
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            for name, conn in sessions.items():
                server, wall = run(conn, VARIANTS[name], args.calls, pids[name])
                results[name].append((server, wall))
                print(f"round {r} {name:34s} server CPU {server:6.1f} µs   wall {wall:6.1f} µs")
            with sessions[next(iter(sessions))].cursor() as cur:
                cur.execute("TRUNCATE walsaga.outbox")
                cur.connection.commit()
        for conn in sessions.values():
            conn.close()
    finally:
        cluster.stop()

    print(f"\nper call, medians of {args.rounds} rounds of {args.calls:,} calls")
    print(f"{'':34s} {'server CPU':>12s} {'wall':>10s}")
    for name, figures in results.items():
        server = statistics.median(f[0] for f in figures)
        wall = statistics.median(f[1] for f in figures)
        print(f"{name:34s} {server:9.1f} µs {wall:7.1f} µs")


if __name__ == "__main__":
    main()
