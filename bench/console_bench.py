"""Console benchmark: how fast the saga list answers with 100,000 sagas in the tracker's database.

One durable Postgres cluster holds a tracker database filled with `--sagas`
sagas of two types over the last week (mostly COMPLETED, some COMPENSATED,
RUNNING, stuck and FAILED; `--events` timeline rows each), analysed as
autovacuum would. `walsaga console` serves it; each page is fetched
`--requests` times over one keep-alive connection after a warm-up, and the
time to the whole answer is reported (p50, p95, max) against the target:
the saga list in under 200 ms.

    .venv/bin/python bench/console_bench.py [--sagas 100000] [--events 4] [--requests 40]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

from participants.examples.embedded import LocalPostgres
from walsaga import schema
from walsaga.config import write_toml

WALSAGA = str(Path(sys.executable).parent / "walsaga")
TARGET_MS = 200.0

FILL = """
INSERT INTO walsaga.tracked_saga (id, saga_type, orchestrator, status, reason, started_at,
                                  last_event_at, ended_at, deadline_s, deadline, events, last_type)
SELECT 'saga-' || n,
       CASE WHEN mod(n, 3) = 0 THEN 'trip' ELSE 'create-order' END,
       CASE WHEN mod(n, 2) = 0 THEN 'orders' END,
       s.status,
       CASE WHEN s.status IN ('COMPENSATED', 'FAILED') THEN 'credit limit exceeded' END,
       t.started, t.started + interval '1 second',
       CASE WHEN s.status IN ('RUNNING') THEN NULL ELSE t.started + interval '1 second' END,
       600, t.started + interval '10 minutes', %(events)s,
       CASE WHEN s.status = 'COMPLETED' THEN 'OrderApproved' ELSE 'OrderCreated' END
FROM generate_series(1, %(sagas)s) AS n
CROSS JOIN LATERAL (SELECT now() - (n::float / %(sagas)s) * interval '7 days' AS started) t
CROSS JOIN LATERAL (SELECT CASE
    WHEN mod(n, 1000) < 5 THEN 'FAILED'      -- 0.5 per cent
    WHEN mod(n, 1000) < 15 THEN 'RUNNING'    -- 1 per cent (older than their deadline: stuck)
    WHEN mod(n, 1000) < 115 THEN 'COMPENSATED'
    ELSE 'COMPLETED' END AS status) s
"""

EVENTS = """
INSERT INTO walsaga.saga_event (saga_id, event_id, at, type, kind, source, topic, partition,
                                "offset", key, lsn, step, headers, payload)
SELECT s.id, s.id || '/' || k, s.started_at + k * interval '100 ms', 'Event' || k,
       CASE WHEN mod(k, 2) = 1 THEN 'command' ELSE 'event' END,
       CASE WHEN mod(k, 2) = 1 THEN 'orders' ELSE 'customers' END, 'customer', 0, k, s.id,
       '0/16B3748', 'reserve-credit',
       jsonb_build_object('saga_id', s.id, 'type', 'Event' || k),
       jsonb_build_object('order_id', s.id, 'total', 10)
FROM walsaga.tracked_saga s CROSS JOIN generate_series(1, %(events)s) AS k
"""

PAGES = {
    "saga list (stuck and failed first)": "/sagas",
    "saga list, FAILED": "/sagas?status=failed",
    "saga list, stuck": "/sagas?status=stuck",
    "saga list, completed": "/sagas?status=completed",
    "saga list, one type, last hour": "/sagas?type=trip&since=1h",
    "one saga's page": "/sagas/saga-4242",
}


def fill(dsn: str, sagas: int, events: int) -> float:
    started = time.monotonic()
    with psycopg.connect(dsn) as conn:
        schema.apply(conn, "core")
        schema.apply(conn, "tracker")
        conn.execute(FILL, {"sagas": sagas, "events": events})
        if events:
            conn.execute(EVENTS, {"events": events})
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE walsaga.tracked_saga")
        conn.execute("VACUUM ANALYZE walsaga.saga_event")
    return time.monotonic() - started


def measure(client: httpx.Client, path: str, requests: int) -> list[float]:
    for _ in range(3):
        client.get(path).raise_for_status()
    times = []
    for _ in range(requests):
        begin = time.perf_counter()
        response = client.get(path)
        response.raise_for_status()
        times.append((time.perf_counter() - begin) * 1000)
    return sorted(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sagas", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=4, help="timeline rows per saga")
    ap.add_argument("--requests", type=int, default=40)
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="walsaga-bench-console-"))
    base.chmod(0o755)
    cluster = LocalPostgres(base / "pg", durable=True)
    console: subprocess.Popen[str] | None = None
    try:
        cluster.start()
        dsn = cluster.create_database("tracker")
        took = fill(dsn, args.sagas, args.events)
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*) FROM walsaga.tracked_saga").fetchone()
            size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))")
            total, db_size = (row[0] if row else 0), size.fetchone()
        print(f"tracker database: {total:,} sagas, {total * args.events:,} timeline rows, "
              f"{db_size[0] if db_size else '?'} (filled in {took:.1f}s)")  # fmt: skip
        config = write_toml(
            base / "tracker.toml",
            {"tracker": {"dsn": dsn}, "console": {"log_level": "warning"}},
        )
        console = subprocess.Popen(
            [WALSAGA, "console", "--config", str(config), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert console.stdout is not None
        line = console.stdout.readline()
        if not line.startswith("walsaga console: http://"):
            print(f"the console did not start: {line}{console.stdout.read()}")
            return 1
        url = line.split()[2].rstrip("/")
        print(f"console: {url} ({args.requests} requests per page after 3 to warm up)\n")
        print(f"{'page':<38} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
        verdict = True
        with httpx.Client(base_url=url, timeout=30) as client:
            for name, path in PAGES.items():
                times = measure(client, path, args.requests)
                p50 = statistics.median(times)
                p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
                print(f"{name:<38} {p50:8.1f} {p95:8.1f} {times[-1]:8.1f}")
                if path.startswith("/sagas") and "saga-" not in path:
                    verdict = verdict and p95 < TARGET_MS
        print(f"\nsaga list under {TARGET_MS:.0f} ms (p95, every filter): "
              f"{'yes' if verdict else 'NO'}")  # fmt: skip
        return 0 if verdict else 1
    finally:
        if console is not None:
            console.terminate()
            console.wait(10)
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
