"""Sagas under faults: services killed between receiving and committing, messages
delivered twice, steps timing out, compensations that fail. Every saga must end
in a terminal state, with each effect applied once."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer

from participants.examples import orders
from participants.handlers import HandlerContext
from participants.message import Message
from participants.orchestrator import Orchestrator, saga_log, saga_status
from participants.runtime import Participant
from participants.saga import Command, RetryPolicy, Saga, Step
from tests.shop import TOPICS, Shop, running_shop
from tests.support import RelayProcess, consume, create_topics, join_own_group, wait_until
from walsaga import schema
from walsaga.errors import BusinessError

pytestmark = pytest.mark.slow


def outbox_counts(dsn: str) -> Counter[tuple[str, str]]:
    """(event type, order id) -> how many events the service wrote."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT type, coalesce(payload->>'order_id', aggregateid) FROM walsaga.outbox"
        ).fetchall()
    return Counter((t, o) for t, o in rows)


def settle_with_crashes(shop: Shop, ids: list[str], probability: float, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        shop.restart_crashed(crash_probability=probability)
        statuses = shop.statuses(ids)
        if all(s != "PENDING" for s in statuses.values()):
            return
        assert time.monotonic() < deadline, f"still pending: {Counter(statuses.values())}"
        time.sleep(0.3)


@pytest.mark.parametrize("mode", ["choreography", "orchestration"])
def test_services_killed_between_receiving_and_committing_lose_and_repeat_nothing(
    tmp_path: Path, make_database: Any, broker: str, mode: str
) -> None:
    credit = {f"k{i}": 300.0 for i in range(3)}
    with running_shop(tmp_path, make_database, broker, mode, credit=credit,  # type: ignore[arg-type]
                      crash_probability=0.06) as shop:  # fmt: skip
        ids = [shop.order(f"k{i % 3}", 40 + (i % 4) * 25) for i in range(24)]
        settle_with_crashes(shop, ids, 0.06, timeout_s=180)
        assert shop.crashes >= 2, "the test must actually crash the services"
        shop.assert_consistent()
        # Each effect once: one decision per order on the customer side, and
        # on the order side one approval or rejection event per order.
        events = outbox_counts(shop.customers_dsn)
        for order_id in ids:
            decisions = sum(
                events[(t, order_id)] for t in ("CreditReserved", "CreditLimitExceeded")
            )
            assert decisions == 1, (order_id, events)
        if mode == "orchestration":
            with psycopg.connect(shop.orders_dsn) as conn:
                for order_id in ids:
                    state = saga_status(conn, order_id)
                    assert state is not None
                    assert state.status in ("COMPLETED", "COMPENSATED")


def test_every_message_delivered_twice_changes_nothing(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    with running_shop(tmp_path, make_database, broker, "orchestration") as shop:
        ids = [shop.order("c2", 100) for _ in range(12)] + [shop.order("c1", 500)]
        shop.wait_settled(ids)
        shop.assert_consistent()

        def snapshot() -> tuple[Any, ...]:
            with psycopg.connect(shop.orders_dsn) as conn:
                sagas = conn.execute("SELECT id, status, step, data FROM walsaga.saga ORDER BY id")
                log_size = conn.execute("SELECT count(*) FROM walsaga.saga_log").fetchone()
                saga_rows = sagas.fetchall()
            return (saga_rows, log_size, shop.statuses(ids), shop.reservations(),
                    outbox_counts(shop.customers_dsn), outbox_counts(shop.orders_dsn))  # fmt: skip

        before = snapshot()
        # Every record of the shop's topics once more, ids and keys unchanged.
        records = consume(broker, TOPICS, until=lambda r: False, timeout_s=8)
        mine = set(ids)
        ours = [
            r for r in records if (dict(r.headers() or []).get("saga_id") or b"").decode() in mine
        ]
        assert len(ours) >= len(ids) * 3
        producer = Producer({"bootstrap.servers": broker})
        for r in ours:
            producer.produce(r.topic(), r.value(), r.key(), headers=r.headers())
        assert producer.flush(30) == 0
        handled = shop.participants["customer-service"].metrics.handled
        wait_until(
            lambda: handled.labels("customer-service", "duplicate")._value.get() >= 13,
            timeout_s=60,
        )
        time.sleep(2)
        assert snapshot() == before


def test_a_step_whose_deadline_really_passes_compensates_with_gave_up_waiting(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    quick = orders.create_order_saga(timeout_s=1.0, give_up_after_s=4.0)
    with running_shop(tmp_path, make_database, broker, "orchestration", definition=quick) as shop:
        shop.stop_participant("customer-service")
        ids = [shop.order("c2", 10) for _ in range(3)]  # too few to call the service down
        with psycopg.connect(shop.orders_dsn) as conn:
            wait_until(
                lambda: all("GAVE_UP" in [k for k, _, _ in saga_log(conn, i)] for i in ids),
                timeout_s=30,
                what="the reserve-credit step to be given up",
            )
            for order_id in ids:
                kinds = [k for k, _, _ in saga_log(conn, order_id)]
                assert kinds.count("RETRY") >= 1
                assert kinds.count("COMMAND") >= 3  # sent, resent, then the compensation
                state = saga_status(conn, order_id)
                assert state is not None
                assert (state.reason or "").startswith("gave up waiting for ReserveCredit")
        # The customer service comes back and works through what waited for it:
        # the late answers change nothing, the orders stay rejected.
        shop.start_participant("customer-service")
        statuses = shop.wait_settled(ids, timeout_s=60)
        assert set(statuses.values()) == {"REJECTED"}
        with psycopg.connect(shop.orders_dsn) as conn:
            wait_until(
                lambda: all(saga_status(conn, i).status == "COMPENSATED" for i in ids),  # type: ignore[union-attr]
                timeout_s=60,
            )
        shop.assert_consistent()
        # Two copies of each ReserveCredit were sent; each was performed at most once.
        events = outbox_counts(shop.customers_dsn)
        assert all(events[("CreditReserved", i)] <= 1 for i in ids)


class Vault:
    """A participant whose compensation refuses a given number of times."""

    def __init__(self, dsn: str, broker: str, name: str, refusals: dict[str, int]) -> None:
        self.refusals = refusals
        self.participant = Participant(name, dsn=dsn, kafka={"bootstrap.servers": broker})
        p = self.participant

        @p.on(f"{name}-commands", "Take")
        def take(ctx: HandlerContext, message: Message) -> None:
            ctx.execute("INSERT INTO taken VALUES (%s)", (message.saga_id,))
            ctx.publish(name, message.saga_id or "", "Taken", {})

        @p.on(f"{name}-commands", "Check", failure_type="CheckRefused", failure_topic=name)
        def check(ctx: HandlerContext, message: Message) -> None:
            raise BusinessError("check refused")

        @p.on(f"{name}-commands", "GiveBack", failure_type="GiveBackRefused", failure_topic=name)
        def give_back(ctx: HandlerContext, message: Message) -> None:
            saga_id = message.saga_id or ""
            if self.refusals.get(saga_id, 0) > 0:
                self.refusals[saga_id] -= 1
                raise BusinessError("not now")
            ctx.execute("DELETE FROM taken WHERE saga_id = %s", (saga_id,))
            ctx.publish(name, saga_id, "GivenBack", {})


def test_a_compensation_that_fails_is_retried_and_ends_failed_when_it_never_succeeds(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    name = f"vault{uuid.uuid4().hex[:6]}"
    vault_dsn, saga_dsn = make_database("vault"), make_database("sagas")
    with psycopg.connect(vault_dsn) as conn:
        schema.apply(conn, "core")
        conn.execute("CREATE TABLE taken (saga_id text PRIMARY KEY)")
    with psycopg.connect(saga_dsn) as conn:
        schema.apply(conn, "core")
        schema.apply(conn, "saga")
    undo = Command(f"{name}-commands", "GiveBack", lambda d: d["id"])
    definition = Saga(
        "guarded",
        (
            Step("take", command=Command(f"{name}-commands", "Take", lambda d: d["id"]),
                 reply_topic=name, success=("Taken",), compensation=undo,
                 compensated=("GivenBack",), compensation_failed=("GiveBackRefused",),
                 compensation_retry=RetryPolicy(max_attempts=4, backoff_s=0.2), timeout_s=5),
            Step("check", command=Command(f"{name}-commands", "Check", lambda d: d["id"]),
                 reply_topic=name, success=("Checked",), failure=("CheckRefused",)),
        ),
    )  # fmt: skip
    create_topics(broker, [name, f"{name}-commands"], partitions=2)
    vault = Vault(vault_dsn, broker, name, {"stubborn": 2, "hopeless": 100})
    orchestrator = Orchestrator([definition])
    runner = Participant(f"{name}-orchestrator", dsn=saga_dsn, kafka={"bootstrap.servers": broker})
    orchestrator.attach(runner)
    relay = RelayProcess.start(tmp_path, bootstrap=broker,
                               sources={"vault": vault_dsn, "sagas": saga_dsn})  # fmt: skip
    threads = [threading.Thread(target=p.run, daemon=True) for p in (vault.participant, runner)]
    try:
        relay.wait_streaming("vault")
        relay.wait_streaming("sagas")
        for t in threads:
            t.start()
        wait_until(lambda: vault.participant.ready.is_set() and runner.ready.is_set(), timeout_s=60)
        with psycopg.connect(saga_dsn) as conn:
            for saga_id in ("stubborn", "hopeless"):
                orchestrator.start(conn, "guarded", saga_id, {"id": saga_id})
            conn.commit()
            wait_until(
                lambda: (
                    {saga_status(conn, s).status for s in ("stubborn", "hopeless")}  # type: ignore[union-attr]
                    <= {"COMPENSATED", "FAILED"}
                ),
                timeout_s=90,
                what="both sagas to end",
            )
            stubborn, hopeless = saga_status(conn, "stubborn"), saga_status(conn, "hopeless")
            assert stubborn is not None and stubborn.status == "COMPENSATED"
            refused = [d for k, _, d in saga_log(conn, "stubborn") if k == "REPLY"
                       and d.get("outcome") == "compensation refused"]  # fmt: skip
            assert len(refused) == 2
            assert hopeless is not None and hopeless.status == "FAILED"
            assert "did not succeed after 4 attempts" in (hopeless.reason or "")
        with psycopg.connect(vault_dsn) as conn:
            taken = [r[0] for r in conn.execute("SELECT saga_id FROM taken")]
        assert taken == ["hopeless"], "the stubborn saga gave back what it took, once"
        failed = runner.metrics.registry.get_sample_value(
            "walsaga_sagas_ended_total", {"definition": "guarded", "status": "FAILED"}
        )
        assert failed == 1.0
    finally:
        vault.participant.stop()
        runner.stop()
        for t in threads:
            t.join(30)
        relay.kill()


def test_two_orchestrator_instances_share_the_sagas_and_one_can_die(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    credit = {f"k{i}": 1e6 for i in range(8)}  # replies are keyed by customer: spread them
    with running_shop(tmp_path, make_database, broker, "orchestration", credit=credit) as shop:
        second = orders.participant(
            dsn=shop.orders_dsn,
            kafka={"bootstrap.servers": broker},
            mode="orchestration",
            orchestrator=orders.orchestrator(),
        )
        join_own_group(second, shop.groups, broker)  # the first instance's group
        thread = threading.Thread(target=second.run, daemon=True)
        thread.start()
        try:
            wait_until(second.ready.is_set, timeout_s=60, what="the second instance's partitions")
            first_half = [shop.order(f"k{i % 8}", 10) for i in range(30)]
            shop.wait_settled(first_half)
            # The first instance goes away mid-stream; the second carries on.
            second_half = [shop.order(f"k{i % 8}", 10) for i in range(30)]
            shop.stop_participant("order-service")
            statuses = shop.wait_settled(second_half, timeout_s=90)
            assert set(statuses.values()) == {"APPROVED"}
            handled = [
                p.metrics.handled.labels(p.name, "handled")._value.get()
                for p in (shop.participants["order-service"], second)
            ]
            assert all(n > 0 for n in handled), f"both instances handled replies: {handled}"
            shop.assert_consistent()
            with psycopg.connect(shop.orders_dsn) as conn:
                for order_id in first_half + second_half:
                    state = saga_status(conn, order_id)
                    assert state is not None
                    assert state.status == "COMPLETED"
        finally:
            second.stop()
            thread.join(30)
