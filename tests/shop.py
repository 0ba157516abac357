"""The order + customer example running for a test: two databases, a relay,
the legacy customer service (declarative handlers) and the order service."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from participants import declarative
from participants.examples import customers, orders
from participants.examples.embedded import free_port
from participants.orchestrator import Orchestrator
from participants.runtime import Participant
from participants.saga import Saga
from tests.support import (
    WALSAGA,
    RelayProcess,
    create_topics,
    join_own_group,
    own_group,
    wait_all_assigned,
    wait_until,
)

TOPICS = [orders.ORDER_TOPIC, orders.CUSTOMER_TOPIC, orders.CUSTOMER_COMMANDS]


class SimulatedCrash(BaseException):
    """Ends a participant's loop like a kill: nothing after it runs, nothing commits."""


def crash_after_handling(participant: Participant, probability: float, seed: int = 11) -> None:
    rng = random.Random(seed)
    for i, route in enumerate(participant.routes):

        def handler(ctx: Any, message: Any, inner: Any = route.handler) -> None:
            inner(ctx, message)
            if rng.random() < probability:
                raise SimulatedCrash

        participant.routes[i] = dataclasses.replace(route, handler=handler)


@dataclass
class Shop:
    orders_dsn: str
    customers_dsn: str
    broker: str
    mode: orders.Mode
    relay: RelayProcess
    orchestrator: Orchestrator | None
    participants: dict[str, Participant] = field(default_factory=dict)
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    crashes: int = 0

    def start_participant(self, name: str, *, crash_probability: float = 0.0) -> Participant:
        """(Re)start one of the two services in a thread of its own.

        With `crash_probability`, each handled record may kill the service
        after its handler ran and before the transaction commits.
        """
        kafka = {"bootstrap.servers": self.broker}
        if name == "customer-service":
            participant = declarative.build(customers.config(self.customers_dsn, self.broker))
        else:
            participant = orders.participant(
                dsn=self.orders_dsn, kafka=kafka, mode=self.mode, orchestrator=self.orchestrator
            )
        join_own_group(participant, self.groups, self.broker)
        if crash_probability:
            crash_after_handling(participant, crash_probability, seed=self.crashes * 31 + len(name))

        def run() -> None:
            try:
                participant.run()
            except SimulatedCrash:
                self.crashes += 1

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self.participants[name] = participant
        self.threads[name] = thread
        return participant

    def restart_crashed(self, crash_probability: float = 0.0) -> int:
        """Start again every service whose thread died; returns how many."""
        dead = [n for n, t in self.threads.items() if not t.is_alive()]
        for name in dead:
            self.start_participant(name, crash_probability=crash_probability)
        return len(dead)

    def stop_participant(self, name: str) -> None:
        self.participants[name].stop()
        self.threads[name].join(30)

    def wait_ready(self) -> None:
        wait_all_assigned(self.participants, self.threads)

    def order(self, customer_id: str, total: float) -> str:
        with psycopg.connect(self.orders_dsn) as conn:
            return orders.create_order(
                conn, customer_id, total, mode=self.mode, orchestrator=self.orchestrator
            )

    def statuses(self, ids: list[str]) -> dict[str, str]:
        with psycopg.connect(self.orders_dsn) as conn:
            rows = conn.execute(
                "SELECT id, status FROM orders WHERE id = ANY(%s)", (ids,)
            ).fetchall()
        return dict(rows)

    def wait_settled(self, ids: list[str], timeout_s: float = 60) -> dict[str, str]:
        def settled() -> dict[str, str] | None:
            found = self.statuses(ids)
            return found if all(s != "PENDING" for s in found.values()) else None

        return wait_until(settled, timeout_s=timeout_s, interval_s=0.1,  # type: ignore[no-any-return]
                          what="every order approved or rejected")  # fmt: skip

    def reservations(self) -> dict[str, tuple[str, float, str]]:
        with psycopg.connect(self.customers_dsn) as conn:
            rows = conn.execute(
                "SELECT order_id, customer_id, amount, status FROM credit_reservations"
            ).fetchall()
        return {r[0]: (r[1], float(r[2]), r[3]) for r in rows}

    def assert_consistent(self, timeout_s: float = 30) -> None:
        """The two databases agree (once in-flight confirmations land): no half-done
        saga, no customer over the limit."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._check_consistent()
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _check_consistent(self) -> None:
        with psycopg.connect(self.orders_dsn) as conn:
            order_rows = conn.execute(
                "SELECT id, customer_id, total, status FROM orders"
            ).fetchall()
        reservations = self.reservations()
        for order_id, customer_id, total, status in order_rows:
            held = reservations.get(order_id)
            if status == "APPROVED":
                assert held is not None and held[2] == "CONFIRMED", (order_id, held)
                assert held[0] == customer_id and held[1] == float(total)
            elif status == "REJECTED":
                assert held is None or held[2] in ("REJECTED", "RELEASED", "EXPIRED"), (
                    order_id, held)  # fmt: skip
            else:
                raise AssertionError(f"order {order_id} still {status}")
        with psycopg.connect(self.customers_dsn) as conn:
            over = conn.execute(
                """
                SELECT c.id, c.credit_limit, sum(r.amount) FROM customers c
                JOIN credit_reservations r ON r.customer_id = c.id
                WHERE r.status IN ('RESERVED', 'CONFIRMED')
                GROUP BY c.id, c.credit_limit HAVING sum(r.amount) > c.credit_limit
                """
            ).fetchall()
        assert not over, f"customers over their limit: {over}"

    def close(self) -> None:
        for name in list(self.participants):
            self.participants[name].stop()
        for thread in self.threads.values():
            thread.join(30)
        self.relay.kill()


@contextmanager
def running_shop(
    tmp_path: Path,
    make_database: Any,
    broker: str,
    mode: orders.Mode,
    *,
    credit: dict[str, float] | None = None,
    definition: Saga | None = None,
    crash_probability: float = 0.0,
) -> Iterator[Shop]:
    orders_dsn = make_database("orders")
    customers_dsn = make_database("customers")
    with psycopg.connect(orders_dsn) as conn:
        orders.install(conn)
    with psycopg.connect(customers_dsn) as conn:
        customers.install(conn, credit or {"c1": 100.0, "c2": 1000.0})
    create_topics(broker, TOPICS, partitions=4)
    # Each test gets its own relay slots and its own consumer groups' view of
    # the topics: names are unique per database, topics are shared but every
    # event of another test is for a saga this test does not know.
    relay = RelayProcess.start(
        tmp_path,
        bootstrap=broker,
        sources={"orders": orders_dsn, "customers": customers_dsn},
        name=f"relay-{uuid.uuid4().hex[:6]}",
    )
    orchestrator = (
        orders.orchestrator(definition or orders.CREATE_ORDER) if mode == "orchestration" else None
    )
    shop = Shop(orders_dsn, customers_dsn, broker, mode, relay, orchestrator)
    try:
        relay.wait_streaming("orders")
        relay.wait_streaming("customers")
        shop.start_participant("customer-service", crash_probability=crash_probability)
        shop.start_participant("order-service", crash_probability=crash_probability)
        shop.wait_ready()
        time.sleep(0.2)
        yield shop
    finally:
        shop.close()


@dataclass
class OrderServiceProcess:
    """`walsaga order-service` in a subprocess, its log captured to a file."""

    args: list[str]
    log: Path
    port: int
    #: The consumer group (``WALSAGA_KAFKA__GROUP_ID``); the service's name when None.
    group: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [WALSAGA, "order-service", *self.args, "--host", "127.0.0.1",
                 "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=self.env(),
            )  # fmt: skip

    def env(self) -> dict[str, str]:
        group = {"WALSAGA_KAFKA__GROUP_ID": self.group} if self.group else {}
        return {**os.environ, **group}

    def again(self, log: Path) -> OrderServiceProcess:
        """The same service (database, group) to launch anew, logging to `log`."""
        return dataclasses.replace(self, log=log, port=free_port(), proc=None)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout_s: float = 60) -> None:
        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, (
                f"order service exited; log:\n{self.read_log()[-3000:]}")  # fmt: skip
            return self.healthy()

        wait_until(up, timeout_s=timeout_s, interval_s=0.1, what="order service healthy")

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM, and the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextmanager
def running_order_service(
    tmp_path: Path,
    make_database: Any,
    broker: str,
    mode: orders.Mode,
    *,
    credit: dict[str, float] | None = None,
    customer_directory: bool = False,
    extra_args: list[str] | None = None,
) -> Iterator[tuple[Shop, OrderServiceProcess]]:
    """The shop with its order service as a process (`walsaga order-service`)
    serving HTTP; the customer service runs in a thread as in :func:`running_shop`.

    The order service installs its own tables. With `customer_directory`, it
    is given the customer database as its directory of customers.
    """
    orders_dsn = make_database("orders")
    customers_dsn = make_database("customers")
    with psycopg.connect(customers_dsn) as conn:
        customers.install(conn, credit or {"c1": 100.0, "c2": 1000.0})
    create_topics(broker, TOPICS, partitions=4)
    args = ["--dsn", orders_dsn, "--bootstrap-servers", broker, "--mode", mode]
    if customer_directory:
        args += ["--customers-dsn", customers_dsn]
    args += extra_args or []
    service = OrderServiceProcess(
        args,
        tmp_path / "order-service.log",
        free_port(),
        group=own_group(broker, "order-service", TOPICS),
    )
    service.launch()
    relay: RelayProcess | None = None
    shop: Shop | None = None
    try:
        service.wait_healthy()  # it installs the outbox the relay reads
        relay = RelayProcess.start(
            tmp_path,
            bootstrap=broker,
            sources={"orders": orders_dsn, "customers": customers_dsn},
            name=f"relay-{uuid.uuid4().hex[:6]}",
        )
        shop = Shop(orders_dsn, customers_dsn, broker, mode, relay, None)
        relay.wait_streaming("orders")
        relay.wait_streaming("customers")
        shop.start_participant("customer-service")
        shop.wait_ready()
        time.sleep(0.2)
        yield shop, service
    finally:
        service.kill()
        if shop is not None:
            shop.close()
        elif relay is not None:
            relay.kill()
