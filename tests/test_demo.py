"""`walsaga demo`, the README's main command, in a short run: its summary, that
nothing it started is left running, that a process failing at start ends it with
a message rather than a traceback, and that root can run it from a private home."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from participants.examples.demo import outside_clusters_dir
from tests.support import WALSAGA, wait_until

pytestmark = pytest.mark.slow


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


def assert_all_gone(directory: Path) -> None:
    pids = json.loads((directory / "pids.json").read_text())
    assert {"relay", "order-service", "customer-service", "broker"} <= set(pids)
    assert any(name.startswith("postgres-") for name in pids)
    alive = {name: pid for name, pid in pids.items() if Path(f"/proc/{pid}").exists()}
    assert not alive, f"left running: {alive}"


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
    assert "Where to look" in text and "stopped." in text
    assert f"clusters in {directory / 'postgres'} " in text
    assert_all_gone(directory)


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
    assert "stopped." in out.stdout
    assert_all_gone(directory)


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
    time.sleep(0.5)
    assert "stopped." in (directory / "demo.out").read_text()
    assert_all_gone(directory)
