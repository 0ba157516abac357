"""`walsaga demo`, the README's main command, in a short run: its summary (orders,
trips, registrations, and the checks against the mailbox, the identity provider and
the saga tracker), that with --serve the tracker and the console show every saga, the
compensated ones with their compensations, that nothing it started is left running
(not even after the demo itself was killed outright: the next run stops what it
left), that a process failing at start ends it with a message rather than a
traceback, and that root can run it from a private home."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from participants.examples import demo_registrations, embedded
from participants.examples.demo import DemoOptions, outside_clusters_dir
from participants.examples.processes import ProcessRecord, earlier_processes
from tests.support import WALSAGA, wait_until

#: What the demo starts besides Postgres, each recorded in pids.json.
PROCESSES = {
    "demo", "broker", "relay", "order-service", "customer-service", "flight-service",
    "hotel-service", "car-service", "trip-service", "intake-service", "identity-service",
    "notifier-service", "identity-provider", "mail-server", "tracker", "console",
}  # fmt: skip
#: The registrations of a run (the demo's default).
REGISTRATIONS = DemoOptions(Path()).registrations
#: The summary's registration rows.
REGISTERED = "REGISTERED"
AT_INTAKE = "REFUSED at intake: not an e-mail address"
BY_PROVIDER = "REFUSED by the provider: the address is registered already"
USER_DELETED = "COMPENSATED (user deleted): no such mailbox"
CLUSTERS = ("orders", "customers", "flight", "hotel", "car", "trip", "intake", "identity",
            "notifier")  # fmt: skip


def expected_registrations(n: int) -> Counter[str]:
    """The rows a batch of `n` registrations should end in, by what each submission is."""
    rows: Counter[str] = Counter()
    for submission in demo_registrations.batch(n, "tag").submissions:
        email = submission["email"]
        if "@" not in email:
            rows[AT_INTAKE] += 1
        elif email.startswith("taken-"):
            rows[BY_PROVIDER] += 1
        elif email.endswith("@bounce.example"):
            rows[USER_DELETED] += 1
        else:
            rows[REGISTERED] += 1
    return rows


@pytest.fixture
def directory() -> Iterator[Path]:
    """A demo directory, deleted afterwards (nine clusters are a few hundred MB)."""
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
    assert set(records) == PROCESSES | {f"postgres-{name}" for name in CLUSTERS}
    alive = {name: r.pid for name, r in records.items() if r.is_running()}
    assert not alive, f"left running: {alive}"
    assert not using(directory), f"left running: {using(directory)}"


def test_a_process_recorded_the_moment_it_starts_is_recognised_later() -> None:
    # Popen returns while the child may still be inside exec(), its arguments
    # not yet in place: a record taken then must still match the program. The
    # window is widest on busy cores, so keep both cores busy meanwhile.
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        for _ in range(100):
            child = subprocess.Popen(["sleep", "60"])
            try:
                record = ProcessRecord.of("relay", child.pid)
                assert record is not None and record.cmdline == ("sleep", "60")
                assert record.is_running()
            finally:
                child.kill()
                child.wait()
    finally:
        for hog in busy:
            hog.kill()
            hog.wait()


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


def summary(text: str) -> dict[tuple[str, str], str]:
    """The summary table's rows: (sagas, outcome) -> count (or a check's figures)."""
    rows = {}
    for line in text.splitlines():
        if line.count("│") >= 6:
            cells = [c.strip() for c in line.strip("│ ").split("│")]
            if cells[2]:
                rows[(cells[0], cells[1])] = cells[2]
    return rows


def counts(text: str, kind: str) -> Counter[str]:
    return Counter(
        {outcome: int(n) for (k, outcome), n in summary(text).items() if k == kind and n.isdigit()}
    )


def test_a_batch_of_registrations_ends_every_way_and_is_told_apart_by_its_reasons() -> None:
    batch = demo_registrations.batch(12, "1a2b3c")
    assert expected_registrations(12) == {REGISTERED: 8, USER_DELETED: 2, AT_INTAKE: 1,
                                          BY_PROVIDER: 1}  # fmt: skip
    assert batch.taken == ["taken-1a2b3c@example.com"]
    assert all(batch.ours(s["email"]) for s in batch.submissions if "@" in s["email"])
    assert not batch.ours("user-ffffff-1@example.com")
    assert demo_registrations.batch(2, "x").taken == []

    def result(status: str, reason: str | None = None, **more: Any) -> dict[str, Any]:
        return {"id": "r", "status": status, "reason": reason, "latency_s": 0.1, **more}

    bounced = ("user-1a2b3c-1@bounce.example: 5.1.1 <user-1a2b3c-1@bounce.example>: "
               "no such mailbox")  # fmt: skip
    rows = demo_registrations.grouped([
        result("REFUSED", bounced, user_created=True),
        result("REGISTERED"),
        result("REFUSED", "taken-1a2b3c@example.com is registered already"),
        result("REFUSED", "email: not an e-mail address", at_intake=True),
        result("REGISTERED"),
    ])  # fmt: skip
    assert [(text, len(latencies)) for text, latencies in rows] == [
        (REGISTERED, 2), (AT_INTAKE, 1), (BY_PROVIDER, 1), (USER_DELETED, 1)
    ]  # fmt: skip
    assert demo_registrations.tracker_status(result("REFUSED", at_intake=True)) == "COMPENSATED"
    assert demo_registrations.tracker_status(result("PENDING")) == "RUNNING"


def test_ports_for_servers_avoid_the_range_outgoing_connections_take_theirs_from() -> None:
    # A port of the ephemeral range, free when chosen, can become an outgoing
    # connection's source port before the server binds it ("address already
    # in use" when the demo's console started last). Chosen ports stay out of
    # it, are not handed out twice, and are free to bind.
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [embedded.free_port() for _ in range(300)]
    assert not [p for p in ports if low <= p <= high]
    assert len(set(ports)) == len(ports)
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_cluster_whose_chosen_port_is_taken_meanwhile_starts_on_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The port was free when chosen; something else listens on it by the time
    # the server binds it (a demo starts its clusters side by side).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        real = embedded.free_port
        monkeypatch.setattr(embedded, "free_port", lambda: next(ports, None) or real())
        base = Path(tempfile.mkdtemp(prefix="walsaga-port-"))
        base.chmod(0o755)
        cluster = embedded.LocalPostgres(base / "pg", durable=False)
        try:
            cluster.start()
            assert cluster.port != taken.getsockname()[1]
            with psycopg.connect(cluster.dsn("postgres")) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            cluster.stop()
            shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_the_demo_runs_sagas_prints_a_summary_and_leaves_nothing_running(directory: Path) -> None:
    out = run_demo(directory, "--orders", "16", "--trips", "6")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "relay and services up" in text
    assert "saga tracker and console up: http://127.0.0.1:" in text
    assert sum(counts(text, "orders").values()) == 16
    assert sum(counts(text, "trips").values()) == 6
    assert "APPROVED" in counts(text, "orders") and "CONFIRMED" in counts(text, "trips")
    registered = expected_registrations(REGISTRATIONS)
    assert counts(text, "registrations") == registered
    assert counts(text, "all") == {"FAILED (need a person)": 0}
    # What the mailbox and the provider hold agrees with the sagas' ends.
    rows = summary(text)
    n = registered[REGISTERED]
    assert rows[("check", "e-mails in the mailbox = REGISTERED")] == f"{n} = {n} ✓"
    assert rows[("check", "provider users = REGISTERED + 1 taken beforehand")] == (
        f"{n + 1} = {n} + 1 ✓")  # fmt: skip
    # The tracker has seen every saga end as the services say (so the console shows them).
    total = 16 + 6 + REGISTRATIONS
    assert rows[("tracker", "sagas shown ended as above")] == f"{total} of {total} ✓"
    assert "Where to look" in text and "stopped in" in text
    assert re.search(r"console +http://127\.0\.0\.1:\d+/ ", text)
    assert f"walsaga sagas list --config {directory / 'tracker.toml'}" in text
    assert "operator token" not in text
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


def where(output: str, name: str) -> str:
    """The address the demo's "Where to look" gives for `name`."""
    return next(line.split()[len(name.split())] for line in output.splitlines()
                if line.strip().startswith(f"{name} "))  # fmt: skip


