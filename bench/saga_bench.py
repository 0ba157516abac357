"""Saga benchmark: sustained sagas per second and saga completion latency.

The whole pipeline on this machine: one durable Postgres cluster holding the
order service's and the customer service's databases, the embedded broker,
`walsaga relay` (both sources), the customer service (`walsaga participant`
with its declared SQL handlers) and the order service (`walsaga order-service`,
orchestration variant). Each saga is the example's create-order saga: reserve
the customer's credit, confirm it, approve the order (two commands, two
replies, four events through the relay).

Load: orders created one per transaction by generator processes at a fixed
rate. Phases: a ramp of offered rates to find the highest rate sustained,
then a latency phase at a steady 500 sagas/s. For each, the rate at which sagas completed
(steady window, warm-up excluded), completion latency from the order's
commit to its approval (p50, p99) and, beside them, the relay's own event
rate over the same window.

    .venv/bin/python bench/saga_bench.py [--ramp 100 200 ...] [--steady 500] [--seconds 15]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg

from participants.examples import customers, orders
from participants.examples.embedded import EmbeddedBroker, LocalPostgres, free_port, wait_for_port

WALSAGA = str(Path(sys.executable).parent / "walsaga")


def metric_total(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}_total{{[^}}]*}} (\S+)$", text, re.M))


def generate(dsn: str, rate: float, seconds: float, threads: int, customers_n: int) -> int:
    """Create orders at `rate`/s for `seconds`, one transaction each; returns how many.

    Runs in processes of its own (a client is not part of the system measured,
    and its threads should not share an interpreter lock with this script)."""
    procs = max(1, min(4, int(rate // 400) + 1))
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--generate",
                dsn,
                str(rate / procs),
                str(seconds),
                str(max(1, threads // procs)),
                str(customers_n),
                str(k),
            ],
            stdout=subprocess.PIPE,
        )
        for k in range(procs)
    ]
    return sum(int(c.communicate()[0] or 0) for c in children)


def generator_process(
    dsn: str, rate: float, seconds: float, threads: int, customers_n: int, seed: int
) -> int:
    orchestrator = orders.orchestrator()
    created = [0] * threads
    start = time.monotonic() + 0.5
    per_thread = rate / threads

    def worker(k: int) -> None:
        with psycopg.connect(dsn) as conn:
            n = 0
            while True:
                due = start + n / per_thread
                now = time.monotonic()
                if due - start >= seconds:
                    break
                if due > now:
                    time.sleep(due - now)
                customer = f"c{(seed * 104729 + k * 7919 + n) % customers_n}"
                orders.create_order(
                    conn, customer, 10, mode="orchestration", orchestrator=orchestrator
                )
                conn.commit()
                n += 1
            created[k] = n

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(created)


def percentile(sorted_values: list[float], q: int) -> float:
    if len(sorted_values) < 100:
        return float("nan")
    return statistics.quantiles(sorted_values, n=100)[q - 1]


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children so far (Postgres: every backend)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(proc.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


WATCHED: dict[str, int] = {}


def hops(orders_dsn: str, customers_dsn: str, since: object, sample: int = 300) -> list[float]:
    """Median milliseconds of each hop of the saga: command to reservation, reservation
    to its reply handled, confirm command to confirmation, confirmation to completion."""
    with psycopg.connect(orders_dsn) as o, psycopg.connect(customers_dsn) as c:
        ids = [
            r[0]
            for r in o.execute(
                "SELECT id FROM orders WHERE created_at >= %s AND status = 'APPROVED' "
                "ORDER BY random() LIMIT %s",
                (since, sample),
            )
        ]
        logs: dict[str, list[float]] = {}
        for _kind, saga, at in o.execute(
            "SELECT kind, saga_id, extract(epoch FROM at) FROM walsaga.saga_log "
            "WHERE saga_id = ANY(%s) AND kind IN ('STARTED', 'REPLY') ORDER BY seq",
            (ids,),
        ):
            logs.setdefault(saga, []).append(float(at))
        held = {
            r[0]: (float(r[1]), float(r[2]))
            for r in c.execute(
                "SELECT order_id, extract(epoch FROM created_at), extract(epoch FROM updated_at) "
                "FROM credit_reservations WHERE order_id = ANY(%s)",
                (ids,),
            )
        }
    rows = []
    for saga, (started, reply1, reply2) in ((k, v[:3]) for k, v in logs.items() if len(v) >= 3):
        reserved, confirmed = held[saga]
        rows.append((reserved - started, reply1 - reserved, confirmed - reply1, reply2 - confirmed))
    return [statistics.median(h[i] for h in rows) * 1000 for i in range(4)] if rows else []


CUSTOMERS_DSN = ""


def phase(
    label: str, dsn: str, relay_port: int, rate: float, seconds: float, threads: int, n_cust: int
) -> dict[str, float]:
    cpu0 = {name: cpu_seconds(pid) for name, pid in WATCHED.items()}
    wall0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        mark = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    events_before = metric_total(relay_port, "walsaga_relay_events_published")
    t0 = time.monotonic()
    offered = generate(dsn, rate, seconds, threads, n_cust)
    gen_s = time.monotonic() - t0
    # Let the tail drain, bounded.
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pending = conn.execute(
                "SELECT count(*) FROM orders WHERE created_at >= %s AND status = 'PENDING'", (mark,)
            ).fetchone()[0]  # type: ignore[index]
            if not pending:
                break
            time.sleep(0.5)
        events = metric_total(relay_port, "walsaga_relay_events_published") - events_before
        rows = conn.execute(
            """
            SELECT extract(epoch FROM created_at), extract(epoch FROM updated_at), status
            FROM orders WHERE created_at >= %s
            """,
            (mark,),
        ).fetchall()
    created = [float(r[0]) for r in rows]
    done = [(float(r[0]), float(r[1])) for r in rows if r[2] != "PENDING"]
    begin = min(created)
    # Steady window: skip the first quarter of the offered period (warm-up).
    w0, w1 = begin + seconds * 0.25, begin + seconds
    in_window = [d for c, d in done if w0 <= d < w1]
    latencies = sorted((d - c) * 1000 for c, d in done if c >= w0)
    last = max(d for _, d in done)
    wall = time.monotonic() - wall0
    cpu = {name: (cpu_seconds(pid) - cpu0[name]) / wall for name, pid in WATCHED.items()}
    print(f"  {label}: cores busy by process: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    legs = hops(dsn, CUSTOMERS_DSN, mark)
    if legs:
        print(
            f"  {label}: median ms per hop (command -> reservation -> reply -> confirmation "
            f"-> reply): " + " / ".join(f"{h:.1f}" for h in legs)
        )
    return {
        "offered_per_s": offered / gen_s,
        "completed": len(done),
        "created": len(rows),
        "sustained_per_s": len(in_window) / (w1 - w0),
        "overall_per_s": len(done) / (last - begin),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "relay_events_per_s": events / (last - begin),
        "label": label,  # type: ignore[dict-item]
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--generate":
        dsn, rate, seconds, threads, n, seed = sys.argv[2:8]
        print(generator_process(dsn, float(rate), float(seconds), int(threads), int(n), int(seed)))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--ramp",
        type=float,
        nargs="+",
        default=[100, 200, 300, 400, 600, 800, 1200, 2000],
        help="sagas/s offered in turn until the system stops keeping up",
    )
    ap.add_argument("--steady", type=float, default=500, help="sagas/s offered, phase 2")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--threads", type=int, default=6, help="generator connections")
    ap.add_argument("--customers", type=int, default=200)
    ap.add_argument("--workers", type=int, default=4, help="consumer threads per service")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="walsaga-bench-saga-"))
    base.chmod(0o755)
    cluster = LocalPostgres(base / "pg", durable=True, settings={"max_connections": "300"})
    broker = EmbeddedBroker()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cluster.start()
        broker.start()
        orders_dsn = cluster.create_database("orders")
        customers_dsn = cluster.create_database("customers")
        global CUSTOMERS_DSN
        CUSTOMERS_DSN = customers_dsn
        with psycopg.connect(orders_dsn) as conn:
            orders.install(conn)
        with psycopg.connect(customers_dsn) as conn:
            customers.install(conn, {f"c{i}": 1e9 for i in range(args.customers)})
        relay_port, order_port = free_port(), free_port()
        (base / "relay.toml").write_text(
            f'[kafka]\n"bootstrap.servers" = "{broker.bootstrap_servers}"\n'
            f'[relay]\nhttp_port = {relay_port}\nhttp_host = "127.0.0.1"\nlog_level = "warning"\n'
            f'[[source]]\nname = "orders"\ndsn = "{orders_dsn}"\n'
            f'[[source]]\nname = "customers"\ndsn = "{customers_dsn}"\n'
        )
        env = {
            **os.environ,
            "WALSAGA_PARTICIPANT__DSN": customers_dsn,
            "WALSAGA_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "WALSAGA_PARTICIPANT__LOG_LEVEL": "warning",
            "WALSAGA_PARTICIPANT__WORKERS": str(args.workers),
        }
        log = (base / "services.log").open("ab")
        procs.append(
            subprocess.Popen(
                [WALSAGA, "relay", "--config", str(base / "relay.toml")], stdout=log, stderr=log
            )
        )
        procs.append(
            subprocess.Popen(
                [WALSAGA, "participant", "--config", str(customers.HANDLERS)],
                env=env,
                stdout=log,
                stderr=log,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    WALSAGA,
                    "order-service",
                    "--dsn",
                    orders_dsn,
                    "--bootstrap-servers",
                    broker.bootstrap_servers,
                    "--mode",
                    "orchestration",
                    "--port",
                    str(order_port),
                    "--workers",
                    str(args.workers),
                    "--log-level",
                    "warning",
                ],
                stdout=log,
                stderr=log,
            )
        )
        pg_pid = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
        WATCHED.update(
            {
                "postgres": pg_pid,
                "broker": broker.pid,
                "relay": procs[0].pid,
                "customer-service": procs[1].pid,
                "order-service": procs[2].pid,
                "generator": os.getpid(),
            }
        )  # the generator: its children included
        wait_for_port(relay_port, timeout_s=60)
        wait_for_port(order_port, timeout_s=60)
        print("warming up (consumer groups joining) ...")
        warm = phase("warm-up", orders_dsn, relay_port, 50, 6, 2, args.customers)
        assert warm["completed"] == warm["created"], "warm-up sagas did not all complete"

        # Throughput: a ramp of offered rates, each held for --seconds; the
        # sustained rate is the highest one the system kept up with (every saga
        # done, completions within 90% of the offer). Past it, backlog grows
        # until commands time out and are resent, which only adds load.
        results = []
        best = 0.0
        for rate in args.ramp:
            print(f"throughput ramp: offering {rate:.0f} sagas/s for {args.seconds:.0f} s ...")
            r = phase(
                f"ramp {rate:.0f}/s",
                orders_dsn,
                relay_port,
                rate,
                args.seconds,
                args.threads,
                args.customers,
            )
            results.append(r)
            kept_up = (
                r["created"] == r["completed"] and r["sustained_per_s"] >= 0.9 * r["offered_per_s"]
            )
            if not kept_up:
                break
            best = max(best, r["sustained_per_s"])
        print(f"latency phase: {args.steady:.0f} sagas/s for {args.seconds:.0f} s ...")
        results.append(
            phase(
                "latency",
                orders_dsn,
                relay_port,
                args.steady,
                args.seconds,
                max(2, args.threads // 2),
                args.customers,
            )
        )
        print()
        print(
            f"{'':28}{'offered/s':>11}{'done/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'relay ev/s':>12}{'unfinished':>12}"
        )
        for r in results:
            print(
                f"{r['label']:28}{r['offered_per_s']:11.0f}{r['sustained_per_s']:9.0f}"
                f"{r['p50_ms']:9.1f}{r['p99_ms']:9.1f}{r['relay_events_per_s']:12.0f}"
                f"{r['created'] - r['completed']:12.0f}"
            )
        print()
        print(f"highest rate sustained (all done, >= 90% of the offer): {best:.0f} sagas/s")
        print("targets: >= 2000 sagas/s sustained; p99 < 150 ms at 500 sagas/s")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
        cluster.stop(mode="immediate")
        if not os.environ.get("WALSAGA_BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
