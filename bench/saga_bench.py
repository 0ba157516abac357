"""Saga benchmark: one hop's latency budget, saga latency, sustained sagas per second,
CPU per saga by process, and what happens past capacity.

The whole pipeline on this machine: one durable Postgres cluster holding the
order service's and the customer service's databases, the embedded broker,
`walsaga relay` (both sources), the customer service (`walsaga participant`
with its declared SQL handlers) and the order service (`walsaga order-service`,
orchestration variant). Each saga is the example's create-order saga: reserve
the customer's credit, confirm it, approve the order (two commands, two
replies, four events through the relay).

Orders come in through the order service's own HTTP API (`POST /orders`), at a
fixed rate, from a small asyncio client in a process of its own (keep-alive
connections, each sending at its turn): generating them costs the machine
little, and that cost is reported apart from the system's.

Phases:

1. the hop budget: sagas one at a time on an idle system; each process's
   stages from its /healthz (the relay: commit to sent by the walsender, sent
   to read, read to acknowledged; each participant: commit to received,
   received to its transaction's commit), beside the hop times read from the
   databases; then each process's CPU and wake-ups with no saga under way
   (--idle-seconds), the part of CPU per saga that shrinks as the rate grows;
2. saga latency at a steady --latency-rate;
3. a ramp of offered rates, up to the highest the system sustains (every saga
   done, completions within 10% of the offer), with CPU and wake-ups per saga
   by process (a wake-up is a voluntary context switch of any thread: at saga
   rates each costs a process about as much as the work it wakes for,
   ``bench/wake_floor.py``);
4. overload at twice that rate: the order service turns orders away past its
   backlog bound (503 with Retry-After), the sagas it admitted finish, and no
   command is resent into the backlog.

    .venv/bin/python bench/saga_bench.py [--ramp 100 200 ...] [--seconds 15] [--latency-rate 100]

The embedded broker does not answer a waiting fetch when a record arrives
(Apache Kafka does): it reads again after half the time left of the
consumers' ``fetch.wait.max.ms`` (20 by default), then half of the rest, so a
record waits about a sixth of that on average (``bench/fetch_wait.py``).
``--consumer-kafka fetch.wait.max.ms=5`` shows the hop without most of that
wait, at the idle CPU of four times as many fetches.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg

from participants.examples import customers, orders
from participants.examples.embedded import EmbeddedBroker, LocalPostgres, free_port, wait_for_port
from walsaga.config import write_toml

WALSAGA = str(Path(sys.executable).parent / "walsaga")


def generator_process(port: int, rate: float, seconds: float, connections: int) -> None:
    """POST orders at `rate` per second for `seconds` over keep-alive connections, each
    sending at its turn (a small asyncio client: little CPU per request); prints
    how many were sent and how many were refused."""
    import asyncio

    async def run() -> tuple[int, int]:
        sent = refused = 0
        start = time.monotonic() + 0.2

        async def connection(k: int) -> None:
            nonlocal sent, refused
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # Arrivals at random (a Poisson process of the asked rate), not on a
            # grid: a grid locks into step with the clients' periodic work (a
            # consumer's fetch cycle) and measures one phase of it.
            due = start + random.expovariate(rate / connections)
            while True:
                if due - start >= seconds:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                body = b'{"customer_id": "c%d", "total": 10}' % random.randrange(200)
                writer.write(
                    b"POST /orders HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                sent += 1
                refused += 0 if status.startswith(b"HTTP/1.1 2") else 1
                due += random.expovariate(rate / connections)
            writer.close()

        await asyncio.gather(*(connection(k) for k in range(connections)))
        return sent, refused

    sent, refused = asyncio.run(run())
    print(sent, refused)


def usage(pid: int) -> tuple[float, int]:
    """CPU time and wake-ups of a process and its children so far (Postgres:
    every backend). A wake-up is a voluntary context switch of any of their
    threads: each time one slept (on a socket, a lock, a timer) and ran again."""
    cpu = 0.0
    wakeups = 0
    tick = os.sysconf("SC_CLK_TCK")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(proc.name) != pid and int(fields[1]) != pid:
                continue
            cpu += (int(fields[11]) + int(fields[12])) / tick
            for task in (proc / "task").iterdir():
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        wakeups += int(line.split()[1])
        except OSError:
            continue
    return cpu, wakeups


def _has_option(command: str, option: str) -> bool:
    """Whether this walsaga's `command` knows `option` (the benchmark also runs older ones)."""
    out = subprocess.run([WALSAGA, command, "--help"], capture_output=True, text=True, check=False)
    return option in out.stdout