@pytest.mark.slow
def test_serve_keeps_everything_up_until_ctrl_c_and_the_console_shows_every_saga(
    directory: Path,
) -> None:
    log = (directory / "demo.out").open("w")
    proc = subprocess.Popen(
        [WALSAGA, "demo", "--dir", str(directory), "--orders", "4", "--trips", "9", "--serve",
         "--port", "0"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    try:
        output = lambda: (directory / "demo.out").read_text()  # noqa: E731
        wait_until(lambda: "Serving" in output(), timeout_s=300, what="the demo to serve")
        text = output()
        trips = counts(text, "trips")
        registrations = counts(text, "registrations")
        assert trips["REJECTED"] >= 1, text

        # The tracker lists every saga of the run, each ended as the summary says
        # (an order's saga type comes from its orchestrator, mirrored each second).
        expected = Counter({
            ("create-order", "COMPLETED"): counts(text, "orders")["APPROVED"],
            ("create-order", "COMPENSATED"): counts(text, "orders")["REJECTED"],
            ("trip", "COMPLETED"): trips["CONFIRMED"],
            ("trip", "COMPENSATED"): trips["REJECTED"],
            ("registration", "COMPLETED"): registrations[REGISTERED],
            ("registration", "COMPENSATED"): REGISTRATIONS - registrations[REGISTERED],
        })  # fmt: skip

        def listed() -> list[dict[str, Any]]:
            done = subprocess.run(
                [WALSAGA, "sagas", "list", "--json", "--limit", "1000",
                 "--config", str(directory / "tracker.toml")],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)["sagas"]

        found: dict[str, list[dict[str, Any]]] = {"sagas": []}

        def ended() -> Counter[tuple[str, str]]:
            return Counter((s["type"], s["status"]) for s in found["sagas"])

        def every_saga_listed() -> bool:
            found["sagas"] = listed()
            return ended() == +expected  # + drops the zeros

        with contextlib.suppress(AssertionError):  # the assertion below says what differs
            wait_until(every_saga_listed, timeout_s=30, interval_s=1)
        assert ended() == +expected
        sagas = found["sagas"]
        assert len(sagas) == 4 + 9 + REGISTRATIONS

        # The console lists them, draws each compensated trip's compensations, and
        # the deletion (a compensating command) of each user whose e-mail bounced.
        console = where(text, "console").rstrip("/")
        page = httpx.get(f"{console}/sagas", params={"limit": 1000}, timeout=30)
        assert page.status_code == 200
        assert all(f'data-saga="{s["id"]}"' in page.text for s in sagas)
        drawn: dict[str, set[str]] = {}
        for saga in sagas:
            if saga["status"] == "COMPENSATED" and saga["type"] in ("trip", "registration"):
                shown = httpx.get(f"{console}/sagas/{saga['id']}", timeout=30)
                assert shown.status_code == 200
                kinds = re.findall(r'<g class="(message|note) compensation"', shown.text)
                drawn[saga["id"]] = set(kinds)
        compensated_trips = [s["id"] for s in sagas if s["type"] == "trip"
                             and s["status"] == "COMPENSATED"]  # fmt: skip
        assert all(drawn[trip] for trip in compensated_trips), drawn
        deleted = [i for i, kinds in drawn.items() if i not in compensated_trips
                   and "message" in kinds]  # fmt: skip
        assert len(deleted) == registrations[USER_DELETED]
        # The token printed is the console's: it opens the operator's actions.
        token = where(text, "operator token")
        login = httpx.post(f"{console}/login", data={"token": token}, timeout=30)
        assert login.status_code == 303, login.text

        api = where(text, "order service API").removesuffix("/orders")
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
    assert PROCESSES - {"demo"} <= set(left), left
    assert {f"postgres-{name}" for name in CLUSTERS} <= set(left), left

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
