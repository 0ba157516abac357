"""`walsaga demo`, the README's main command, in a short run: its summary, that
nothing it started is left running (not even after the demo itself was killed
outright: the next run stops what it left), that a process failing at start
ends it with a message rather than a traceback, and that root can run it from a
private home."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from participants.examples.demo import ProcessRecord, earlier_processes, outside_clusters_dir
from tests.support import WALSAGA, wait_until


@pytest.fixture
def directory() -> Iterator[Path]:
    """A demo directory, deleted afterwards (six clusters are a few hundred MB)."""
    # Postgres runs as an unprivileged user that must be able to reach it.
    path = Path(tempfile.mkdtemp(prefix="walsaga-test-demo-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_demo(
    directory: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [WALSAGA, "demo", "--dir", str(directory), "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def recorded(directory: Path) -> dict[str, ProcessRecord]:
    found = json.loads((directory / "pids.json").read_text())
    records = {name: ProcessRecord.from_json(name, data) for name, data in found.items()}
    assert None not in records.values(), found
    return records  # type: ignore[return-value]


def using(directory: Path) -> dict[int, str]:
    """The processes with a file open under `directory` (a log, a data file), or
    their working directory there, whether the demo recorded them or not."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = [proc / "cwd", *(proc / "fd").iterdir()]
            if any(str(os.readlink(link)).startswith(f"{directory}/") for link in links):
                found[int(proc.name)] = (
                    (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                )
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return found


def assert_all_gone(directory: Path) -> None:
    records = recorded(directory)
    assert {"demo", "relay", "order-service", "customer-service", "broker"} <= set(records)
    assert any(name.startswith("postgres-") for name in records)
    alive = {name: r.pid for name, r in records.items() if r.is_running()}
    assert not alive, f"left running: {alive}"
    assert not using(directory), f"left running: {using(directory)}"


def test_a_recorded_pid_that_another_process_has_now_is_left_alone(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        record = ProcessRecord.of("relay", sleeper.pid)
        assert record is not None and record.is_running()
        # The same pid, started at another moment: not the process recorded.
        reused = {**record.to_json(), "started": record.started - 1}
        (tmp_path / "pids.json").write_text(json.dumps({"relay": reused}))
        running, notes = earlier_processes(tmp_path / "pids.json")
        assert running == []
        assert notes == [f"pid {sleeper.pid} (was the relay) is another process now: left alone"]

        (tmp_path / "pids.json").write_text(json.dumps({"relay": record.to_json()}))
        assert earlier_processes(tmp_path / "pids.json") == ([record], [])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not record.is_running()


@pytest.mark.slow
def test_the_demo_runs_sagas_prints_a_summary_and_leaves_nothing_running(directory: Path) -> None:
    out = run_demo(directory, "--orders", "16", "--trips", "6")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "relay and services up" in text
    for expected in ("orders", "APPROVED", "trips", "CONFIRMED", "FAILED (need a person)"):
        assert expected in text
    counts = {
        (cells[0], cells[1]): int(cells[2])
        for line in text.splitlines()
        if line.count("│") >= 6
        and (cells := [c.strip() for c in line.strip("│ ").split("│")])[2].isdigit()
    }
    assert sum(n for (kind, _), n in counts.items() if kind == "orders") == 16
    assert sum(n for (kind, _), n in counts.items() if kind == "trips") == 6
    assert counts[("all", "FAILED (need a person)")] == 0
    assert "Where to look" in text and "stopped in" in text
    assert f"clusters in {directory / 'postgres'} " in text
    assert_all_gone(directory)


@pytest.mark.slow
def test_a_process_that_exits_at_start_ends_the_demo_with_its_name_and_log(
    directory: Path,
) -> None:
    # An unknown relay setting: the relay refuses to start, nothing else minds it.
    out = run_demo(
        directory, "--orders", "1", "--trips", "0", env={"WALSAGA_RELAY__NO_SUCH_SETTING": "1"}
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    log = directory / "logs" / "relay.log"
    assert f"relay exited with status 2; its log: {log}" in out.stderr
    assert "relay.no_such_setting (from WALSAGA_RELAY__NO_SUCH_SETTING): unknown key" in out.stderr
    assert "stopped in" in out.stdout
    assert_all_gone(directory)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="only root's Postgres runs as another user")
def test_as_root_a_demo_in_a_private_directory_keeps_its_clusters_outside_it() -> None:
    private = Path(tempfile.mkdtemp(prefix="walsaga-test-private-"))
    assert private.stat().st_mode & 0o777 == 0o700
    directory = private / "demo"
    outside = outside_clusters_dir(directory)
    # What an earlier run left, and what the demo did not make.
    (directory / "logs").mkdir(parents=True)
    (directory / "logs" / "relay.log").write_text("an earlier run\n")
    (directory / "notes.txt").write_text("mine\n")
    (outside / "orders").mkdir(parents=True)
    (outside / "orders" / "stale").write_text("an earlier run\n")
    try:
        out = run_demo(directory, "--orders", "3", "--trips", "1")
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"clusters in {outside} " in out.stdout
        assert f"cannot enter {directory}" in out.stdout
        assert f"clusters            {outside} " in out.stdout
        assert f"rm -rf {directory} {outside}" in " ".join(out.stdout.split())

        assert outside.stat().st_uid == 0 and outside.stat().st_mode & 0o777 == 0o755
        postgres = pwd.getpwnam("postgres").pw_uid
        assert (outside / "orders").stat().st_uid == postgres
        assert (outside / "orders" / "data" / "PG_VERSION").exists()
        assert not (outside / "orders" / "stale").exists()
        assert not (directory / "postgres").exists()
        assert (directory / "relay.toml").exists()
        assert "an earlier run" not in (directory / "logs" / "relay.log").read_text()
        assert (directory / "notes.txt").read_text() == "mine\n"
        assert_all_gone(directory)
    finally:
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(outside, ignore_errors=True)


@pytest.mark.slow
def test_serve_keeps_everything_up_until_ctrl_c(directory: Path) -> None:
    log = (directory / "demo.out").open("w")
    proc = subprocess.Popen(
        [WALSAGA, "demo", "--dir", str(directory), "--orders", "2", "--trips", "0", "--serve",
         "--port", "0"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    try:
        output = lambda: (directory / "demo.out").read_text()  # noqa: E731
        wait_until(lambda: "Serving" in output(), timeout_s=300, what="the demo to serve")
        api = next(
            line.split()[3] for line in output().splitlines() if "order service API" in line
        ).removesuffix("/orders")
        resp = httpx.post(f"{api}/orders", params={"wait": 20},
                          json={"customer_id": "carol", "total": 10}, timeout=30)  # fmt: skip
        assert resp.status_code == 200
        assert resp.json()["status"] == "APPROVED"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert "stopped in" in (directory / "demo.out").read_text()
    assert_all_gone(directory)


@pytest.mark.slow
def test_after_a_demo_killed_outright_the_next_run_stops_what_it_left(directory: Path) -> None:
    log = (directory / "killed.out").open("w")
    killed = subprocess.Popen(
        [WALSAGA, "demo", "--dir", str(directory), "--orders", "2", "--trips", "1", "--serve",
         "--port", "0"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    try:
        wait_until(
            lambda: "Serving" in (directory / "killed.out").read_text(),
            timeout_s=300,
            what="the demo to serve",
        )
        killed.send_signal(signal.SIGKILL)  # the demo alone: it stops nothing
        killed.wait(10)
    finally:
        if killed.poll() is None:
            killed.kill()
        log.close()
    left = {name: r for name, r in recorded(directory).items() if r.is_running()}
    assert {"relay", "order-service", "broker", "postgres-orders"} <= set(left), left

    out = run_demo(directory, "--orders", "2", "--trips", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    text = " ".join(out.stdout.split())
    assert f"an earlier demo in {directory} left {len(left)} processes running" in text
    for name, record in left.items():
        assert f"{name} (pid {record.pid})" in text
    assert "stopped what the earlier demo left running" in text
    assert "relay and services up" in text
    assert not [name for name, r in left.items() if r.is_running()]
    assert_all_gone(directory)