def get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class System:
    """The processes under measurement and how to reach them."""

    def __init__(self, base: Path, args: argparse.Namespace) -> None:
        self.base = base
        self.args = args
        self.cluster = LocalPostgres(base / "pg", durable=True, settings={"max_connections": "300"})
        self.broker = EmbeddedBroker()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {"relay": free_port(), "order-service": free_port(),
                      "customer-service": free_port()}  # fmt: skip
        self.orders_dsn = self.customers_dsn = ""

    def start(self) -> None:
        self.cluster.start()
        self.broker.start()
        self.orders_dsn = self.cluster.create_database("orders")
        self.customers_dsn = self.cluster.create_database("customers")
        with psycopg.connect(self.orders_dsn) as conn:
            orders.install(conn)
        with psycopg.connect(self.customers_dsn) as conn:
            customers.install(conn, {f"c{i}": 1e9 for i in range(self.args.customers)})
        bootstrap = self.broker.bootstrap_servers
        write_toml(
            self.base / "relay.toml",
            {
                "kafka": {"bootstrap.servers": bootstrap, **dict(self.args.relay_kafka)},
                "relay": {
                    "http_port": self.ports["relay"],
                    "http_host": "127.0.0.1",
                    "log_level": "warning",
                },
                "source": [
                    {"name": "orders", "dsn": self.orders_dsn},
                    {"name": "customers", "dsn": self.customers_dsn},
                ],
            },
        )
        log = (self.base / "services.log").open("ab")
        env = {
            **os.environ,
            "WALSAGA_PARTICIPANT__DSN": self.customers_dsn,
            "WALSAGA_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "WALSAGA_PARTICIPANT__LOG_LEVEL": "warning",
            "WALSAGA_PARTICIPANT__WORKERS": str(self.args.workers),
            "WALSAGA_PARTICIPANT__HTTP_PORT": str(self.ports["customer-service"]),
            "WALSAGA_PARTICIPANT__HTTP_HOST": "127.0.0.1",
        }
        commands = {
            "relay": [WALSAGA, "relay", "--config", str(self.base / "relay.toml")],
            "customer-service": [WALSAGA, "participant", "--config", str(customers.HANDLERS)],
            "order-service": [
                WALSAGA, "order-service", "--dsn", self.orders_dsn,
                "--bootstrap-servers", bootstrap, "--mode", "orchestration",
                "--port", str(self.ports["order-service"]),
                "--workers", str(self.args.workers), "--log-level", "warning",
                *(["--max-backlog", str(self.args.max_backlog)] if _has_option(
                    "order-service", "--max-backlog") else []),
            ],
        }  # fmt: skip
        # The services' consumers take --consumer-kafka (WALSAGA_KAFKA__* maps
        # "fetch.wait.max.ms" from FETCH_WAIT_MAX_MS); the relay has its own file.
        consumer_env = {
            "WALSAGA_KAFKA__" + key.upper().replace(".", "_"): value
            for key, value in self.args.consumer_kafka
        }
        for name, command in commands.items():
            own = env if name == "relay" else {**env, **consumer_env}
            self.procs[name] = subprocess.Popen(command, env=own, stdout=log, stderr=log)
        for port in self.ports.values():
            wait_for_port(port, timeout_s=90)

    def pids(self) -> dict[str, int]:
        pg = int((self.cluster.datadir / "postmaster.pid").read_text().split()[0])
        return {"postgres": pg, "broker": self.broker.pid,
                **{name: p.pid for name, p in self.procs.items()}}  # fmt: skip

    def stages(self) -> dict[str, Any]:
        relay = get_json(self.ports["relay"], "/healthz")["sources"]
        return {
            "command": (relay["orders"]["stages_ms"],
                        get_json(self.ports["customer-service"], "/healthz")["stages_ms"]),
            "reply": (relay["customers"]["stages_ms"],
                      get_json(self.ports["order-service"], "/healthz")["stages_ms"]),
        }  # fmt: skip

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.broker.stop()
        self.cluster.stop(mode="immediate")


