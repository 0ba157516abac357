"""Sagas end to end: the order + customer example over real Postgres, relay and broker."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import psycopg
import pytest

from participants.orchestrator import saga_log, saga_status
from tests.shop import running_shop


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
