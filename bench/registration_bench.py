"""Registration benchmark: time from submission to the welcome e-mail, at a steady rate.

The whole registration example on this machine: one Postgres cluster holding
the intake, identity and notifier databases, the embedded broker, `walsaga
relay` (three sources), the identity provider and the mail server, and the
three services (`walsaga registration-service`, each with its handlers and
its effect worker), every one a process of its own. Registrations are posted
to intake's API at a fixed rate; each is measured from the moment its
request is sent to the moment the mail server accepted its welcome e-mail
(two effects, four commands and replies through the relay on the way).

    .venv/bin/python bench/registration_bench.py [--rate 10] [--seconds 30]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from participants.examples.embedded import EmbeddedBroker, LocalPostgres, free_port, wait_for_port
from participants.examples.registration import identity, intake, notifier
from walsaga.config import write_toml

WALSAGA = str(Path(sys.executable).parent / "walsaga")
SERVICES = ("intake", "identity", "notifier")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=10.0, help="registrations per second")
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="walsaga-registration-bench-"))
    base.chmod(0o755)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    cluster = LocalPostgres(base / "pg", durable=True)
    broker = EmbeddedBroker(logfile=base / "broker.log")
    try:
        cluster.start()
        broker.start()
        dsns = {name: cluster.create_database(name) for name in SERVICES}
        import psycopg

        for name, install in (
            ("intake", intake.install),
            ("identity", identity.install),
            ("notifier", notifier.install),
        ):
            with psycopg.connect(dsns[name]) as conn:
                install(conn)
        ports = {name: free_port() for name in ("intake", "provider", "smtp", "archive")}

        def spawn(name: str, *argv: str) -> None:
            log = (base / f"{name}.log").open("ab")
            procs[name] = subprocess.Popen([WALSAGA, *argv], stdout=log, stderr=subprocess.STDOUT)
            log.close()

        relay = write_toml(
            base / "relay.toml",
            {
                "kafka": {"bootstrap.servers": broker.bootstrap_servers},
                "relay": {"http_port": free_port(), "http_host": "127.0.0.1"},
                "source": [{"name": n, "dsn": d} for n, d in dsns.items()],
            },
        )
        spawn("relay", "relay", "--config", str(relay))
        spawn(
            "provider",
            "registration-service",
            "--service",
            "identity-provider",
            "--port",
            str(ports["provider"]),
            "--data",
            str(base / "data"),
            "--log-level",
            "warning",
        )
        spawn(
            "mail",
            "registration-service",
            "--service",
            "mail-server",
            "--smtp-port",
            str(ports["smtp"]),
            "--port",
            str(ports["archive"]),
            "--data",
            str(base / "data"),
        )
        common = ("--bootstrap-servers", broker.bootstrap_servers, "--log-level", "warning")
        spawn(
            "intake",
            "registration-service",
            "--service",
            "intake",
            "--dsn",
            dsns["intake"],
            "--port",
            str(ports["intake"]),
            *common,
        )
        spawn(
            "identity",
            "registration-service",
            "--service",
            "identity",
            "--dsn",
            dsns["identity"],
            "--provider-url",
            f"http://127.0.0.1:{ports['provider']}",
            *common,
        )
        spawn(
            "notifier",
            "registration-service",
            "--service",
            "notifier",
            "--dsn",
            dsns["notifier"],
            "--smtp-port",
            str(ports["smtp"]),
            "--mail-archive",
            f"http://127.0.0.1:{ports['archive']}",
            *common,
        )
        for port in ports.values():
            wait_for_port(port, timeout_s=120)
        api = f"http://127.0.0.1:{ports['intake']}/registrations"
        archive = f"http://127.0.0.1:{ports['archive']}/messages"

        ids: dict[str, str] = {}

        client = httpx.Client(timeout=30)  # a frontend keeps its connections

        def post(i: int) -> float:
            sent = time.time()
            answer = client.post(
                api,
                json={"email": f"bench{i}@example.com", "name": f"Bench {i}", "accept_terms": True},
                timeout=30,
            )
            answer.raise_for_status()
            ids[f"bench{i}@example.com"] = answer.json()["id"]
            return sent

        print("warming up (consumer groups joining) ...")
        warm = post(-1)
        deadline = time.monotonic() + 120
        while not _received(archive) and time.monotonic() < deadline:
            time.sleep(0.2)
        print(f"  first welcome e-mail after {time.time() - warm:.1f} s")
        total = int(args.rate * args.seconds)
        print(f"steady phase: {args.rate:g} registrations/s for {args.seconds:g} s ({total}) ...")
        submitted: dict[str, float] = {}
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = {}
            for i in range(total):
                pause = start + i / args.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                futures[f"bench{i}@example.com"] = pool.submit(post, i)
            for address, future in futures.items():
                submitted[address] = future.result()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            received = _received(archive)
            if sum(1 for a in submitted if a in received) == total:
                break
            time.sleep(0.5)
        latencies = sorted((received[a] - submitted[a]) * 1000 for a in submitted if a in received)
        print()
        print(f"welcome e-mails received: {len(latencies)} of {total}")
        if latencies:
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
            print(
                f"submission -> welcome e-mail at {args.rate:g}/s: "
                f"p50 {statistics.median(latencies):.0f} ms, p99 {p99:.0f} ms, "
                f"max {latencies[-1]:.0f} ms"
            )
        _breakdown(dsns, {ids[a]: submitted[a] for a in submitted}, received, ids)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def _breakdown(
    dsns: dict[str, str],
    submitted: dict[str, float],
    received: dict[str, float],
    ids: dict[str, str],
) -> None:
    """Where the time went, stage by stage (medians, ms)."""
    import psycopg

    def times(service: str, sql: str) -> dict[str, float]:
        with psycopg.connect(dsns[service]) as conn:
            return {k: float(t) for k, t in conn.execute(sql).fetchall()}

    started = times("intake", "SELECT id, extract(epoch FROM created_at) FROM walsaga.saga")
    created = times(
        "identity",
        "SELECT payload->>'registration_id', extract(epoch FROM "
        "created_at) FROM walsaga.effect WHERE target = 'create_user'",
    )
    user_done = times(
        "identity",
        "SELECT payload->>'registration_id', extract(epoch FROM "
        "ended_at) FROM walsaga.effect WHERE target = 'create_user'",
    )
    replied = times(
        "intake",
        "SELECT saga_id, extract(epoch FROM min(at)) FROM walsaga.saga_log "
        "WHERE kind = 'REPLY' AND step = 'create-user' GROUP BY saga_id",
    )
    asked = times(
        "notifier",
        "SELECT payload->>'registration_id', extract(epoch FROM created_at) FROM walsaga.effect",
    )
    sent = times(
        "notifier",
        "SELECT payload->>'registration_id', extract(epoch FROM ended_at) FROM walsaga.effect",
    )
    mailed = {ids[a]: t for a, t in received.items() if a in ids}
    stages = [
        ("submitted -> saga started (intake)", submitted, started),
        ("-> CreateUser handled, effect requested (relay, identity)", started, created),
        ("-> user created at the provider (identity's effect worker)", created, user_done),
        ("-> UserCreated taken by the saga (relay, intake)", user_done, replied),
        ("-> SendWelcome handled, effect requested (relay, notifier)", replied, asked),
        ("-> e-mail sent (notifier's effect worker)", asked, sent),
        ("-> e-mail in the mailbox", sent, mailed),
    ]
    print("where the time went (ms: median, p99):")
    for label, before, after in stages:
        gaps = sorted(
            (after[k] - before[k]) * 1000 for k in submitted if k in before and k in after
        )
        if gaps:
            p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]
            print(f"  {label}: {statistics.median(gaps):.0f}, {p99:.0f}")


def _received(archive: str) -> dict[str, float]:
    """Recipient -> when its first welcome e-mail arrived (epoch seconds)."""
    try:
        messages = httpx.get(archive, timeout=10).json()["messages"]
    except (httpx.HTTPError, KeyError, ValueError):
        return {}
    return {m["to"]: m["received_at"] for m in messages}


if __name__ == "__main__":
    main()