def place_one(port: int, customer: str) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/orders?wait=30",
        data=json.dumps({"customer_id": customer, "total": 10}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=40) as resp:
        answer = json.loads(resp.read())
    assert answer["status"] == "APPROVED", answer
    return str(answer["id"])


def generate(system: System, rate: float, seconds: float) -> dict[str, float]:
    """POST orders at `rate` for `seconds` from a process of its own; what it saw."""
    connections = max(4, min(100, int(rate / 20)))
    out = subprocess.run(
        [sys.executable, __file__, "--generate", str(system.ports["order-service"]), str(rate),
         str(seconds), str(connections)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    sent, refused = (int(x) for x in out.split())
    return {"sent": sent, "refused": refused}


def hop_times(system: System, since: Any) -> list[float]:
    """Median ms of each hop (command → reservation → reply → confirmation → reply)."""
    with psycopg.connect(system.orders_dsn) as o, psycopg.connect(system.customers_dsn) as c:
        logs: dict[str, list[float]] = {}
        for saga, at in o.execute(
            "SELECT saga_id, extract(epoch FROM at) FROM walsaga.saga_log "
            "WHERE at >= %s AND kind IN ('STARTED', 'REPLY') ORDER BY seq",
            (since,),
        ):
            logs.setdefault(saga, []).append(float(at))
        held = {
            r[0]: (float(r[1]), float(r[2]))
            for r in c.execute(
                "SELECT order_id, extract(epoch FROM created_at), extract(epoch FROM updated_at) "
                "FROM credit_reservations WHERE order_id = ANY(%s)",
                (list(logs),),
            )
        }
    rows = []
    for saga, times in logs.items():
        if len(times) >= 3 and saga in held:
            started, reply1, reply2 = times[:3]
            reserved, confirmed = held[saga]
            rows.append((reserved - started, reply1 - reserved, confirmed - reply1,
                         reply2 - confirmed))  # fmt: skip
    return [statistics.median(h[i] for h in rows) * 1000 for i in range(4)] if rows else []


def settle(system: System, since: Any, timeout_s: float = 180) -> None:
    with psycopg.connect(system.orders_dsn, autocommit=True) as conn:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM orders WHERE created_at >= %s AND status = 'PENDING'",
                (since,),
            ).fetchone()
            if row and not row[0]:
                return
            time.sleep(0.5)


def phase(system: System, label: str, rate: float, seconds: float) -> dict[str, Any]:
    pids = system.pids()
    usage0 = {name: usage(pid) for name, pid in pids.items()}
    # The generator is the only child that ends during the phase: what it used
    # shows in this process's children's usage once it has been waited for.
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with psycopg.connect(system.orders_dsn, autocommit=True) as conn:
        since = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    wall0 = time.monotonic()
    seen = generate(system, rate, seconds)
    settle(system, since)
    wall = time.monotonic() - wall0
    usage1 = {name: usage(pid) for name, pid in pids.items()}
    cpu = {name: usage1[name][0] - usage0[name][0] for name in pids}
    wakeups = {name: usage1[name][1] - usage0[name][1] for name in pids}
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    generator_cpu = (children1.ru_utime + children1.ru_stime) - (
        children0.ru_utime + children0.ru_stime
    )
    with psycopg.connect(system.orders_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM created_at), extract(epoch FROM updated_at), status "
            "FROM orders WHERE created_at >= %s",
            (since,),
        ).fetchall()
        resent = conn.execute(
            "SELECT count(*) FROM walsaga.saga_log WHERE at >= %s AND kind = 'RETRY'", (since,)
        ).fetchone()[0]  # type: ignore[index]
    created = [float(r[0]) for r in rows]
    done = [(float(r[0]), float(r[1])) for r in rows if r[2] != "PENDING"]
    begin = min(created) if created else 0.0
    w0, w1 = begin + seconds * 0.25, begin + seconds  # skip the warm-up quarter
    completed_in_window = [d for _, d in done if w0 <= d < w1]
    latencies = [(d - c) * 1000 for c, d in done if c >= w0]
    result = {
        "label": label,
        "offered_per_s": seen["sent"] / seconds,
        "refused": seen["refused"],
        "created": len(rows),
        "completed": len(done),
        "sustained_per_s": len(completed_in_window) / max(0.001, w1 - w0),
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "resent": resent,
        "cores": {name: c / wall for name, c in cpu.items()},
        "cpu_ms_per_saga": {name: c / max(1, len(done)) * 1000 for name, c in cpu.items()},
        "generator_cpu_ms_per_saga": generator_cpu / max(1, len(done)) * 1000,
        "wakeups_per_saga": {name: w / max(1, len(done)) for name, w in wakeups.items()},
    }
    system_ms = sum(result["cpu_ms_per_saga"].values())
    print(f"  {label}: {len(done)} sagas, CPU per saga by process (ms): "
          + ", ".join(f"{k} {v:.2f}" for k, v in result["cpu_ms_per_saga"].items())
          + f"; system {system_ms:.2f}")  # fmt: skip
    print("    wake-ups per saga by process: "
          + ", ".join(f"{k} {v:.1f}" for k, v in result["wakeups_per_saga"].items())
          + f"; system {sum(result['wakeups_per_saga'].values()):.1f}")  # fmt: skip
    return result


