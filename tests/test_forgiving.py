"""No saga compensates because a service was down for seconds, or minutes.

"No answer yet" is not a business failure: a participant being restarted, a
consumer group rebalancing, a relay failing over each take seconds, and the
command, carried by the outbox and idempotent, is answered once the
participant is back. These tests kill and stop the services of the order saga
while orders flow, against real Postgres, the broker and real processes, and
hold that only the business rule (the credit limit) ever rejects an order.
"""

from __future__ import annotations

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
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from participants.examples import customers, orders
from participants.examples.embedded import free_port
from participants.orchestrator import saga_log, saga_status
from tests.shop import TOPICS, OrderServiceProcess, Shop, running_shop
from tests.support import WALSAGA, RelayProcess, create_topics, own_group, wait_until

LIMIT_REASON = "credit limit"
CREDIT = {"rich": 1e9, "poor": 100.0}


@dataclass
class Process:
    """A walsaga command in a subprocess that can be killed and started again."""

    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [WALSAGA, *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@contextmanager
def everything_as_processes(
    tmp_path: Path, make_database: Any, broker: str, mode: orders.Mode
) -> Iterator[dict[str, Any]]:
    """The order saga wired as the compose file wires it: the order service, the
    customer service and the relay, each its own process."""
    orders_dsn = make_database("orders")
    customers_dsn = make_database("customers")
    with psycopg.connect(customers_dsn) as conn:
        customers.install(conn, CREDIT)
    create_topics(broker, TOPICS, partitions=4)
    order_service = OrderServiceProcess(
        ["--dsn", orders_dsn, "--bootstrap-servers", broker, "--mode", mode],
        tmp_path / "order-service.log",
        free_port(),
        group=own_group(broker, "order-service", TOPICS),
    )
    customer_service = Process(
        ["participant", "--config", str(customers.HANDLERS)],
        tmp_path / "customer-service.log",
        {
            "WALSAGA_PARTICIPANT__DSN": customers_dsn,
            "WALSAGA_KAFKA__BOOTSTRAP_SERVERS": broker,
            "WALSAGA_KAFKA__GROUP_ID": own_group(broker, "customer-service", TOPICS),
        },
    )
    order_service.launch()
    relay: RelayProcess | None = None
    try:
        order_service.wait_healthy()
        relay = RelayProcess.start(
            tmp_path,
            bootstrap=broker,
            sources={"orders": orders_dsn, "customers": customers_dsn},
            name=f"relay-{uuid.uuid4().hex[:6]}",
        )
        relay.wait_streaming("orders")
        relay.wait_streaming("customers")
        customer_service.launch()
        yield {
            "orders_dsn": orders_dsn,
            "customers_dsn": customers_dsn,
            "order-service": order_service,
            "customer-service": customer_service,
            "relay": relay,
        }
    finally:
        order_service.kill()
        customer_service.kill()
        if relay is not None:
            relay.kill()


def place_orders(url: str, count: int, *, rate_per_s: float, seed: int) -> list[str]:
    """POST `count` orders over HTTP, retrying each until the service takes it."""
    rng = random.Random(seed)
    created: list[str] = []
    with httpx.Client(timeout=5) as client:
        for _ in range(count):
            customer, total = ("poor", 60.0) if rng.random() < 0.1 else ("rich", 10.0)
            while True:
                try:
                    answer = client.post(f"{url}/orders", json={"customer_id": customer,
                                                                 "total": total})  # fmt: skip
                except httpx.HTTPError:
                    time.sleep(0.2)  # the service is being restarted
                    continue
                if answer.status_code == 202:
                    created.append(answer.json()["id"])
                    break
                time.sleep(0.2)  # 503 while stopping
            time.sleep(1 / rate_per_s)
    return created


def all_orders(orders_dsn: str) -> dict[str, tuple[str, str, str | None]]:
    with psycopg.connect(orders_dsn) as conn:
        rows = conn.execute("SELECT id, customer_id, status, reason FROM orders").fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["orchestration", "choreography"])
