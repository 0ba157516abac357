"""``walsaga demo``: the whole system on this machine, a batch of sagas, a summary.

Starts one local Postgres cluster per service (orders, customers, flight,
hotel, car, trip), the embedded Kafka-protocol broker, one relay for all six
databases and every service as a process of its own; then runs orders (some
approved, some refused for credit) and trips (some compensated), prints what
happened, and stops everything — or, with ``--serve``, keeps it running until
Ctrl-C. Data lives in one directory (default ``.walsaga/demo``) that can be
deleted at any time the demo is not running.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from participants.examples import customers, orders, travel
from participants.examples.embedded import EmbeddedBroker, LocalPostgres, free_port
from participants.examples.travel import TripRequest, book_trip, trip_status

SERVICES = ("orders", "customers", "flight", "hotel", "car", "trip")

CREDIT = {"alice": 500.0, "bob": 250.0, "carol": 1000.0, "dave": 120.0, "erin": 800.0}
FLIGHTS = {"LIS-BER": 30, "LIS-NYC": 12, "LIS-TYO": 4}
HOTELS = {"berlin-mitte": 25, "nyc-soho": 6, "tokyo-ginza": 2}
CARS = {"BER-compact": 20, "NYC-suv": 5, "TYO-kei": 2}
ROUTES = [
    ("LIS-BER", "berlin-mitte", "BER-compact"),
    ("LIS-NYC", "nyc-soho", "NYC-suv"),
    ("LIS-TYO", "tokyo-ginza", "TYO-kei"),
]


@dataclass
class DemoOptions:
    directory: Path
    mode: orders.Mode = "orchestration"
    orders: int = 60
    trips: int = 15
    serve: bool = False
    port: int = 8080
    fresh: bool = False


@dataclass
class _Stack:
    """Everything the demo started, for an orderly stop."""

    clusters: dict[str, LocalPostgres] = field(default_factory=dict)
    broker: EmbeddedBroker | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    http_ports: dict[str, int] = field(default_factory=dict)

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.broker is not None:
            self.broker.stop()
        with concurrent.futures.ThreadPoolExecutor(len(self.clusters) or 1) as pool:
            list(pool.map(lambda c: c.stop(), self.clusters.values()))

    def pids(self) -> dict[str, int]:
        found = {name: p.pid for name, p in self.processes.items()}
        if self.broker is not None:
            with contextlib.suppress(AssertionError):
                found["broker"] = self.broker.pid
        for name, cluster in self.clusters.items():
            pidfile = cluster.datadir / "postmaster.pid"
            if pidfile.exists():
                found[f"postgres-{name}"] = int(pidfile.read_text().split()[0])
        return found


class Demo:
    def __init__(self, options: DemoOptions, console: Console | None = None) -> None:
        self.options = options
        self.dir = options.directory.resolve()
        self.console = console or Console()
        self.stack = _Stack()
        self.dsn: dict[str, str] = {}
        self.stopping = threading.Event()

    # -- the whole run -------------------------------------------------------

    def run(self) -> int:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum: int, frame: Any) -> None:
            self.stopping.set()
            raise KeyboardInterrupt

        for s in previous:
            signal.signal(s, on_signal)
        try:
            self.start()
            # What was started, so that anyone can check it is gone afterwards.
            (self.dir / "pids.json").write_text(json.dumps(self.stack.pids()))
            if self.stopping.is_set():
                return 130
            outcome = self.workload()
            self.summary(outcome)
            self.where_to_look()
            if self.options.serve:
                self.console.print("\n[bold]Serving[/bold]: press Ctrl-C to stop everything.")
                while not self.stopping.wait(0.5):
                    self._check_alive()
            return 0 if outcome["failed_sagas"] == 0 else 1
        except KeyboardInterrupt:
            self.console.print("\ninterrupted")
            return 130
        finally:
            with self.console.status("stopping every process ..."):
                self.stack.stop()
            self.console.print(
                f"stopped. Data and logs stay in {self.dir} (delete it with: rm -rf {self.dir})"
            )
            for s, handler in previous.items():
                signal.signal(s, handler)

    # -- starting ------------------------------------------------------------

    def start(self) -> None:
        if self.options.fresh:
            # Only what the demo itself made: --dir may name a folder that
            # holds other things too.
            shutil.rmtree(self.dir / "postgres", ignore_errors=True)
            shutil.rmtree(self.dir / "logs", ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        with self.console.status("starting one Postgres cluster per service ..."):
            clusters = {
                name: LocalPostgres(self.dir / "postgres" / name, durable=False)
                for name in SERVICES
            }
            self.stack.clusters = clusters
            with concurrent.futures.ThreadPoolExecutor(len(clusters)) as pool:
                list(pool.map(lambda c: c.start(), clusters.values()))
            for name, cluster in clusters.items():
                self.dsn[name] = cluster.create_database(name)
        self.console.print(
            f"[green]✓[/green] Postgres: {len(clusters)} clusters "
            f"(ports {', '.join(str(c.port) for c in clusters.values())})"
        )
        with self.console.status("starting the embedded Kafka-protocol broker ..."):
            self.stack.broker = EmbeddedBroker(logfile=self.dir / "logs" / "broker.log").start()
        bootstrap = self.stack.broker.bootstrap_servers
        self.console.print(f"[green]✓[/green] broker: {bootstrap}")
        with self.console.status("deploying schemas and capture specs ..."):
            self._install()
        self.console.print("[green]✓[/green] schemas, capture triggers and demo data deployed")
        with self.console.status("starting the relay and the services ..."):
            self._start_processes(bootstrap)
            self._wait_healthy()
        self.console.print(
            "[green]✓[/green] relay and services up: " + ", ".join(self.stack.processes)
        )

    def _install(self) -> None:
        with psycopg.connect(self.dsn["orders"]) as conn:
            orders.install(conn)
        with psycopg.connect(self.dsn["customers"]) as conn:
            customers.install(conn, CREDIT)
        with psycopg.connect(self.dsn["flight"]) as conn:
            travel.flight.install(conn, FLIGHTS)
        with psycopg.connect(self.dsn["hotel"]) as conn:
            travel.hotel.install(conn, HOTELS)
        with psycopg.connect(self.dsn["car"]) as conn:
            travel.car.install(conn, CARS)
        with psycopg.connect(self.dsn["trip"]) as conn:
            travel.trip.install(conn)

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        walsaga = str(Path(sys.executable).parent / "walsaga")
        log = (self.dir / "logs" / f"{name}.log").open("ab")
        self.stack.processes[name] = subprocess.Popen(
            [walsaga, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # Ctrl-C reaches the demo, which stops them in order
        )
        log.close()

    def _start_processes(self, bootstrap: str) -> None:
        ports = self.stack.http_ports
        ports["relay"] = free_port()
        sources = "".join(
            f'\n[[source]]\nname = "{name}"\ndsn = "{dsn}"\n' for name, dsn in self.dsn.items()
        )
        config = self.dir / "relay.toml"
        config.write_text(
            f'[kafka]\n"bootstrap.servers" = "{bootstrap}"\n\n[relay]\n'
            f'http_host = "127.0.0.1"\nhttp_port = {ports["relay"]}\n{sources}'
        )
        self._spawn("relay", ["relay", "--config", str(config)])
        ports["customer-service"] = free_port()
        self._spawn(
            "customer-service",
            ["participant", "--config", str(customers.HANDLERS)],
            {
                "WALSAGA_PARTICIPANT__DSN": self.dsn["customers"],
                "WALSAGA_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "WALSAGA_PARTICIPANT__HTTP_PORT": str(ports["customer-service"]),
                "WALSAGA_PARTICIPANT__HTTP_HOST": "127.0.0.1",
            },
        )
        ports["order-service"] = self.options.port or free_port()
        self._spawn(
            "order-service",
            [
                "order-service",
                "--dsn",
                self.dsn["orders"],
                "--bootstrap-servers",
                bootstrap,
                "--mode",
                self.options.mode,
                "--port",
                str(ports["order-service"]),
                "--customers-dsn",
                self.dsn["customers"],
            ],
        )
        for service in ("flight", "hotel", "car", "trip"):
            ports[f"{service}-service"] = free_port()
            self._spawn(
                f"{service}-service",
                [
                    "travel-service",
                    "--service",
                    service,
                    "--dsn",
                    self.dsn[service],
                    "--bootstrap-servers",
                    bootstrap,
                    "--http-port",
                    str(ports[f"{service}-service"]),
                ],
            )

    def _wait_healthy(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = dict(self.stack.http_ports)
        while waiting:
            self._check_alive()
            for name, port in list(waiting.items()):
                if _get_json(f"http://127.0.0.1:{port}/healthz") is not None:
                    del waiting[name]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"not healthy after {timeout_s:.0f}s: {', '.join(waiting)} "
                    f"(logs in {self.dir / 'logs'})"
                )
            if self.stopping.wait(0.3):
                raise KeyboardInterrupt

    def _check_alive(self) -> None:
        for name, proc in self.stack.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {proc.returncode}; "
                    f"see {self.dir / 'logs' / (name + '.log')}"
                )

    # -- the workload ----------------------------------------------------------

    def workload(self) -> dict[str, Any]:
        rng = random.Random(2026)
        order_jobs = [
            (rng.choice(list(CREDIT)), rng.choice([40, 60, 90, 120, 180, 260]))
            for _ in range(self.options.orders)
        ]
        start = date.today() + timedelta(days=30)
        trip_jobs = []
        for i in range(self.options.trips):
            flight, hotel, car = ROUTES[i % len(ROUTES)]
            check_in = start + timedelta(days=rng.randrange(3))
            trip_jobs.append(
                TripRequest(
                    f"traveller-{i}",
                    flight,
                    hotel,
                    check_in,
                    check_in + timedelta(days=rng.randint(1, 3)),
                    car,
                    seats=rng.choice([1, 1, 2]),
                    rooms=1,
                )
            )
        results: dict[str, Any] = {"orders": [], "trips": []}
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console) as progress:
            order_task = progress.add_task("orders (credit saga)", total=len(order_jobs))
            trip_task = progress.add_task("trips (flight + hotel + car)", total=len(trip_jobs))
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(self._place_order, *job) for job in order_jobs]
                futures += [pool.submit(self._book_trip, job) for job in trip_jobs]
                for future in concurrent.futures.as_completed(futures):
                    kind, outcome = future.result()
                    results[kind].append(outcome)
                    progress.advance(order_task if kind == "orders" else trip_task)
                    if self.stopping.is_set():
                        raise KeyboardInterrupt
        results["failed_sagas"] = self._failed_sagas()
        return results

    def _place_order(self, customer: str, total: float) -> tuple[str, dict[str, Any]]:
        port = self.stack.http_ports["order-service"]
        started = time.monotonic()
        resp = httpx.post(
            f"http://127.0.0.1:{port}/orders",
            params={"wait": 30},
            json={"customer_id": customer, "total": total},
            timeout=40,
        )
        resp.raise_for_status()
        return "orders", {**resp.json(), "latency_s": time.monotonic() - started}

    def _book_trip(self, request: TripRequest) -> tuple[str, dict[str, Any]]:
        started = time.monotonic()
        with psycopg.connect(self.dsn["trip"]) as conn:
            trip_id = book_trip(conn, request)
            conn.commit()
            deadline = time.monotonic() + 60
            while True:
                trip = trip_status(conn, trip_id)
                conn.rollback()
                if trip is not None and (trip.settled or time.monotonic() > deadline):
                    break
                time.sleep(0.05)
        return "trips", {
            "id": trip_id,
            "status": trip.status,
            "saga": trip.saga_status,
            "reason": trip.reason,
            "latency_s": time.monotonic() - started,
        }

    def _failed_sagas(self) -> int:
        failed = 0
        for name in ("orders", "trip"):
            with psycopg.connect(self.dsn[name]) as conn:
                row = conn.execute("SELECT count(*) FROM walsaga.saga WHERE status = 'FAILED'")
                failed += int(row.fetchone()[0])  # type: ignore[index]
        return failed

    # -- reporting -------------------------------------------------------------

    def summary(self, outcome: dict[str, Any]) -> None:
        table = Table(title=f"walsaga demo — {self.options.mode}")
        for column in ("sagas", "outcome", "count", "p50 ms", "p95 ms", "max ms"):
            table.add_column(
                column, justify="right" if "ms" in column or column == "count" else "left"
            )
        for kind, label in (("orders", "orders"), ("trips", "trips")):
            by_status: dict[str, list[float]] = {}
            for item in outcome[kind]:
                by_status.setdefault(item["status"], []).append(item["latency_s"] * 1000)
            for status, latencies in sorted(by_status.items()):
                latencies.sort()
                table.add_row(
                    label,
                    status,
                    str(len(latencies)),
                    f"{statistics.median(latencies):.0f}",
                    f"{latencies[int(0.95 * (len(latencies) - 1))]:.0f}",
                    f"{latencies[-1]:.0f}",
                )
        table.add_row("all", "FAILED (need a person)", str(outcome["failed_sagas"]), "", "", "")
        self.console.print(table)
        reasons = Counter(
            (i["reason"] or "").split(":")[0]
            for i in outcome["orders"]
            if i["status"] == "REJECTED"
        )
        if reasons:
            common = "; ".join(f"{n}x {r}" for r, n in reasons.most_common(3))
            self.console.print(f"rejected orders: {common}")
        trip_reasons = Counter(
            (i["reason"] or "").split(":")[-1].strip()
            for i in outcome["trips"]
            if i["status"] != "CONFIRMED"
        )
        if trip_reasons:
            common = "; ".join(f"{n}x {r}" for r, n in trip_reasons.most_common(3))
            self.console.print(f"compensated trips: {common}")

    def where_to_look(self) -> None:
        ports = self.stack.http_ports
        api = f"http://127.0.0.1:{ports['order-service']}"
        self.console.print("\n[bold]Where to look[/bold]")
        self.console.print(f"  order service API   {api}/orders  (metrics: {api}/metrics)")
        self.console.print(
            f"  relay               http://127.0.0.1:{ports['relay']}/healthz, /metrics"
        )
        for name in (
            "customer-service",
            "flight-service",
            "hotel-service",
            "car-service",
            "trip-service",
        ):
            self.console.print(f"  {name:<19} http://127.0.0.1:{ports[name]}/metrics")
        self.console.print(f"  logs                {self.dir / 'logs'}")
        self.console.print(
            "  databases           "
            + ", ".join(f"{n}: {c.dsn(n)}" for n, c in self.stack.clusters.items())
        )
        if self.options.serve:
            self.console.print("\n[bold]Try it[/bold]")
            self.console.print(
                f"  curl -s -X POST '{api}/orders?wait=10' -H 'Content-Type: application/json' "
                '-d \'{"customer_id": "alice", "total": 42}\''
            )
            self.console.print(f"  curl -s {api}/orders/<id>")
            self.console.print(f"  curl -N {api}/orders/<id>/events")


def _get_json(url: str) -> Any:
    try:
        resp = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    return resp.json() if resp.status_code == 200 else None


def run_demo(options: DemoOptions, console: Console | None = None) -> int:
    return Demo(options, console).run()
