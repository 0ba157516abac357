"""Relay A/B: two (or more) walsaga builds relay the same WAL, in turn.

Run-to-run noise on a shared machine is larger than most changes to the
relay's hot path, so comparing two builds means running them back to back
over the same events: one Postgres cluster, one broker, N outbox events
written once, and a replication slot per build and round, all created before
the events so that each run decodes exactly the same WAL. The builds take
turns, round after round; each is clocked from the moment its slot turns
active until its slot is confirmed past the last event (which the relay does
only once Kafka acknowledged everything), and its CPU time (user + system)
over that span is divided by the events.

    .venv/bin/python bench/relay_ab.py now=.venv/bin/walsaga \\
        before=../baseline/.venv/bin/walsaga [--rounds 3] [--events 200000]

Each NAME=EXECUTABLE is a ``walsaga`` command (another checkout's venv, say).
Prints each run, then the median events/s and µs of CPU per event per build.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import relay_bench  # the shared pieces: generate, relay_config, ...

from participants.examples.embedded import EmbeddedBroker, LocalPostgres, free_port
from walsaga import schema


def build(text: str) -> tuple[str, str]:
    name, sep, executable = text.partition("=")
    if not sep or not name or not Path(executable).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH-TO-WALSAGA, got {text!r}")
    return name, executable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", type=build, metavar="NAME=WALSAGA")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--events-per-txn", type=int, default=10)
    args = parser.parse_args()
    builds = dict(args.builds)
    if len(builds) != len(args.builds):
        parser.error("each build needs a name of its own")

    base = Path(tempfile.mkdtemp(prefix="walsaga-relay-ab-"))
    base.chmod(0o755)  # the cluster runs as another user when started as root
    cluster = LocalPostgres(base / "pg", durable=True)
    broker = EmbeddedBroker()
    cluster.start()
    broker.start()
    try:
        dsn = cluster.create_database("bench")
        with psycopg.connect(dsn) as conn:
            schema.apply(conn, "core")
        admin = psycopg.connect(dsn, autocommit=True)
        runs = [(r, name) for r in range(args.rounds) for name in builds]
        for r, name in runs:
            admin.execute(
                "SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (f"ab_{r}_{name}",)
            )
        print(f"writing {args.events:,} events ...", file=sys.stderr, flush=True)
        end = relay_bench.generate(dsn, args.events, args.events_per_txn)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in builds}
        for r, name in runs:
            slot = f"ab_{r}_{name}"
            config = base / f"{slot}.toml"
            port = free_port()
            relay_bench.relay_config(config, dsn, slot, broker.bootstrap_servers, port)
            quiet = subprocess.DEVNULL
            command = [builds[name], "relay", "--config", str(config)]
            proc = subprocess.Popen(command, stdout=quiet, stderr=quiet)
            try:
                started = relay_bench.slot_active_at(admin, slot)
                cpu_before = relay_bench.cpu_seconds(proc.pid)
                while not relay_bench.confirmed_past(admin, slot, end):
                    if proc.poll() is not None:
                        sys.exit(f"{name}: the relay exited with status {proc.returncode}")
                    time.sleep(0.002)
                took = time.monotonic() - started
                cpu_us = (relay_bench.cpu_seconds(proc.pid) - cpu_before) / args.events * 1e6
            finally:
                proc.terminate()
                proc.wait(30)
            results[name].append((args.events / took, cpu_us))
            print(f"round {r} {name:12s} {args.events / took:9,.0f} events/s "
                  f"{cpu_us:7.2f} µs CPU/event", flush=True)  # fmt: skip
        print()
        for name, figures in results.items():
            rate = statistics.median(f[0] for f in figures)
            cpu = statistics.median(f[1] for f in figures)
            print(f"{name:12s} median {rate:9,.0f} events/s {cpu:7.2f} µs CPU/event")
    finally:
        broker.stop()
        cluster.stop()


if __name__ == "__main__":
    main()
