"""Demo stop benchmark: how long Ctrl-C on `walsaga demo --serve` takes, and what it leaves.

Each run starts `walsaga demo --serve` (nine Postgres clusters, the embedded
broker, the relay, every service, the saga tracker and the console), lets it
place a load of orders, trips and registrations,
then sends SIGINT to the demo's process group, as a terminal does on Ctrl-C,
and times the exit. After each exit every process the demo recorded in its
``pids.json`` must be gone. The target: every run stops within 20 seconds and
leaves nothing running.

    .venv/bin/python bench/demo_stop.py [--runs 20] [--orders 300] [--trips 15] [--limit 20]

Runs take a minute or two each (most of it the demo's start and its load);
``--keep`` reuses the clusters of the first run for the later ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from participants.examples.demo import outside_clusters_dir
from participants.examples.processes import ProcessRecord

WALSAGA = str(Path(sys.executable).parent / "walsaga")


@dataclass
class Run:
    stop_s: float | None  # None: did not exit at all
    status: int | None
    leftovers: list[str]


def left_running(directory: Path) -> list[str]:
    """The processes of `directory`'s pids.json that still run."""
    try:
        found = json.loads((directory / "pids.json").read_text())
    except (OSError, ValueError):
        return ["(no pids.json)"]
    records = [ProcessRecord.from_json(name, data) for name, data in found.items()]
    return [f"{r.name} (pid {r.pid})" for r in records if r is not None and r.is_running()]


def one_run(directory: Path, args: argparse.Namespace, fresh: bool, log: Path) -> Run:
    command = [WALSAGA, "demo", "--dir", str(directory), "--serve", "--port", "0",
               "--orders", str(args.orders), "--trips", str(args.trips)]  # fmt: skip
    if not fresh:
        command.append("--keep")
    with log.open("w") as out:
        demo = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "COLUMNS": "200"},
            start_new_session=True,  # a process group of its own, as a shell gives a job
        )
    deadline = time.monotonic() + args.start_timeout
    while "Serving" not in log.read_text(errors="replace"):
        if demo.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
            tail = log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"the demo did not serve (status {demo.returncode}):\n{tail}")
        time.sleep(0.2)
    time.sleep(args.settle)
    sent = time.monotonic()
    os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
    try:
        status: int | None = demo.wait(args.give_up)
        stop_s: float | None = time.monotonic() - sent
    except subprocess.TimeoutExpired:
        status, stop_s = None, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGKILL)
        demo.wait()
    return Run(stop_s, status, left_running(directory))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--trips", type=int, default=15)
    parser.add_argument("--limit", type=float, default=20.0, help="the stop time to stay within")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds served before Ctrl-C")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--give-up", type=float, default=120.0, help="wait this long for an exit")
    parser.add_argument("--keep", action="store_true", help="reuse the clusters after run 1")
    parser.add_argument("--dir", type=Path, default=None, help="demo directory (default: a temp)")
    args = parser.parse_args()

    directory = args.dir or Path(tempfile.mkdtemp(prefix="walsaga-demo-stop-"))
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # Postgres may run as another user that must enter it
    runs: list[Run] = []
    try:
        for i in range(1, args.runs + 1):
            run = one_run(directory, args, fresh=i == 1 or not args.keep, log=directory / "run.out")
            runs.append(run)
            took = "did not exit" if run.stop_s is None else f"{run.stop_s:5.1f}s"
            left = ", ".join(run.leftovers) or "none"
            print(f"run {i:2}/{args.runs}: stopped in {took}, status {run.status}, "
                  f"left running: {left}", flush=True)  # fmt: skip
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
            shutil.rmtree(outside_clusters_dir(directory), ignore_errors=True)

    times = [r.stop_s for r in runs if r.stop_s is not None]
    within = sum(1 for r in runs if r.stop_s is not None and r.stop_s <= args.limit)
    leftovers = sum(len(r.leftovers) for r in runs)
    print()
    print(f"runs within {args.limit:g}s: {within}/{len(runs)}")
    if times:
        print(f"stop time: max {max(times):.1f}s, median {statistics.median(times):.1f}s, "
              f"min {min(times):.1f}s")  # fmt: skip
    print(f"processes left running: {leftovers}")
    return 0 if within == len(runs) and leftovers == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