def idle(system: System, seconds: float) -> dict[str, float]:
    """Each process's CPU with no saga under way, in % of a core: what every
    rate pays before its sagas (polling consumers, timers, the broker)."""
    pids = system.pids()
    usage0 = {name: usage(pid) for name, pid in pids.items()}
    wall0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - wall0
    usage1 = {name: usage(pid) for name, pid in pids.items()}
    cores = {name: (usage1[name][0] - usage0[name][0]) / wall * 100 for name in pids}
    wakeups = {name: (usage1[name][1] - usage0[name][1]) / wall for name in pids}
    print("idle, % of a core by process: "
          + ", ".join(f"{k} {v:.1f}" for k, v in cores.items())
          + f"; system {sum(cores.values()):.1f}")  # fmt: skip
    print("idle, wake-ups per second by process: "
          + ", ".join(f"{k} {v:.0f}" for k, v in wakeups.items())
          + f"; system {sum(wakeups.values()):.0f}")  # fmt: skip
    return cores


def budget(system: System, count: int) -> None:
    """Sagas one at a time on an idle system: where one hop's time goes."""
    with psycopg.connect(system.orders_dsn, autocommit=True) as conn:
        since = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    for n in range(count):
        place_one(system.ports["order-service"], f"c{n % system.args.customers}")
        time.sleep(random.uniform(0.04, 0.08))  # not a fixed period: see generator_process
    hops = hop_times(system, since)
    try:
        stages = system.stages()
    except KeyError:  # a walsaga that does not report its stages
        print("hops measured in the databases (command -> reservation -> reply -> confirmation "
              "-> reply): " + " / ".join(f"{h:.1f}" for h in hops) + " ms")  # fmt: skip
        return
    rows = [
        ("commit -> sent by the walsender", "relay", "commit_to_sent"),
        ("sent -> read by the relay", "relay", "sent_to_read"),
        ("read -> acknowledged by the broker", "relay", "read_to_ack"),
        ("acknowledged -> received", None, None),
        ("received -> handler committed", "participant", "receive_to_commit"),
    ]
    print(f"\none hop, idle ({count} sagas one at a time): p50 ms by stage")
    print(f"{'stage':40}{'command hop':>14}{'reply hop':>14}")
    for label, side, key in rows:
        cells = []
        for hop in ("command", "reply"):
            relay, participant = stages[hop]
            if side == "relay":
                value = relay[key]["p50"]
            elif side == "participant":
                value = participant[key]["p50"]
            else:  # what neither end measures: the broker's fetch and the consumer
                value = participant["commit_to_receive"]["p50"] - relay["commit_to_ack"]["p50"]
            cells.append(value)
        print(f"{label:40}{cells[0]:14.2f}{cells[1]:14.2f}")
    totals = [stages[h][1]["commit_to_receive"]["p50"] + stages[h][1]["receive_to_commit"]["p50"]
              for h in ("command", "reply")]  # fmt: skip
    print(f"{'one hop, commit -> next commit':40}{totals[0]:14.2f}{totals[1]:14.2f}")
    if hops:
        print("hops measured in the databases (command -> reservation -> reply -> confirmation "
              "-> reply): " + " / ".join(f"{h:.1f}" for h in hops) + " ms")  # fmt: skip


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--generate":
        port, rate, seconds, connections = sys.argv[2:6]
        generator_process(int(port), float(rate), float(seconds), int(connections))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ramp", type=float, nargs="+",
                    default=[100, 200, 300, 400, 500, 600, 800, 1000],
                    help="sagas/s offered in turn until the system stops keeping up")  # fmt: skip
    ap.add_argument("--latency-rate", type=float, default=100, help="sagas/s, latency phase")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--customers", type=int, default=200)
    ap.add_argument("--workers", type=int, default=4, help="consumer threads per service")
    ap.add_argument("--max-backlog", type=int, default=1000, help="the order service's bound")
    ap.add_argument("--budget-sagas", type=int, default=150)
    ap.add_argument("--idle-seconds", type=float, default=10, help="length of the idle phase")
    ap.add_argument("--no-overload", action="store_true")
    ap.add_argument("--relay-kafka", type=_setting, action="append", default=[],
                    metavar="KEY=VALUE",
                    help="a librdkafka setting of the relay's producer (linger.ms=5)")  # fmt: skip
    ap.add_argument("--consumer-kafka", type=_setting, action="append", default=[],
                    metavar="KEY=VALUE",
                    help="a librdkafka setting of the services' consumers "
                         "(fetch.wait.max.ms=5)")  # fmt: skip
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="walsaga-bench-saga-"))
    base.chmod(0o755)
    system = System(base, args)
    try:
        system.start()
        print("warming up (consumer groups joining) ...")
        for n in range(10):
            place_one(system.ports["order-service"], f"c{n}")
        budget(system, args.budget_sagas)
        idle(system, args.idle_seconds)

        print(f"\nlatency phase: {args.latency_rate:.0f} sagas/s for {args.seconds:.0f} s ...")
        latency = phase(system, f"latency {args.latency_rate:.0f}/s", args.latency_rate,
                        args.seconds)  # fmt: skip

        results, best, best_result = [], 0.0, None
        for rate in args.ramp:
            print(f"throughput ramp: offering {rate:.0f} sagas/s for {args.seconds:.0f} s ...")
            r = phase(system, f"ramp {rate:.0f}/s", rate, args.seconds)
            results.append(r)
            kept_up = (r["created"] == r["completed"] and not r["refused"]
                       and r["sustained_per_s"] >= 0.9 * r["offered_per_s"])  # fmt: skip
            if not kept_up:
                break
            if r["sustained_per_s"] > best:
                best, best_result = r["sustained_per_s"], r
        overload = None
        if not args.no_overload and best:
            print(f"overload: offering {2 * best:.0f} sagas/s (twice the sustained rate) ...")
            overload = phase(system, f"overload {2 * best:.0f}/s", 2 * best, args.seconds)

        print()
        print(f"{'':24}{'offered/s':>10}{'done/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'refused':>9}"
              f"{'resent':>8}{'unfinished':>11}")  # fmt: skip
        for r in [latency, *results, *([overload] if overload else [])]:
            print(f"{r['label']:24}{r['offered_per_s']:10.0f}{r['sustained_per_s']:8.0f}"
                  f"{r['p50_ms']:9.1f}{r['p99_ms']:9.1f}{r['refused']:9d}{r['resent']:8d}"
                  f"{r['created'] - r['completed']:11d}")  # fmt: skip
        print()
        print(f"highest rate sustained (all done, none refused, >= 90% of the offer): "
              f"{best:.0f} sagas/s")  # fmt: skip
        if best_result is not None:
            per = best_result["cpu_ms_per_saga"]
            generator_ms = best_result["generator_cpu_ms_per_saga"]
            print("CPU per saga at that rate (ms): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
                  + f"; the system's processes {sum(per.values()):.2f}; the load generator "
                  f"{generator_ms:.2f}")  # fmt: skip
            wakes = best_result["wakeups_per_saga"]
            print("wake-ups per saga at that rate: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in wakes.items())
                  + f"; the system's processes {sum(wakes.values()):.1f}")  # fmt: skip
        print(
            "targets: one hop idle p50 <= 4 ms; at 100/s p50 <= 20 ms, p99 <= 60 ms; "
            ">= 600 sagas/s sustained; <= 1.5 ms CPU per saga"
        )
    finally:
        system.stop()
        if not os.environ.get("WALSAGA_BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
