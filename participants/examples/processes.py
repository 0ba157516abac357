"""The processes ``walsaga demo`` starts: how ``pids.json`` records each one so that it
can be recognised later, and the stop that ends them in dependency order.

A stop goes stage by stage (the services, then the relay, then the broker, then
Postgres), each process asked first (SIGTERM; Postgres a fast shutdown) and
killed if still there after its stage's grace. A record keeps a process's
start time, not just its pid, so a pid the kernel has since given to another
process is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

#: How long each stage of a stop may take before what is left of it is killed:
#: the services (with them the saga tracker, the console, the identity provider
#: and the mail server) and the relay stop within 5 s by themselves (their
#: --shutdown-timeout, [tracker] and [relay] shutdown_timeout_s), the broker and
#: Postgres within moments.
STOP_GRACE_S = {"services": 7.0, "relay": 7.0, "broker": 2.0, "Postgres": 5.0}


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
        # A child still inside exec() has no arguments yet: the parent is woken
        # (and Popen returns) once the old image is dropped, before the new
        # one's arguments are in place. Recorded then, the record would never
        # match the running program.
        deadline = time.monotonic() + 1.0
        while seen is not None and not seen[2] and seen[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.001)
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


class Stoppable(Protocol):
    @property
    def name(self) -> str: ...

    def alive(self) -> bool: ...

    def send(self, signum: int) -> None: ...


@dataclass
class Child:
    """A process this demo started itself (and reaps)."""

    name: str
    proc: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)


@dataclass
class Recorded:
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


def stage(name: str) -> str:
    """Which stage of a stop the process `name` belongs to: whatever is neither the
    relay, the broker nor a Postgres server stops with the services, first."""
    if name == "relay":
        return "relay"
    if name == "broker":
        return "broker"
    if name.startswith("postgres-"):
        return "Postgres"
    return "services"


def stop_in_order(processes: Sequence[Stoppable], *, hurry: threading.Event) -> list[str]:
    """Stop `processes` stage by stage (services, relay, broker, Postgres): each is
    asked to stop (SIGTERM; a fast shutdown for Postgres) and killed if it is still
    there after its stage's grace, or at once when `hurry` is set. Returns the
    names of those that had to be killed."""
    killed: list[str] = []
    for step, grace_s in STOP_GRACE_S.items():
        live = [p for p in processes if stage(p.name) == step and p.alive()]
        for proc in live:
            proc.send(signal.SIGINT if step == "Postgres" else signal.SIGTERM)
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
