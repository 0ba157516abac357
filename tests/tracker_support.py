"""What the tracker, `walsaga sagas` and console tests share: a tracker config, the tracker
in a thread, and a saga whose compensation can be made to fail (the vault).

The vault saga's definition is importable (``tests.tracker_support:VAULT_SAGAS``)
so that `walsaga sagas retry` in a subprocess can load it; its topics are
named by ``WALSAGA_TEST_VAULT`` (set per test, so tests do not share topics).
"""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg

from participants.handlers import HandlerContext
from participants.message import Message
from participants.orchestrator import Orchestrator
from participants.runtime import Participant, set_trace
from participants.saga import Command, RetryPolicy, Saga, Step
from participants.tracker import Tracker
from participants.tracker_config import load_tracker_config
from tests.support import WALSAGA, RelayProcess, create_topics, start_at_the_end, wait_until
from walsaga import schema
from walsaga.config import write_toml
from walsaga.errors import BusinessError
from walsaga.tracing import TraceContext

#: The order example's saga type in a choreography, as a tracker config names it.
ORDER_SAGA = {
    "type": "order",
    "started_by": ["OrderCreated"],
    "completed_by": ["OrderApproved"],
    "compensated_by": ["OrderRejected"],
    "compensations": ["CreditReleased", "CreditReservationExpired"],
}


def tracker_toml(
    path: Path,
    *,
    dsn: str,
    broker: str,
    topics: list[str],
    sagas: list[dict[str, Any]] | None = None,
    orchestrators: list[dict[str, Any]] | None = None,
    tracker: dict[str, Any] | None = None,
    console: dict[str, Any] | None = None,
    relay_sources: list[dict[str, Any]] | None = None,
) -> Path:
    data: dict[str, Any] = {
        "tracker": {
            "name": f"tracker-{uuid.uuid4().hex[:6]}",
            "dsn": dsn,
            "topics": topics,
            "sync_every_s": 0.2,
            "gauges_every_s": 0.5,
            **(tracker or {}),
        },
        "kafka": {"bootstrap.servers": broker},
        "saga": sagas or [],
        "orchestrator": orchestrators or [],
        "relay_source": relay_sources or [],
    }
    if console:
        data["console"] = console
    return write_toml(path, data)


@contextmanager
def running_tracker(config_path: Path) -> Iterator[Tracker]:
    """The tracker of `config_path` in a thread, until the block ends."""
    config = load_tracker_config(config_path)
    start_at_the_end(config.kafka["bootstrap.servers"], config.tracker.name, config.tracker.topics)
    tracker = Tracker(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            tracker.run()
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=run, name="tracker", daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: tracker.participant.ready.is_set() or not thread.is_alive(),
            timeout_s=60,
            what="the tracker's partitions",
        )
        assert not failure, failure
        yield tracker
    finally:
        tracker.stop()
        thread.join(30)
    if failure:
        raise failure[0]