def test_services_killed_again_and_again_reject_no_order(
    tmp_path: Path, make_database: Any, broker: str, mode: orders.Mode
) -> None:
    with everything_as_processes(tmp_path, make_database, broker, mode) as system:
        url = system["order-service"].url
        placed: list[str] = []
        writer = threading.Thread(
            target=lambda: placed.extend(place_orders(url, 240, rate_per_s=12, seed=3))
        )
        writer.start()
        # Each service is killed three times, in turns, and back within two seconds.
        victims = ["relay", "customer-service", "order-service"] * 3
        rng = random.Random(7)
        for victim in victims:
            time.sleep(rng.uniform(1.0, 2.0))
            process = system[victim]
            process.kill()
            time.sleep(rng.uniform(0.5, 2.0))
            process.launch()
            if victim == "order-service":
                process.wait_healthy()
        writer.join(300)
        assert not writer.is_alive()
        orders_dsn = system["orders_dsn"]

        def settled() -> dict[str, tuple[str, str, str | None]] | None:
            found = all_orders(orders_dsn)
            return found if all(s != "PENDING" for _, s, _ in found.values()) else None

        found = wait_until(settled, timeout_s=300, interval_s=1, what="every order settled")
        assert set(placed) <= set(found)
        for order_id, (customer, status, reason) in found.items():
            if customer == "rich":
                assert status == "APPROVED", (order_id, status, reason)
            elif status == "REJECTED":
                assert LIMIT_REASON in (reason or "").lower(), (order_id, reason)
        shop = Shop(orders_dsn, system["customers_dsn"], broker, mode, system["relay"], None)
        shop.assert_consistent()
        if mode == "orchestration":
            with psycopg.connect(orders_dsn) as conn:
                gave_up = conn.execute(
                    "SELECT count(*) FROM walsaga.saga_log WHERE kind = 'GAVE_UP'"
                ).fetchone()
            assert gave_up == (0,)


def metric(registry: Any, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


@pytest.mark.slow
def test_a_participant_down_for_two_minutes_delays_orders_and_rejects_none(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    # Give up after 30 s: shorter than the outage, so only knowing the service
    # is down (many sagas waiting, nothing heard from it) keeps them waiting.
    definition = orders.create_order_saga(timeout_s=2.0, give_up_after_s=30.0)
    with running_shop(
        tmp_path, make_database, broker, "orchestration", credit=CREDIT, definition=definition
    ) as shop:
        assert shop.wait_settled([shop.order("rich", 10)]) != {}  # it answers before the outage
        registry = shop.participants["order-service"].metrics.registry
        shop.stop_participant("customer-service")
        ids = [shop.order("rich", 10) for _ in range(20)]
        outage_ends = time.monotonic() + 120
        seen_waiting = seen_down = 0.0
        while time.monotonic() < outage_ends:
            waiting = metric(registry, "walsaga_sagas_waiting", participant="customer-commands")
            down = metric(registry, "walsaga_saga_participant_down",
                          participant="customer-commands")  # fmt: skip
            seen_waiting = max(seen_waiting, waiting or 0)
            seen_down = max(seen_down, down or 0)
            assert set(shop.statuses(ids).values()) == {"PENDING"}, "nothing settles meanwhile"
            time.sleep(2)
        assert seen_waiting == 20, "the waiting sagas are visible while the service is down"
        assert seen_down == 1, "and the service is seen as down"
        oldest = metric(registry, "walsaga_sagas_waiting_oldest_seconds",
                        participant="customer-commands")  # fmt: skip
        assert oldest is not None and oldest > 100
        shop.start_participant("customer-service")
        statuses = shop.wait_settled(ids, timeout_s=180)
        assert set(statuses.values()) == {"APPROVED"}
        shop.assert_consistent()
        with psycopg.connect(shop.orders_dsn) as conn:
            for order_id in ids:
                kinds = [k for k, _, _ in saga_log(conn, order_id)]
                assert "GAVE_UP" not in kinds and kinds.count("RETRY") >= 2
                state = saga_status(conn, order_id)
                assert state is not None and state.status == "COMPLETED"
        wait_until(
            lambda: metric(registry, "walsaga_sagas_waiting", participant="customer-commands") == 0,
            timeout_s=30,
            what="no saga waiting any more",
        )
