"""The registration example running for a test: three databases, a relay, the
identity provider and the mail server, the services' handlers in threads and
their effect workers in threads or (to be killed) in processes."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import psycopg
from confluent_kafka import Producer

from participants.effects.worker import EffectWorker
from participants.examples.embedded import free_port, wait_for_port
from participants.examples.registration import identity, intake, notifier, saga
from participants.examples.registration.intake import Verdict
from participants.examples.registration.mailserver import MailServer
from participants.examples.registration.provider import Faults, Users, create_app
from participants.examples.registration.serving import Served
from participants.orchestrator import Orchestrator, saga_log
from participants.runtime import Participant
from tests.support import (
    WALSAGA,
    RelayProcess,
    consumer,
    create_topics,
    join_own_group,
    start_at_the_end,
    wait_all_assigned,
    wait_until,
)

SERVICES = ("intake", "identity", "notifier")


class Provider:
    """The identity provider: in this process, or a process a supervisor restarts
    whenever it exits (its ``crash_rate`` fault makes it exit)."""

    def __init__(self, tmp: Path, *, process: bool, faults: Faults | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.process = process
        self.crashes = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.served: Served | None = None
        self._faults: dict[str, float] = {}
        self._down = threading.Event()
        self._stop = threading.Event()
        self._held: socket.socket | None = None
        if not process:
            self.served = Served(create_app(Users(), faults), port=self.port).start()
        else:
            self._launch()
            self._supervisor = threading.Thread(target=self._supervise, daemon=True)
            self._supervisor.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _launch(self) -> None:
        log = (self.tmp / "provider.log").open("ab")
        self.proc = subprocess.Popen(
            [
                WALSAGA,
                "registration-service",
                "--service",
                "identity-provider",
                "--port",
                str(self.port),
                "--data",
                str(self.tmp / "provider"),
                "--log-level",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port(self.port, timeout_s=60)
        if self._faults:
            self.faults(**self._faults)

    def _supervise(self) -> None:
        while not self._stop.is_set():
            proc = self.proc
            if proc is not None and proc.poll() is not None and not self._down.is_set():
                self.crashes += 1
                self._launch()
            time.sleep(0.1)

    def faults(self, **changes: float) -> None:
        self._faults.update(changes)
        httpx.put(f"{self.url}/_faults", json=changes, timeout=10).raise_for_status()

    def users(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/users", timeout=30)
        answer.raise_for_status()
        users: list[dict[str, Any]] = answer.json()["users"]
        return users

    def down(self) -> None:
        """Stop the process (connections are refused) until :meth:`up`.

        The port stays taken meanwhile, by a socket that is bound but does not
        listen: another test's server started on it would take this test's
        calls, and answer for its users.
        """
        assert self.proc is not None
        self._down.set()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._held = socket.socket()
        self._held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._held.bind(("127.0.0.1", self.port))

    def up(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None
        self._launch()
        self._down.clear()

    def close(self) -> None:
        self._stop.set()
        if self.served is not None:
            self.served.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class WorkerProcess:
    """An effect worker as a process of its own, for ``kill -9``."""

    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [WALSAGA, *self.args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        out.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.kills += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Site:
    dsns: dict[str, str]
    broker: str
    relay: RelayProcess
    provider: Provider
    mail: MailServer
    orchestrator: Orchestrator
    tmp: Path
    participants: dict[str, Participant] = field(default_factory=dict)
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    workers: dict[str, EffectWorker] = field(default_factory=dict)
    processes: dict[str, WorkerProcess] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)

    # -- running -----------------------------------------------------------

    def start_handlers(self) -> None:
        kafka = {"bootstrap.servers": self.broker}
        self.participants["intake"] = intake.participant(
            dsn=self.dsns["intake"], kafka=kafka, orchestrator=self.orchestrator
        )
        self.participants["identity"] = identity.participant(dsn=self.dsns["identity"], kafka=kafka)
        self.participants["notifier"] = notifier.participant(dsn=self.dsns["notifier"], kafka=kafka)
        for name, p in self.participants.items():
            join_own_group(p, self.groups, self.broker)
            self.threads[name] = threading.Thread(target=p.run, name=name, daemon=True)
            self.threads[name].start()
        wait_all_assigned(self.participants, self.threads)

    def identity_settings(self) -> dict[str, Any]:
        """Quicker than the defaults: the provider abandons requests after 3 s."""
        return {
            "create_user": {
                "timeout_s": 1.0,
                "settle_s": 3.5,
                "retry": {"min_s": 0.2, "max_s": 3.0},
            },
            "delete_user": {"timeout_s": 1.0, "retry": {"min_s": 0.2, "max_s": 3.0}},
        }

    def start_workers(self, *, notifier_give_up_s: float = 900.0) -> None:
        """The two effect workers in threads of this process."""
        from participants.effects.model import EffectRetry

        self.workers["identity"] = identity.effect_worker(
            self.dsns["identity"],
            self.provider.url,
            effect=self.identity_settings(),
            poll_interval_s=0.2,
        )
        self.workers["notifier"] = notifier.effect_worker(
            dsn=self.dsns["notifier"],
            smtp_host="127.0.0.1",
            smtp_port=self.mail.smtp_port,
            archive_url=self.mail.archive_url,
            poll_interval_s=0.2,
            target_settings={
                "timeout_s": 2.0,
                "settle_s": 1.0,
                "retry": EffectRetry(min_s=0.2, max_s=2.0, give_up_after_s=notifier_give_up_s),
            },
        )
        for name, worker in self.workers.items():
            thread = threading.Thread(target=worker.run, name=f"{name}-effects", daemon=True)
            thread.start()
            self.threads[f"{name}-effects"] = thread

    def start_worker_processes(self) -> None:
        """The effect workers as processes: identity's through ``walsaga effects``
        (its declared file), the notifier's through ``walsaga registration-service``."""
        env = {
            "WALSAGA_EFFECTS__DSN": self.dsns["identity"],
            "WALSAGA_EFFECTS__POLL_INTERVAL_S": "0.2",
            "WALSAGA_VARS__PROVIDER": self.provider.url,
            "WALSAGA_EFFECT__CREATE_USER__TIMEOUT_S": "1.0",
            "WALSAGA_EFFECT__CREATE_USER__SETTLE_S": "3.5",
            "WALSAGA_EFFECT__CREATE_USER__RETRY__MAX_S": "3.0",
            "WALSAGA_EFFECT__DELETE_USER__TIMEOUT_S": "1.0",
            "WALSAGA_EFFECT__DELETE_USER__RETRY__MAX_S": "3.0",
        }
        self.processes["identity"] = WorkerProcess(
            ["effects", "--config", str(identity.EFFECTS)], env, self.tmp / "identity-effects.log"
        )
        self.processes["notifier"] = WorkerProcess(
            [
                "registration-service",
                "--service",
                "notifier",
                "--role",
                "effects",
                "--dsn",
                self.dsns["notifier"],
                "--smtp-port",
                str(self.mail.smtp_port),
                "--mail-archive",
                self.mail.archive_url,
            ],
            {},
            self.tmp / "notifier-effects.log",
        )
        for process in self.processes.values():
            process.start()

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        for participant in self.participants.values():
            participant.stop()
        for process in self.processes.values():
            process.kill()
        for thread in self.threads.values():
            thread.join(30)
        self.relay.kill()
        self.provider.close()
        self.mail.stop()

    # -- registrations -----------------------------------------------------

    def submit(self, submission: Any) -> tuple[str, Verdict]:
        with psycopg.connect(self.dsns["intake"]) as conn:
            return intake.submit(conn, submission, orchestrator=self.orchestrator)

    def statuses(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        with psycopg.connect(self.dsns["intake"], autocommit=True) as conn:
            found = {i: intake.status(conn, i) for i in ids}
        return {i: s for i, s in found.items() if s is not None}

    def wait_ended(self, ids: list[str], timeout_s: float = 90) -> dict[str, dict[str, Any]]:
        def ended() -> dict[str, dict[str, Any]] | None:
            found = self.statuses(ids)
            done = len(found) == len(ids) and all(s["status"] != "PENDING" for s in found.values())
            return found if done else None

        try:
            return wait_until(ended, timeout_s=timeout_s, interval_s=0.2)  # type: ignore[no-any-return]
        except AssertionError as e:
            raise AssertionError(f"{e}; sagas by status: {dict(self._pending(ids))}") from None

    def _pending(self, ids: list[str]) -> Counter[str]:
        return Counter(s["saga"] for s in self.statuses(ids).values())

    def log(self, registration_id: str) -> list[tuple[str, str | None, dict[str, Any]]]:
        with psycopg.connect(self.dsns["intake"], autocommit=True) as conn:
            return saga_log(conn, registration_id)

    def query(self, service: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsns[service], autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def mails(self) -> list[EmailMessage]:
        return self.mail.box.messages()

    def assert_consistent(self, statuses: dict[str, dict[str, Any]]) -> None:
        """The databases, the provider and the mailbox agree with every saga's end."""
        users = self.provider.users()
        by_key = Counter(u["external_key"] for u in users)
        mails = Counter(str(m["X-Registration-Id"]) for m in self.mails())
        kept = dict(
            self.query("identity", "SELECT registration_id, provider_user_id FROM provider_users")
        )
        welcomed = dict(
            self.query("notifier", "SELECT registration_id, template_id FROM welcome_emails")
        )
        for registration_id, status in statuses.items():
            if status["status"] == "REGISTERED":
                assert by_key[registration_id] == 1, (
                    registration_id,
                    status,
                    by_key[registration_id],
                )
                assert mails[registration_id] == 1, (registration_id, mails[registration_id])
                assert kept.get(registration_id) == status["provider_user_id"], registration_id
                assert registration_id in welcomed
            else:
                assert status["status"] == "REFUSED", status
                assert by_key[registration_id] == 0, (registration_id, status)
                assert mails[registration_id] == 0, (registration_id, status)
                assert registration_id not in kept
        strangers = {k for k in by_key if k not in set(statuses) and k not in (None, "preexisting")}
        assert not strangers, f"provider users of registrations never made: {strangers}"
        live = self.query(
            "identity",
            "SELECT count(*) FROM walsaga.effect WHERE status NOT IN ('DONE', 'REFUSED', 'FAILED')",
        )
        assert live == [(0,)], live


def submission(i: int, rng: random.Random | None = None, **overrides: Any) -> dict[str, Any]:
    locale = ("en", "pt", "de")[i % 3]
    base = {
        "email": f"  User{i}@Example.COM ",
        "name": f" user   {i} ",
        "locale": locale,
        "accept_terms": True,
    }
    return {**base, **overrides}


@contextmanager
def running_registration(
    tmp_path: Path,
    make_database: Any,
    broker: str,
    *,
    provider_process: bool = False,
    workers: str = "threads",
    notifier_give_up_s: float = 900.0,
) -> Iterator[Site]:
    dsns = {name: make_database(name) for name in SERVICES}
    with psycopg.connect(dsns["intake"]) as conn:
        intake.install(conn)
    with psycopg.connect(dsns["identity"]) as conn:
        identity.install(conn)
    with psycopg.connect(dsns["notifier"]) as conn:
        notifier.install(conn)
    create_topics(broker, list(saga.TOPICS), partitions=4)
    relay = RelayProcess.start(
        tmp_path, bootstrap=broker, sources=dsns, name=f"relay-{uuid.uuid4().hex[:6]}"
    )
    provider = Provider(tmp_path, process=provider_process)
    mail = MailServer(tmp_path / "mail", smtp_port=free_port(), archive_port=free_port()).start()
    site = Site(dsns, broker, relay, provider, mail, intake.orchestrator(), tmp_path)
    try:
        for name in SERVICES:
            relay.wait_streaming(name)
        site.start_handlers()
        if workers == "threads":
            site.start_workers(notifier_give_up_s=notifier_give_up_s)
        elif workers == "processes":
            site.start_worker_processes()
        yield site
    finally:
        site.close()


@contextmanager
def duplicating(broker: str, topics: list[str]) -> Iterator[Counter[str]]:
    """Every record of `topics` produced a second time (same key, value and headers)
    while the block runs; yields a count of copies per topic."""
    copies: Counter[str] = Counter()
    stop = threading.Event()

    group = f"duplicator-{uuid.uuid4().hex[:8]}"
    start_at_the_end(broker, group, topics)  # not what earlier tests left on the topics

    def run() -> None:
        c = consumer(broker, topics, **{"group.id": group})
        producer = Producer({"bootstrap.servers": broker, "linger.ms": 5})
        try:
            while not stop.is_set():
                for record in c.consume(500, 0.2):
                    if record.error() is not None:
                        continue
                    headers = list(record.headers() or [])
                    if any(name == "test-copy" for name, _ in headers):
                        continue
                    producer.produce(
                        record.topic(),
                        record.value(),
                        record.key(),
                        headers=[*headers, ("test-copy", b"1")],
                    )
                    copies[record.topic()] += 1
                producer.poll(0)
        finally:
            producer.flush(10)
            c.close()

    thread = threading.Thread(target=run, name="duplicator", daemon=True)
    thread.start()
    try:
        yield copies
    finally:
        stop.set()
        thread.join(30)
