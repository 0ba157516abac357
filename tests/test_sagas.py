"""Sagas end to end: the order + customer example over real Postgres, relay and broker."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import psycopg
import pytest

from participants.orchestrator import Orchestrator, saga_log, saga_status
from participants.saga import Command, Saga, Step
from tests.shop import running_shop
from walsaga import schema


@pytest.mark.parametrize("mode", ["choreography", "orchestration"])
def test_orders_are_approved_within_credit_and_rejected_beyond_it(
    tmp_path: Path, make_database: Any, broker: str, mode: str
) -> None:
    with running_shop(tmp_path, make_database, broker, mode) as shop:  # type: ignore[arg-type]
        ok = shop.order("c1", 60)
        assert shop.wait_settled([ok]) == {ok: "APPROVED"}
        too_much = shop.order("c1", 50)  # 60 + 50 > 100
        unknown = shop.order("nobody", 10)
        statuses = shop.wait_settled([too_much, unknown])
        assert statuses == {too_much: "REJECTED", unknown: "REJECTED"}
        shop.assert_consistent()
        if mode == "orchestration":
            with psycopg.connect(shop.orders_dsn) as conn:
                assert saga_status(conn, ok).status == "COMPLETED"  # type: ignore[union-attr]
                assert saga_status(conn, too_much).status == "COMPENSATED"  # type: ignore[union-attr]
                kinds = [kind for kind, _, _ in saga_log(conn, too_much)]
                assert kinds[0] == "STARTED" and kinds[-1] == "COMPENSATED"
                assert "COMMAND" in kinds and "REPLY" in kinds


@pytest.mark.parametrize("mode", ["choreography", "orchestration"])
def test_many_orders_at_once_never_over_commit_a_customer(
    tmp_path: Path, make_database: Any, broker: str, mode: str
) -> None:
    credit = {f"k{i}": 500.0 for i in range(4)}
    with running_shop(tmp_path, make_database, broker, mode, credit=credit) as shop:  # type: ignore[arg-type]
        amounts = [40, 75, 120, 15, 60, 90]
        jobs = [(f"k{i % 4}", amounts[i % len(amounts)]) for i in range(120)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda job: shop.order(*job), jobs))
        statuses = shop.wait_settled(ids, timeout_s=120)
        assert set(statuses.values()) <= {"APPROVED", "REJECTED"}
        approved = [i for i, s in statuses.items() if s == "APPROVED"]
        assert approved and len(approved) < len(ids), "some fit, some do not"
        shop.assert_consistent()


def test_a_started_saga_logs_its_entries_in_order_with_their_details_intact(
    walsaga_db: str,
) -> None:
    """The start writes its log entries in one statement: each keeps its kind,
    its step (none for STARTED) and its detail, in the order they happened."""
    take = Step("take", command=Command("vault-commands", "Take", "id"), reply_topic="vault",
                success=("Taken",))  # fmt: skip
    orchestrator = Orchestrator([Saga("guarded", (take,))])
    data = {"id": "s-1", "note": "crème brûlée \u2603 \"quoted\"", "amount": 12.5,
            "nested": {"list": [1, None, True], "empty": {}}}  # fmt: skip
    with psycopg.connect(walsaga_db) as conn:
        schema.apply(conn, "saga")
        orchestrator.start(conn, "guarded", "s-1", data)
        conn.commit()
        log = saga_log(conn, "s-1")
        assert [(kind, step) for kind, step, _ in log] == [("STARTED", None), ("COMMAND", "take")]
        assert log[0][2] == {"data": data}
        assert log[1][2]["type"] == "Take" and log[1][2]["topic"] == "vault-commands"
        assert log[1][2]["attempt"] == 1 and log[1][2]["key"]
        sent = conn.execute("SELECT type, payload FROM walsaga.outbox").fetchall()
        assert sent == [("Take", data)]