def sagas_cli(config: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """`walsaga sagas ARGS --json --config CONFIG`, its JSON answer (or a failure)."""
    out = subprocess.run(
        [WALSAGA, "sagas", *args, "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, f"walsaga sagas {' '.join(args)}: {out.stderr}{out.stdout}"
    return orjson.loads(out.stdout)


def tracked(dsn: str, saga_id: str) -> dict[str, Any] | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT status, saga_type, orchestrator, ended_at IS NULL AND deadline < now(), "
            "events FROM walsaga.tracked_saga WHERE id = %s",
            (saga_id,),
        ).fetchone()
    if row is None:
        return None
    return dict(zip(("status", "type", "orchestrator", "stuck", "events"), row, strict=True))


# -- the vault: a saga whose compensation keeps failing until told otherwise ----------


def vault_name() -> str:
    return os.environ.get("WALSAGA_TEST_VAULT", "opsvault")


def vault_saga(name: str) -> Saga:
    undo = Command(f"{name}-commands", "GiveBack", lambda d: d["id"])
    return Saga(
        "vault",
        (
            Step("take", command=Command(f"{name}-commands", "Take", lambda d: d["id"]),
                 reply_topic=name, success=("Taken",), compensation=undo,
                 compensated=("GivenBack",), compensation_failed=("GiveBackRefused",),
                 compensation_retry=RetryPolicy(max_attempts=2, backoff_s=0.2), timeout_s=5),
            Step("check", command=Command(f"{name}-commands", "Check", lambda d: d["id"]),
                 reply_topic=name, success=("Checked",), failure=("CheckRefused",),
                 timeout_s=30),
        ),
    )  # fmt: skip


VAULT_SAGAS = [vault_saga(vault_name())]


@dataclass
class Vault:
    """Two databases (the vault service's, the orchestrator's), the vault service and
    the orchestrator, in threads. ``refusals[saga]`` GiveBacks are refused, then
    they succeed; ``checks[saga]`` says how Check is answered: "ok", "refuse"
    (the default) or "ignore" (never: the saga waits)."""

    name: str
    vault_dsn: str
    saga_dsn: str
    broker: str
    refusals: dict[str, int] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)
    participants: list[Participant] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    relay: RelayProcess | None = None

    @property
    def topics(self) -> list[str]:
        return [self.name, f"{self.name}-commands", "walsaga.operator"]

    def start(self) -> None:
        with psycopg.connect(self.vault_dsn) as conn:
            schema.apply(conn, "core")
            conn.execute("CREATE TABLE taken (saga_id text PRIMARY KEY)")
        with psycopg.connect(self.saga_dsn) as conn:
            schema.apply(conn, "core")
            schema.apply(conn, "saga")
        create_topics(self.broker, self.topics, partitions=2)
        service = Participant(self.name, dsn=self.vault_dsn, kafka=self.kafka)
        commands = f"{self.name}-commands"

        @service.on(commands, "Take")
        def take(ctx: HandlerContext, message: Message) -> None:
            ctx.execute("INSERT INTO taken VALUES (%s)", (message.saga_id,))
            ctx.publish(self.name, message.saga_id or "", "Taken", {})

        @service.on(commands, "Check", failure_type="CheckRefused", failure_topic=self.name)
        def check(ctx: HandlerContext, message: Message) -> None:
            answer = self.checks.get(message.saga_id or "", "refuse")
            if answer == "refuse":
                raise BusinessError("check refused")
            if answer == "ok":
                ctx.publish(self.name, message.saga_id or "", "Checked", {})

        @service.on(commands, "GiveBack", failure_type="GiveBackRefused", failure_topic=self.name)
        def give_back(ctx: HandlerContext, message: Message) -> None:
            saga_id = message.saga_id or ""
            if self.refusals.get(saga_id, 0) > 0:
                self.refusals[saga_id] -= 1
                raise BusinessError("the vault is jammed")
            ctx.execute("DELETE FROM taken WHERE saga_id = %s", (saga_id,))
            ctx.publish(self.name, saga_id, "GivenBack", {})

        self.orchestrator = Orchestrator([vault_saga(self.name)], name="vault-orchestrator")
        runner = Participant(f"{self.name}-orchestrator", dsn=self.saga_dsn, kafka=self.kafka)
        self.orchestrator.attach(runner)
        self.service = service
        for p in (service, runner):
            self.run(p)

    @property
    def kafka(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.broker}

    def run(self, participant: Participant) -> None:
        thread = threading.Thread(target=participant.run, name=participant.name, daemon=True)
        thread.start()
        self.participants.append(participant)
        self.threads.append(thread)
        wait_until(participant.ready.is_set, timeout_s=60, what=f"{participant.name} ready")

    def stop_service(self) -> None:
        self.service.stop()
        index = self.participants.index(self.service)
        self.threads[index].join(30)

    def begin(self, saga_id: str, *, trace: TraceContext | None = None) -> None:
        with psycopg.connect(self.saga_dsn) as conn:
            if trace is not None:
                set_trace(conn, trace)
            self.orchestrator.start(conn, "vault", saga_id, {"id": saga_id}, trace=trace)

    def status(self, saga_id: str) -> str | None:
        with psycopg.connect(self.saga_dsn) as conn:
            row = conn.execute("SELECT status FROM walsaga.saga WHERE id = %s",
                               (saga_id,)).fetchone()  # fmt: skip
        return row[0] if row else None

    def wait_status(self, saga_id: str, *statuses: str, timeout_s: float = 60) -> str:
        return wait_until(  # type: ignore[no-any-return]
            lambda: (s := self.status(saga_id)) in statuses and s,
            timeout_s=timeout_s,
            what=f"saga {saga_id} {' or '.join(statuses)} (is {self.status(saga_id)})",
        )

    def taken(self) -> set[str]:
        with psycopg.connect(self.vault_dsn) as conn:
            return {r[0] for r in conn.execute("SELECT saga_id FROM taken")}

    def orchestrator_config(self) -> dict[str, Any]:
        return {
            "name": "vault-orchestrator",
            "dsn": self.saga_dsn,
            "source": "sagas",
            "definitions": ["tests.tracker_support:VAULT_SAGAS"],
        }

    def close(self) -> None:
        for p in self.participants:
            p.stop()
        for t in self.threads:
            t.join(30)


@contextmanager
def running_vault(
    tmp_path: Path, make_database: Any, broker: str, monkeypatch: Any
) -> Iterator[Vault]:
    """The vault and a relay of its two databases; its saga definition importable."""
    name = f"vault{uuid.uuid4().hex[:6]}"
    vault = Vault(name, make_database("vault"), make_database("sagas"), broker)
    vault.start()
    sources = {"vault": vault.vault_dsn, "sagas": vault.saga_dsn}
    relay = RelayProcess.start(tmp_path, bootstrap=broker, sources=sources)
    monkeypatch.setenv("WALSAGA_TEST_VAULT", vault.name)
    vault.relay = relay
    try:
        relay.wait_streaming("vault")
        relay.wait_streaming("sagas")
        yield vault
    finally:
        vault.close()
        relay.kill()


def vault_config(
    tmp_path: Path, make_database: Any, broker: str, vault: Vault, **more: Any
) -> Path:
    """A tracker.toml following the vault's topics, its orchestrator configured."""
    return tracker_toml(
        tmp_path / "tracker.toml",
        dsn=make_database("tracker"),
        broker=broker,
        topics=vault.topics,
        sagas=[{"type": "vault", "deadline_s": 120}],
        orchestrators=[vault.orchestrator_config()],
        **more,
    )


@dataclass
class ConsoleProcess:
    """`walsaga console` in a subprocess; its URL read from what it prints."""

    config: Path
    log: Path
    token: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self) -> ConsoleProcess:
        args = [WALSAGA, "console", "--config", str(self.config), "--port", "0"]
        env = dict(os.environ)
        if self.token is not None:
            env["TEST_OPERATOR_TOKEN"] = self.token
            args += ["--operator-token-env", "TEST_OPERATOR_TOKEN"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        found = wait_until(
            lambda: self._url() or (self.proc is not None and self.proc.poll() is not None),
            timeout_s=60,
            what="the console's URL",
        )
        assert isinstance(found, str), f"the console exited:\n{self.read_log()}"
        self.url = found.rstrip("/")
        wait_until(self._healthy, timeout_s=30, what="the console healthy")
        return self

    def _url(self) -> str | None:
        for line in self.read_log().splitlines():
            if line.startswith("walsaga console: http://"):
                return line.split()[2]
        return None

    def _healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
