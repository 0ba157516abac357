"""``walsaga demo``: the whole system on this machine, a batch of sagas, a summary.

Starts one local Postgres cluster per service (orders, customers, flight,
hotel, car, trip, and the registration example's intake, identity and
notifier), the embedded Kafka-protocol broker, one relay for all nine
databases, every service as a process of its own, the identity provider and
the mail server the registrations talk to, and the saga tracker and the web
console that show every saga; then runs orders (some approved, some refused
for credit), trips (some compensated) and user registrations (registered,
refused, compensated), prints what happened, and stops everything — or, with
``--serve``, keeps it running until Ctrl-C. Data lives in one directory
(default ``.walsaga/demo``) that can be deleted at any time the demo is not
running. As root, Postgres runs as the ``postgres`` user; when that user
cannot enter the directory (a clone in root's home, mode 700), the clusters go
to ``/var/tmp/walsaga-demo-<hash>`` instead and logs, pids and the configs
stay in the directory.

A stop goes in dependency order: the services (the tracker, the console, the
identity provider and the mail server with them), then the relay, then the
broker, then Postgres, each asked first and killed if still there after its
grace; a second Ctrl-C kills what is left at once. ``pids.json`` records each
process so that it can be recognised later: a demo killed outright leaves
processes running, and the next run in the same directory stops them first
(:mod:`participants.examples.processes`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import random
import secrets
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from participants import tracker_store
from participants.examples import customers, demo_registrations, orders, travel
from participants.examples.demo_registrations import Agreement, Registrations
from participants.examples.embedded import (
    EmbeddedBroker,
    LocalPostgres,
    free_port,
    postgres_can_reach,
)
from participants.examples.operations import tracker_config
from participants.examples.processes import (
    Child,
    ProcessRecord,
    Recorded,
    Stoppable,
    earlier_processes,
    stop_in_order,
)
from participants.examples.registration import identity, intake, notifier
from participants.examples.travel import TripRequest, book_trip, trip_status
from walsaga.cli import EXIT_ERROR
from walsaga.config import write_toml
from walsaga.errors import SetupError, from_psycopg

SERVICES = (
    "orders", "customers", "flight", "hotel", "car", "trip", "intake", "identity", "notifier"
)  # fmt: skip
#: What the registrations talk to outside any database, started with the services.
OUTSIDE_WORLD = ("identity-provider", "mail-server")
#: What shows the sagas: the tracker follows them, the console draws them.
OPERATIONS = ("tracker", "console")
#: The variable that hands the console its operator token (not its command line,
#: which anyone on the machine can read).
OPERATOR_TOKEN_ENV = "WALSAGA_DEMO_OPERATOR_TOKEN"  # noqa: S105 (a variable's name)
#: How each kind of saga ends, as the tracker shows it (orders in either mode).
ORDER_SAGA_STATUS = {"APPROVED": "COMPLETED", "REJECTED": "COMPENSATED"}
#: The longest the summary waits for the tracker to have seen every saga end.
TRACKER_CATCH_UP_S = 60.0
#: Sagas of the batch under way at once (orders, trips and registrations alike).
BATCH_THREADS = 8
#: How often a trip's booker looks at the trip again, until it has settled.
TRIP_POLL_S = 0.02

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
    registrations: int = 30


@dataclass
class _Stack:
    """Everything the demo started, for an orderly stop."""

    clusters: dict[str, LocalPostgres] = field(default_factory=dict)
    broker: EmbeddedBroker | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: Every port the demo handed out, by what listens there.
    ports: dict[str, int] = field(default_factory=dict)
    #: Each process's ports whose ``/healthz`` must answer before the batch starts.
    health: dict[str, list[int]] = field(default_factory=dict)

    def _stoppable(self) -> list[Stoppable]:
        found: list[Stoppable] = [Child(name, p) for name, p in self.processes.items()]
        if self.broker is not None and self.broker.process is not None:
            found.append(Child("broker", self.broker.process))
        found.extend(Recorded(record) for record in self._servers().values())
        return found

    def _servers(self) -> dict[str, ProcessRecord]:
        found = {}
        for name, cluster in self.clusters.items():
            pid = cluster.postmaster_pid()
            record = ProcessRecord.of(f"postgres-{name}", pid) if pid is not None else None
            if record is not None:
                found[record.name] = record
        return found

    def stop(self, *, hurry: threading.Event) -> list[str]:
        """Stop everything in order; returns what had to be killed."""
        return stop_in_order(self._stoppable(), hurry=hurry)

    def records(self) -> dict[str, ProcessRecord]:
        found: dict[str, ProcessRecord] = {}
        children = dict(self.processes)
        if self.broker is not None and self.broker.process is not None:
            children["broker"] = self.broker.process
        for name, proc in children.items():
            record = ProcessRecord.of(name, proc.pid)
            if record is not None:
                found[name] = record
        return {**found, **self._servers()}


class Demo:
    def __init__(self, options: DemoOptions, console: Console | None = None) -> None:
        self.options = options
        self.dir = options.directory.resolve()
        self.console = console or Console()
        self.clusters_dir = self.dir / "postgres"
        self.stack = _Stack()
        #: The services' databases, by the relay's names for them.
        self.dsn: dict[str, str] = {}
        #: The saga tracker's database (beside orders'; no relay reads it).
        self.tracker_dsn = ""
        self.operator_token = secrets.token_urlsafe(24)
        self.stopping = threading.Event()
        #: Set by a signal during the stop: kill what is left at once.
        self.hurry = threading.Event()
        self.errors = Console(stderr=True, highlight=False)
        #: Whether pids.json is this run's to write (not while another demo may own it).
        self._owns_pids = False
        self._records: dict[str, ProcessRecord] = {}

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
            if self.stopping.is_set():
                return 130
            outcome = self.workload()
            self.summary(outcome)
            self.where_to_look()
            if self.options.serve:
                self.console.print("\n[bold]Serving[/bold]: press Ctrl-C to stop everything.")
                while not self.stopping.wait(0.5):
                    self._check_alive()
            return 0 if _all_well(outcome) else 1
        except KeyboardInterrupt:
            self.console.print("\ninterrupted")
            return 130
        except DemoProcessError as e:
            self._report(e)
            return EXIT_ERROR
        finally:
            for s in previous:
                signal.signal(s, lambda signum, frame: self.hurry.set())
            self._stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop(self) -> None:
        if self._owns_pids and self.dir.is_dir():
            self._write_pids()
        started = time.monotonic()
        with self.console.status("stopping the services, the relay, the broker, Postgres ..."):
            killed = self.stack.stop(hurry=self.hurry)
        took_s = time.monotonic() - started
        if self.hurry.is_set():
            self.console.print("interrupted again: killed what was still running")
        elif killed:
            self.console.print(
                f"[yellow]killed[/yellow] (still running after their grace): {', '.join(killed)}"
            )
        where = f"{self.dir} and {self.clusters_dir}" if self.clusters_outside else str(self.dir)
        delete = f"{self.dir} {self.clusters_dir}" if self.clusters_outside else str(self.dir)
        them = "them" if self.clusters_outside else "it"
        self.console.print(
            f"stopped in {took_s:.1f}s. Data and logs stay in {where} "
            f"(delete {them} with: rm -rf {delete})"
        )

    def _write_pids(self) -> None:
        # What was started, so that anyone can check it is gone afterwards, and
        # the next run can stop it if this one is killed outright. A process
        # recorded once stays recorded (one that exited cannot be looked at).
        if not self._records:
            me = ProcessRecord.of("demo", os.getpid())
            self._records = {"demo": me} if me is not None else {}
        self._records.update(self.stack.records())
        data = {name: r.to_json() for name, r in self._records.items()}
        (self.dir / "pids.json").write_text(json.dumps(data, indent=1))

    def _stop_leftovers(self) -> None:
        """Stop what an earlier demo in this directory left running (killed outright,
        it could stop nothing), in the usual order; refuse while that demo runs."""
        running, notes = earlier_processes(self.dir / "pids.json")
        for note in notes:
            self.console.print(note)
        earlier = next((r for r in running if r.name == "demo"), None)
        if earlier is not None:
            raise SetupError(
                f"another walsaga demo is running in {self.dir} (pid {earlier.pid}); "
                "stop it first, or choose another --dir"
            )
        if not running:
            self._owns_pids = True
            return
        self.console.print(
            f"an earlier demo in {self.dir} left {len(running)} processes running: "
            + ", ".join(f"{r.name} (pid {r.pid})" for r in running)
            + "; stopping them first"
        )
        with self.console.status("stopping what the earlier demo left ..."):
            killed = stop_in_order([Recorded(r) for r in running], hurry=self.hurry)
        # Only now: a stop cut short keeps the earlier records for the next run.
        self._owns_pids = True
        if killed:
            self.console.print(f"  killed (still running after their grace): {', '.join(killed)}")
        self.console.print("[green]✓[/green] stopped what the earlier demo left running")

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
        self._stop_leftovers()
        outside = outside_clusters_dir(self.dir)
        if self.options.fresh:
            # Only what the demo itself made: --dir may name a folder that
            # holds other things too.
            shutil.rmtree(self.dir / "postgres", ignore_errors=True)
            shutil.rmtree(self.dir / "logs", ignore_errors=True)
            shutil.rmtree(self.dir / "registration", ignore_errors=True)
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
            self._write_pids()
            for name, cluster in clusters.items():
                self.dsn[name] = cluster.create_database(name)
            self.tracker_dsn = clusters["orders"].create_database("tracker")
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
            self._write_pids()
        bootstrap = self.stack.broker.bootstrap_servers
        self.console.print(f"[green]✓[/green] broker: {bootstrap}")
        with self.console.status("deploying schemas and capture specs ..."):
            self._install()
        self.console.print("[green]✓[/green] schemas, capture triggers and demo data deployed")
        with self.console.status("starting the relay, the services, the tracker, the console ..."):
            self._start_outside_world()
            self._start_services(bootstrap)
            self._start_operations(bootstrap)
            self._write_pids()
            self._wait_healthy()
        ports = self.stack.ports
        services = [n for n in self.stack.processes if n not in (*OUTSIDE_WORLD, *OPERATIONS)]
        self.console.print("[green]✓[/green] relay and services up: " + ", ".join(services))
        self.console.print(
            f"[green]✓[/green] identity provider http://127.0.0.1:{ports['identity-provider']}, "
            f"mail server smtp://127.0.0.1:{ports['smtp']} (what the registrations talk to)"
        )
        self.console.print(
            f"[green]✓[/green] saga tracker and console up: http://127.0.0.1:{ports['console']}/"
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
        with psycopg.connect(self.dsn["intake"]) as conn:
            intake.install(conn)
        with psycopg.connect(self.dsn["identity"]) as conn:
            identity.install(conn)
        with psycopg.connect(self.dsn["notifier"]) as conn:
            notifier.install(conn)

    def _log(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def _spawn(
        self,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        *,
        health: Sequence[str] = (),
    ) -> None:
        """Start ``walsaga <args>`` as `name`, logging to logs/<name>.log; `health`
        names the ports (in ``ports``) whose ``/healthz`` says it is up."""
        self.stack.health[name] = [self.stack.ports[port] for port in health]
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

    def _start_services(self, bootstrap: str) -> None:
        """The relay over every database, and each service (with its consumer)."""
        ports = self.stack.ports
        ports["relay"] = free_port()
        config = write_toml(
            self.dir / "relay.toml",
            {
                "kafka": {"bootstrap.servers": bootstrap},
                "relay": {"http_host": "127.0.0.1", "http_port": ports["relay"]},
                "source": [{"name": name, "dsn": dsn} for name, dsn in self.dsn.items()],
            },
        )
        self._spawn("relay", ["relay", "--config", str(config)], health=["relay"])
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
            health=["customer-service"],
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
            health=["order-service"],
        )
        for service in ("flight", "hotel", "car", "trip"):
            name = f"{service}-service"
            ports[name] = free_port()
            self._spawn(
                name,
                [
                    "travel-service",
                    "--service",
                    service,
                    "--dsn",
                    self.dsn[service],
                    "--bootstrap-servers",
                    bootstrap,
                    "--http-port",
                    str(ports[name]),
                ],
                health=[name],
            )
        # The registration example: intake's API and consumer, identity and the
        # notifier each with its effect worker beside its consumer.
        for name in ("intake-api", "intake-service", "identity-service", "notifier-service"):
            ports[name] = free_port()
        served = {"--bootstrap-servers": bootstrap}
        self._registration_service(
            "intake-service",
            {**served, "--dsn": self.dsn["intake"], "--port": str(ports["intake-api"])},
            health=["intake-api", "intake-service"],
        )
        self._registration_service(
            "identity-service",
            {
                **served,
                "--dsn": self.dsn["identity"],
                "--provider-url": f"http://127.0.0.1:{ports['identity-provider']}",
            },
            health=["identity-service"],
        )
        self._registration_service(
            "notifier-service",
            {
                **served,
                "--dsn": self.dsn["notifier"],
                "--smtp-port": str(ports["smtp"]),
                "--mail-archive": f"http://127.0.0.1:{ports['mail-server']}",
            },
            health=["notifier-service"],
        )

    def _start_outside_world(self) -> None:
        """The identity provider and the mail server (users and mail in DIR/registration)."""
        ports = self.stack.ports
        for name in ("identity-provider", "smtp", "mail-server"):
            ports[name] = free_port()
        data = str(self.dir / "registration")
        self._registration_service(
            "identity-provider",
            {"--port": str(ports["identity-provider"]), "--data": data},
            health=["identity-provider"],
        )
        self._registration_service(
            "mail-server",
            {"--smtp-port": str(ports["smtp"]), "--port": str(ports["mail-server"]),
             "--data": data},
            health=["mail-server"],
        )  # fmt: skip

    def _registration_service(
        self, name: str, options: dict[str, str], *, health: Sequence[str]
    ) -> None:
        service = name.removesuffix("-service")
        args = ["registration-service", "--service", service]
        for option, value in options.items():
            args += [option, value]
        if name.endswith("-service"):
            # The consumer's /healthz and /metrics (intake's API has a port of its own).
            args += ["--http-port", str(self.stack.ports[name])]
        self._spawn(name, args, health=health)

    def _start_operations(self, bootstrap: str) -> None:
        """The saga tracker, following every example saga, and the console over it."""
        ports = self.stack.ports
        ports["tracker"] = free_port()
        ports["console"] = free_port()
        config = tracker_config(
            self.dir / "tracker.toml",
            tracker_dsn=self.tracker_dsn,
            dsns=self.dsn,
            bootstrap_servers=bootstrap,
            relay_urls=[f"http://127.0.0.1:{ports['relay']}/healthz"],
            http_port=ports["tracker"],
            console_port=ports["console"],
        )
        self._spawn("tracker", ["tracker", "--config", str(config)], health=["tracker"])
        self._spawn(
            "console",
            ["console", "--config", str(config), "--port", str(ports["console"]),
             "--operator-token-env", OPERATOR_TOKEN_ENV],
            {OPERATOR_TOKEN_ENV: self.operator_token},
            health=["console"],
        )  # fmt: skip

    def _wait_healthy(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = {(name, port) for name, ports in self.stack.health.items() for port in ports}
        while waiting:
            self._check_alive()
            for name, port in list(waiting):
                if _get_json(f"http://127.0.0.1:{port}/healthz") is not None:
                    waiting.discard((name, port))
            if not waiting:
                return
            if time.monotonic() > deadline:
                logs = {name: self._log(name) for name, _ in sorted(waiting)}
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
        # One HTTP client for the batch's threads: a client per request loads
        # the CA bundle each time, tens of ms of CPU that the threads queue
        # for behind one another (it made each saga look ten times slower).
        limits = httpx.Limits(max_connections=2 * BATCH_THREADS)
        with httpx.Client(limits=limits) as http:
            return self._batch(http)

    def _batch(self, http: httpx.Client) -> dict[str, Any]:
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
        signups = demo_registrations.batch(self.options.registrations, secrets.token_hex(3))
        registrations = self._registrations(http)
        try:
            registrations.take(signups.taken)
        except httpx.HTTPError:
            self._check_alive()
            raise
        results: dict[str, Any] = {"orders": [], "trips": [], "registrations": []}
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console) as progress:
            tasks = {
                "orders": progress.add_task("orders (credit saga)", total=len(order_jobs)),
                "trips": progress.add_task("trips (flight + hotel + car)", total=len(trip_jobs)),
                "registrations": progress.add_task(
                    "registrations (provider + welcome e-mail)", total=len(signups.submissions)
                ),
            }
            pool = concurrent.futures.ThreadPoolExecutor(BATCH_THREADS)
            try:
                futures = [pool.submit(self._place_order, http, *job) for job in order_jobs]
                futures += [pool.submit(self._book_trip, job) for job in trip_jobs]
                futures += [
                    pool.submit(self._register, registrations, submission)
                    for submission in signups.submissions
                ]
                for future in concurrent.futures.as_completed(futures):
                    try:
                        kind, outcome = future.result()
                    except Exception:
                        # A request that failed because its service died says
                        # less than the service's exit and log.
                        self._check_alive()
                        raise
                    results[kind].append(outcome)
                    progress.advance(tasks[kind])
                    if self.stopping.is_set():
                        raise KeyboardInterrupt
            finally:
                # On a Ctrl-C, not waiting for the requests under way: they end
                # as their services stop.
                pool.shutdown(wait=False, cancel_futures=True)
        try:
            registrations.note_created_users(results["registrations"])
            agreement = registrations.agreement(signups, results["registrations"])
        except httpx.HTTPError:
            self._check_alive()
            raise
        results["agreement"] = agreement if signups.submissions else None
        results["failed_sagas"] = self._failed_sagas()
        results["untracked"] = self._wait_tracked(results)
        return results

    def _registrations(self, http: httpx.Client) -> Registrations:
        ports = self.stack.ports
        return Registrations(
            intake_url=f"http://127.0.0.1:{ports['intake-api']}",
            provider_url=f"http://127.0.0.1:{ports['identity-provider']}",
            archive_url=f"http://127.0.0.1:{ports['mail-server']}",
            intake_dsn=self.dsn["intake"],
            http=http,
        )

    def _place_order(
        self, http: httpx.Client, customer: str, total: float
    ) -> tuple[str, dict[str, Any]]:
        port = self.stack.ports["order-service"]
        started = time.monotonic()
        resp = http.post(
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
                late = time.monotonic() > deadline or self.stopping.is_set()
                if trip is not None and (trip.settled or late):
                    break
                time.sleep(TRIP_POLL_S)
        return "trips", {
            "id": trip_id,
            "status": trip.status,
            "saga": trip.saga_status,
            "reason": trip.reason,
            "latency_s": time.monotonic() - started,
        }

    def _register(
        self, registrations: Registrations, submission: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        return "registrations", registrations.register(submission, stopping=self.stopping)

    def _failed_sagas(self) -> int:
        failed = 0
        for name in ("orders", "trip", "intake"):
            with psycopg.connect(self.dsn[name]) as conn:
                row = conn.execute("SELECT count(*) FROM walsaga.saga WHERE status = 'FAILED'")
                failed += int(row.fetchone()[0])  # type: ignore[index]
        return failed

    def _wait_tracked(self, outcome: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
        """The batch's sagas the tracker does not show ended as they did (each with
        the status expected and the one shown), once it shows them all (so the
        console has every one) or after :data:`TRACKER_CATCH_UP_S`."""
        expected = expected_tracker_statuses(outcome)
        shown: dict[str, str | None] = {}
        deadline = time.monotonic() + TRACKER_CATCH_UP_S
        with (
            self.console.status("waiting for the saga tracker to see every saga end ..."),
            psycopg.connect(self.tracker_dsn, autocommit=True) as conn,
        ):
            while True:
                for saga_id, status in list(expected.items()):
                    seen = tracker_store.summary(conn, saga_id)
                    shown[saga_id] = seen.status if seen is not None else None
                    if shown[saga_id] == status:
                        del expected[saga_id]
                if not expected or time.monotonic() > deadline:
                    break
                if self.stopping.wait(0.25):
                    raise KeyboardInterrupt
        return {saga_id: (status, shown[saga_id]) for saga_id, status in expected.items()}

    # -- reporting -------------------------------------------------------------

    def summary(self, outcome: dict[str, Any]) -> None:
        table = Table(
            title=f"walsaga demo — {self.options.mode}",
            caption=(
                f"latency: from the request to the saga's end, {BATCH_THREADS} sagas under way "
                "at once, every process of the demo on this machine"
            ),
        )
        for column in ("sagas", "outcome", "count", "p50 ms", "p95 ms", "max ms"):
            table.add_column(
                column, justify="right" if "ms" in column or column == "count" else "left"
            )
        for kind in ("orders", "trips"):
            by_status: dict[str, list[float]] = {}
            for item in outcome[kind]:
                by_status.setdefault(item["status"], []).append(item["latency_s"] * 1000)
            for status, latencies in sorted(by_status.items()):
                table.add_row(kind, status, *_figures(latencies))
        for text, latencies in demo_registrations.grouped(outcome["registrations"]):
            table.add_row("registrations", text, *_figures(latencies))
        table.add_row("all", "FAILED (need a person)", str(outcome["failed_sagas"]), "", "", "")
        agreement: Agreement | None = outcome["agreement"]
        if agreement is not None:
            table.add_row(
                "check",
                "e-mails in the mailbox = REGISTERED",
                _agrees(agreement.mails_agree, f"{agreement.mails} = {agreement.registered}"),
            )
            table.add_row(
                "check",
                f"provider users = REGISTERED + {agreement.taken} taken beforehand",
                _agrees(
                    agreement.users_agree,
                    f"{agreement.users} = {agreement.registered} + {agreement.taken}",
                ),
            )
        total = len(expected_tracker_statuses(outcome))
        untracked: dict[str, tuple[str, str | None]] = outcome["untracked"]
        seen = total - len(untracked)
        table.add_row(
            "tracker", "sagas shown ended as above", _agrees(seen == total, f"{seen} of {total}")
        )
        self.console.print(table)
        for saga_id, (expected, shown) in list(untracked.items())[:5]:
            self.console.print(
                f"[red]the tracker shows saga {saga_id} {shown or 'not at all'}[/red], "
                f"not {expected}"
            )
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
        ports = self.stack.ports
        url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        api = url["order-service"]
        say = self.console.print
        say("\n[bold]Where to look[/bold]")
        say(f"  console             {url['console']}/  (every saga, its timeline; the relay)")
        say(f"  sagas               walsaga sagas list --config {self.dir / 'tracker.toml'}")
        say(f"  order service API   {api}/orders  (metrics: {api}/metrics)")
        say(f"  registration API    {url['intake-api']}/registrations")
        say(f"  identity provider   {url['identity-provider']}/users")
        smtp = f"127.0.0.1:{ports['smtp']}"
        say(f"  mail server         {url['mail-server']}/messages  (SMTP {smtp})")
        say(f"  relay               {url['relay']}/healthz, /metrics")
        for name in (
            "customer-service",
            "flight-service",
            "hotel-service",
            "car-service",
            "trip-service",
            "intake-service",
            "identity-service",
            "notifier-service",
            "tracker",
        ):
            say(f"  {name:<19} {url[name]}/metrics")
        say(f"  logs                {self.dir / 'logs'}")
        say(f"  clusters            {self.clusters_dir}  (server logs: <service>/postgres.log)")
        databases = {n: c.dsn(n) for n, c in self.stack.clusters.items()}
        databases["tracker"] = self.tracker_dsn
        say("  databases           " + ", ".join(f"{n}: {dsn}" for n, dsn in databases.items()))
        if self.options.serve:
            say(f"  operator token      {self.operator_token}  (the console's repair actions)")
            say("\n[bold]Try it[/bold]")
            say(
                f"  curl -s -X POST '{api}/orders?wait=10' -H 'Content-Type: application/json' "
                '-d \'{"customer_id": "alice", "total": 42}\''
            )
            say(f"  curl -s {api}/orders/<id>")
            say(f"  curl -N {api}/orders/<id>/events")
            say(
                f"  curl -s -X POST '{url['intake-api']}/registrations?wait=10' "
                "-H 'Content-Type: application/json' "
                '-d \'{"email": "you@example.com", "name": "You", "accept_terms": true}\''
            )


def expected_tracker_statuses(outcome: dict[str, Any]) -> dict[str, str]:
    """Each saga of the batch, by id, with the status the tracker shows once it has
    seen it end (RUNNING for one that had not ended by the summary). Pure."""
    expected = {o["id"]: ORDER_SAGA_STATUS.get(o["status"], "RUNNING") for o in outcome["orders"]}
    expected.update({t["id"]: t["saga"] or "RUNNING" for t in outcome["trips"]})
    expected.update(
        {r["id"]: demo_registrations.tracker_status(r) for r in outcome["registrations"]}
    )
    return expected


def _all_well(outcome: dict[str, Any]) -> bool:
    """No saga FAILED, and the mailbox, the provider and the tracker agree with the batch."""
    agreement: Agreement | None = outcome["agreement"]
    agreed = agreement is None or (agreement.mails_agree and agreement.users_agree)
    return outcome["failed_sagas"] == 0 and agreed and not outcome["untracked"]


def _figures(latencies_ms: list[float]) -> tuple[str, str, str, str]:
    """Count, p50, p95 (nearest rank, so never below the median) and max of
    `latencies_ms`, as the summary shows them."""
    ordered = sorted(latencies_ms)
    return (
        str(len(ordered)),
        f"{statistics.median(ordered):.0f}",
        f"{ordered[math.ceil(0.95 * len(ordered)) - 1]:.0f}",
        f"{ordered[-1]:.0f}",
    )


def _agrees(ok: bool, figures: str) -> str:
    return f"[green]{figures} ✓[/green]" if ok else f"[red]{figures} ✗[/red]"


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
