"""`walsaga demo`, the README's main command, in a short run: its summary, and
that nothing it started is left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.support import WALSAGA, wait_until

pytestmark = pytest.mark.slow


def demo_dir() -> Path:
    # Postgres runs as an unprivileged user that must be able to reach it.
    path = Path(tempfile.mkdtemp(prefix="walsaga-test-demo-"))
    path.chmod(0o755)
    return path


def assert_all_gone(directory: Path) -> None:
    pids = json.loads((directory / "pids.json").read_text())
    assert {"relay", "order-service", "customer-service", "broker"} <= set(pids)
    assert any(name.startswith("postgres-") for name in pids)
    alive = {name: pid for name, pid in pids.items() if Path(f"/proc/{pid}").exists()}
    assert not alive, f"left running: {alive}"


def test_the_demo_runs_sagas_prints_a_summary_and_leaves_nothing_running() -> None:
    directory = demo_dir()
    out = subprocess.run(
        [WALSAGA, "demo", "--dir", str(directory), "--orders", "16", "--trips", "6",
         "--port", "0"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
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
    assert_all_gone(directory)


def test_serve_keeps_everything_up_until_ctrl_c() -> None:
    directory = demo_dir()
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
