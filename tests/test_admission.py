"""Past its backlog bound the order service turns new orders away with 503 and
Retry-After, while the orders it admitted settle; then it admits again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from participants.examples.order_service.admission import (
    RETRY_AFTER_MAX_S,
    Backlog,
    retry_after,
)
from tests.shop import running_order_service
from tests.support import wait_until


@pytest.mark.parametrize(
    ("backlog", "expected"),
    [
        (Backlog(pending=99, settling_per_s=0), None),
        (Backlog(pending=100, settling_per_s=50), 1),  # 25 over 3/4 of the bound, at 50/s
        (Backlog(pending=400, settling_per_s=10), 30),  # 325 at 10/s: capped
        (Backlog(pending=150, settling_per_s=15), 5),  # 75 at 15/s
        (Backlog(pending=100, settling_per_s=0), RETRY_AFTER_MAX_S),  # nothing settles
    ],
)
def test_the_wait_asked_of_a_client_is_the_time_the_excess_takes_to_drain(
    backlog: Backlog, expected: int | None
) -> None:
    assert retry_after(backlog, max_backlog=100) == expected


def test_a_bound_of_zero_admits_everything() -> None:
    assert retry_after(Backlog(pending=10**6, settling_per_s=0), max_backlog=0) is None


def test_an_overloaded_order_service_sheds_new_orders_and_settles_the_admitted(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    with running_order_service(
        tmp_path,
        make_database,
        broker,
        "orchestration",
        extra_args=["--max-backlog", "5"],
    ) as (shop, service):
        shop.stop_participant("customer-service")  # nothing settles for now
        admitted, refused = [], []
        with httpx.Client(base_url=service.url, timeout=10) as client:
            for _ in range(12):
                answer = client.post("/orders", json={"customer_id": "c2", "total": 10})
                if answer.status_code == 202:
                    admitted.append(answer.json()["id"])
                else:
                    assert answer.status_code == 503, answer.text
                    assert answer.json()["error"] == "overloaded"
                    assert 1 <= int(answer.headers["Retry-After"]) <= RETRY_AFTER_MAX_S
                    refused.append(answer)
            assert len(admitted) == 5 and len(refused) == 7
            health = client.get("/healthz").json()
            assert health["refused_overloaded"] == 7
            # The admitted ones settle once the customer service is back ...
            shop.start_participant("customer-service")
            assert set(shop.wait_settled(admitted, timeout_s=120).values()) == {"APPROVED"}
            # ... and then there is room again.
            wait_until(
                lambda: (
                    client.post("/orders", json={"customer_id": "c2", "total": 10}).status_code
                    == 202
                ),
                timeout_s=30,
                interval_s=0.5,
                what="an order admitted again",
            )
