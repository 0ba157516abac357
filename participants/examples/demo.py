"""``walsaga demo``: the whole system on this machine, a batch of sagas, a summary.

Starts one local Postgres cluster per service (orders, customers, flight,
hotel, car, trip), the embedded Kafka-protocol broker, one relay for all six
databases and every service as a process of its own; then runs orders (some
approved, some refused for credit) and trips (some compensated), prints what
happened, and stops everything — or, with ``--serve``, keeps it running until
Ctrl-C. Data lives in one directory (default ``.walsaga/demo``) that can be
deleted at any time the demo is not running. As root, Postgres runs as the
``postgres`` user; when that user cannot enter the directory (a clone in
root's home, mode 700), the clusters go to ``/var/tmp/walsaga-demo-<hash>``
instead and logs, pids and the relay's config stay in the directory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import stat
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
from participants.examples.embedded import (
    EmbeddedBroker,
    LocalPostgres,
    free_port,
    postgres_can_reach,
)
from participants.examples.travel import TripRequest, book_trip, trip_status
from walsaga.cli import EXIT_ERROR
from walsaga.config import write_toml
from walsaga.errors import SetupError, from_psycopg

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

#: Where the clusters go when the Postgres user cannot enter the demo's directory:
#: kept across reboots, for --keep. World-writable, hence _own_directory's checks.
OUTSIDE_CLUSTERS_ROOT = Path("/var/tmp")  # noqa: S108


def outside_clusters_dir(directory: Path) -> Path:
    """Where the clusters of the demo in `directory` live when Postgres cannot reach
    it: one folder per demo directory, so two demos never share clusters."""
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:12]
    return OUTSIDE_CLUSTERS_ROOT / f"walsaga-demo-{digest}"


class DemoProcessError(SetupError):
    """A process of the demo exited, or did not become healthy in time."""

    def __init__(self, message: str, logs: dict[str, Path]) -> None:
        super().__init__(message)
        self.logs = logs


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
        self.clusters_dir = self.dir / "postgres"
        self.stack = _Stack()
        self.dsn: dict[str, str] = {}
        self.stopping = threading.Event()
        self.errors = Console(stderr=True, highlight=False)

    @property
    def clusters_outside(self) -> bool:
        return not self.clusters_dir.is_relative_to(self.dir)

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
            self._write_pids()
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
        except DemoProcessError as e:
            self._report(e)
            return EXIT_ERROR
        finally:
            if self.dir.is_dir():
                self._write_pids()
            with self.console.status("stopping every process ..."):
                self.stack.stop()
            if self.clusters_outside:
                self.console.print(
                    f"stopped. Data and logs stay in {self.dir} and {self.clusters_dir} "
                    f"(delete them with: rm -rf {self.dir} {self.clusters_dir})"
                )
            else:
                self.console.print(
                    f"stopped. Data and logs stay in {self.dir} (delete it with: rm -rf {self.dir})"
                )
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _write_pids(self) -> None:
        # What was started, so that anyone can check it is gone afterwards.
        (self.dir / "pids.json").write_text(json.dumps(self.stack.pids()))

    def _report(self, failure: DemoProcessError) -> None:
        self.errors.print(f"[bold red]error[/bold red]: {failure}")
        for name, log in failure.logs.items():
            lines = log.read_text(errors="replace").splitlines()[-8:] if log.exists() else []
            if lines:
                self.errors.print(f"last lines of {name}'s log ({log}):")
                for line in lines:
                    self.errors.print(f"  {line}", markup=False, style="dim")

    # -- starting ------------------------------------------------------------

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        outside = outside_clusters_dir(self.dir)
        if self.options.fresh:
            # Only what the demo itself made: --dir may name a folder that
            # holds other things too.
            shutil.rmtree(self.dir / "postgres", ignore_errors=True)
            shutil.rmtree(self.dir / "logs", ignore_errors=True)
            _remove_own_directory(outside)
        (self.dir / "logs").mkdir(exist_ok=True)
        if not postgres_can_reach(self.dir):
            self.clusters_dir = outside
        _own_directory(self.clusters_dir)
        if self.clusters_outside:
            (self.clusters_dir / "README").write_text(
                f"Postgres clusters of the walsaga demo in {self.dir}; "
                "its next fresh start deletes them, and so may you when it is not running.\n"
            )
        with self.console.status("starting one Postgres cluster per service ..."):
            clusters = {
                name: LocalPostgres(self.clusters_dir / name, durable=False) for name in SERVICES
            }
            self.stack.clusters = clusters
            with concurrent.futures.ThreadPoolExecutor(len(clusters)) as pool:
                list(pool.map(lambda c: c.start(), clusters.values()))
            for name, cluster in clusters.items():
                self.dsn[name] = cluster.create_database(name)
        self.console.print(
            f"[green]✓[/green] Postgres: {len(clusters)} clusters in {self.clusters_dir} "
            f"(ports {', '.join(str(c.port) for c in clusters.values())})"
        )
        if self.clusters_outside:
            self.console.print(
                f"  the postgres user cannot enter {self.dir}, so the clusters live outside it"
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
        try:
            self._install_schemas()
        except psycopg.Error as e:
            raise from_psycopg(e, "deploying the demo's schemas") from e

    def _install_schemas(self) -> None:
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

    def _log(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        walsaga = str(Path(sys.executable).parent / "walsaga")
        log = self._log(name).open("ab")
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
        config = write_toml(
            self.dir / "relay.toml",
            {
                "kafka": {"bootstrap.servers": bootstrap},
                "relay": {"http_host": "127.0.0.1", "http_port": ports["relay"]},
                "source": [{"name": name, "dsn": dsn} for name, dsn in self.dsn.items()],
            },
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
                logs = {name: self._log(name) for name in waiting}
                raise DemoProcessError(
                    f"not healthy after {timeout_s:.0f}s: "
                    + ", ".join(f"{name} (log: {log})" for name, log in logs.items()),
                    logs,
                )
            if self.stopping.wait(0.3):
                raise KeyboardInterrupt

    def _check_alive(self) -> None:
        for name, proc in self.stack.processes.items():
            if proc.poll() is not None:
                raise DemoProcessError(
                    f"{name} exited with status {proc.returncode}; its log: {self._log(name)}",
                    {name: self._log(name)},
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
                    try:
                        kind, outcome = future.result()
                    except Exception:
                        # A request that failed because its service died says
                        # less than the service's exit and log.
                        self._check_alive()
                        raise
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
            f"  clusters            {self.clusters_dir}  (server logs: <service>/postgres.log)"
        )
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


def _own_directory(path: Path) -> None:
    """Create `path` (mode 0755, so the Postgres user may enter it), or check that it
    is a directory of ours: in a world-writable parent such as /var/tmp, someone
    else could have made it first."""
    path.mkdir(parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise SetupError(
            f"{path} is not a directory of this user's; remove it, or choose another --dir"
        )
    path.chmod(0o755)


def _remove_own_directory(path: Path) -> None:
    """Delete `path` if it is a directory of ours (never through a symlink)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
        shutil.rmtree(path, ignore_errors=True)


def _get_json(url: str) -> Any:
    try:
        resp = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    return resp.json() if resp.status_code == 200 else None


def run_demo(options: DemoOptions, console: Console | None = None) -> int:
    return Demo(options, console).run()
