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

A stop goes in dependency order: the services, then the relay, then the
broker, then Postgres, each asked first (SIGTERM; Postgres a fast shutdown)
and killed if still there after its grace; a second Ctrl-C kills what is left
at once. ``pids.json`` records each process so that it can be recognised later
(its start time, not just its pid): a demo killed outright leaves processes
running, and the next run in the same directory stops them first.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Protocol

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

#: How long each stage of a stop may take before what is left of it is killed:
#: the services and the relay stop within 5 s by themselves (their
#: --shutdown-timeout, [relay] shutdown_timeout_s), the broker and Postgres
#: within moments.
STOP_GRACE_S = {"services": 7.0, "relay": 7.0, "broker": 2.0, "Postgres": 5.0}

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


@dataclass(frozen=True)
class ProcessRecord:
    """A process the demo started, as ``pids.json`` keeps it: enough to tell later
    whether that pid is still the same process. A pid alone is not: once the
    process is gone the kernel may give it to any other, so the record keeps
    the boot, the start time (clock ticks since boot) and the command line."""

    name: str
    pid: int
    boot: str
    started: int
    cmdline: tuple[str, ...]

    @classmethod
    def of(cls, name: str, pid: int) -> ProcessRecord | None:
        """The record of the running process `pid` (None if there is none)."""
        seen = _proc_status(pid)
        if seen is None:
            return None
        _, started, cmdline = seen
        return cls(name, pid, _boot_id(), started, cmdline)

    def is_running(self) -> bool:
        """Whether this very process still runs (not another one that has its pid now)."""
        seen = _proc_status(self.pid)
        if seen is None or self.boot != _boot_id():
            return False
        state, started, cmdline = seen
        # A process may rewrite its arguments (its title), not its executable.
        same_program = cmdline[:1] == self.cmdline[:1]
        return state != "Z" and started == self.started and same_program

    def pid_in_use(self) -> bool:
        return _proc_status(self.pid) is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "boot": self.boot,
            "started": self.started,
            "cmdline": list(self.cmdline),
        }

    @classmethod
    def from_json(cls, name: str, data: Any) -> ProcessRecord | None:
        """The record as ``pids.json`` keeps it; None for an entry it cannot read
        (older demos recorded bare pids)."""
        try:
            return cls(
                name,
                int(data["pid"]),
                str(data["boot"]),
                int(data["started"]),
                tuple(str(a) for a in data["cmdline"]),
            )
        except (TypeError, KeyError, ValueError):
            return None


def _proc_status(pid: int) -> tuple[str, int, tuple[str, ...]] | None:
    """A process's state letter, start time and arguments, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # The command name in parentheses may hold spaces: fields start after it.
    fields = stat.rpartition(")")[2].split()
    args = tuple(a.decode(errors="replace") for a in cmdline.split(b"\0") if a)
    return fields[0], int(fields[19]), args


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class _Stoppable(Protocol):
    @property
    def name(self) -> str: ...

    def alive(self) -> bool: ...

    def send(self, signum: int) -> None: ...


@dataclass
class _Child:
    """A process this demo started itself (and reaps)."""

    name: str
    proc: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)


@dataclass
class _Recorded:
    """A process known by its record only: a Postgres server (pg_ctl started it),
    or what an earlier demo left. Signalled only while it is still that process."""

    record: ProcessRecord

    @property
    def name(self) -> str:
        return self.record.name

    def alive(self) -> bool:
        return self.record.is_running()

    def send(self, signum: int) -> None:
        if self.record.is_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.record.pid, signum)


def _stage(name: str) -> str:
    """Which stage of a stop the process `name` belongs to."""
    if name == "relay":
        return "relay"
    if name == "broker":
        return "broker"
    if name.startswith("postgres-"):
        return "Postgres"
    return "services"


def stop_in_order(processes: Sequence[_Stoppable], *, hurry: threading.Event) -> list[str]:
    """Stop `processes` stage by stage (services, relay, broker, Postgres): each is
    asked to stop (SIGTERM; a fast shutdown for Postgres) and killed if it is still
    there after its stage's grace, or at once when `hurry` is set. Returns the
    names of those that had to be killed."""
    killed: list[str] = []
    for stage, grace_s in STOP_GRACE_S.items():
        live = [p for p in processes if _stage(p.name) == stage and p.alive()]
        for proc in live:
            proc.send(signal.SIGINT if stage == "Postgres" else signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(p.alive() for p in live) and time.monotonic() < deadline:
            if hurry.wait(0.02):
                break
        stubborn = [p for p in live if p.alive()]
        for proc in stubborn:
            proc.send(signal.SIGKILL)
            killed.append(proc.name)
        deadline = time.monotonic() + 5
        while any(p.alive() for p in stubborn) and time.monotonic() < deadline:
            time.sleep(0.02)
    return killed


def earlier_processes(pids_file: Path) -> tuple[list[ProcessRecord], list[str]]:
    """What the demo that wrote `pids_file` left running, and a note for each pid
    it recorded that another process has now (those are left alone)."""
    try:
        recorded = json.loads(pids_file.read_text())
    except (OSError, ValueError):
        return [], []
    if not isinstance(recorded, dict):
        return [], []
    running: list[ProcessRecord] = []
    notes: list[str] = []
    for name, data in recorded.items():
        record = ProcessRecord.from_json(name, data)
        if record is None:
            if isinstance(data, int) and _proc_status(data) is not None:
                notes.append(f"pid {data} ({name} of an older demo) cannot be checked: left alone")
            continue
        if record.is_running():
            running.append(record)
        elif record.pid_in_use():
            notes.append(f"pid {record.pid} (was the {name}) is another process now: left alone")
    return running, notes


@dataclass
class _Stack:
    """Everything the demo started, for an orderly stop."""

    clusters: dict[str, LocalPostgres] = field(default_factory=dict)
    broker: EmbeddedBroker | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    http_ports: dict[str, int] = field(default_factory=dict)

    def _stoppable(self) -> list[_Stoppable]:
        found: list[_Stoppable] = [_Child(name, p) for name, p in self.processes.items()]
        if self.broker is not None and self.broker.process is not None:
            found.append(_Child("broker", self.broker.process))
        found.extend(_Recorded(record) for record in self._servers().values())
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
        self.dsn: dict[str, str] = {}
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
            return 0 if outcome["failed_sagas"] == 0 else 1
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
            killed = stop_in_order([_Recorded(r) for r in running], hurry=self.hurry)
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
        with self.console.status("starting the relay and the services ..."):
            self._start_processes(bootstrap)
            self._write_pids()
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
            pool = concurrent.futures.ThreadPoolExecutor(8)
            try:
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
            finally:
                # On a Ctrl-C, not waiting for the requests under way: they end
                # as their services stop.
                pool.shutdown(wait=False, cancel_futures=True)
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
                late = time.monotonic() > deadline or self.stopping.is_set()
                if trip is not None and (trip.settled or late):
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
