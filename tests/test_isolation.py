"""Isolation countermeasures in SQL: semantic locks and reservations that expire."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import psycopg
import pytest

from walsaga import schema


@pytest.fixture
def saga_db(walsaga_db: str) -> str:
    with psycopg.connect(walsaga_db) as conn:
        schema.apply(conn, "saga")
    return walsaga_db


def one(dsn: str, query: str, *params: Any) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params or None).fetchone()
        assert row is not None
        return row[0]


def test_a_semantic_lock_keeps_other_sagas_out_until_released_or_expired(saga_db: str) -> None:
    assert one(saga_db, "SELECT walsaga.acquire_lock('customer:7', 'saga-a')") is True
    assert one(saga_db, "SELECT walsaga.acquire_lock('customer:7', 'saga-a')") is True  # again
    assert one(saga_db, "SELECT walsaga.acquire_lock('customer:7', 'saga-b')") is False
    assert one(saga_db, "SELECT walsaga.release_lock('customer:7', 'saga-b')") is False
    assert one(saga_db, "SELECT walsaga.release_lock('customer:7', 'saga-a')") is True
    assert one(saga_db, "SELECT walsaga.acquire_lock('customer:7', 'saga-b')") is True
    # A lock with an expiry is taken over once it has passed.
    assert one(saga_db, "SELECT walsaga.acquire_lock('room:1', 'x', interval '-1 second')")
    assert one(saga_db, "SELECT walsaga.acquire_lock('room:1', 'y')") is True


def test_reservations_never_exceed_capacity_even_when_raced(saga_db: str) -> None:
    def reserve(i: int) -> str | None:
        return one(  # type: ignore[no-any-return]
            saga_db,
            "SELECT walsaga.reserve(%s, 'flight:TP100', 1, 10, %s, interval '1 minute')",
            f"r{i}",
            f"saga-{i}",
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(reserve, range(25)))
    assert outcomes.count("RESERVED") == 10
    assert outcomes.count(None) == 15
    # Same id again: idempotent, answers what it was.
    assert reserve(0) == "RESERVED"
    held = one(saga_db, "SELECT sum(quantity) FROM walsaga.reservation WHERE status = 'RESERVED'")
    assert held == 10


def test_reservations_expire_unless_confirmed_and_free_their_capacity(saga_db: str) -> None:
    short = "SELECT walsaga.reserve(%s, 'room:9', 1, 2, 's', interval '-1 second')"
    assert one(saga_db, short, "late") == "RESERVED"  # already past its expiry
    assert one(saga_db, "SELECT walsaga.reserve('kept', 'room:9', 1, 2)") == "RESERVED"
    assert one(saga_db, "SELECT walsaga.confirm_reservation('kept')") == "CONFIRMED"
    # An expired hold no longer counts, even before the expiry job marks it.
    assert one(saga_db, "SELECT walsaga.reserve('new', 'room:9', 1, 2)") == "RESERVED"
    with psycopg.connect(saga_db, autocommit=True) as conn:
        expired = conn.execute("SELECT id FROM walsaga.expire_reservations()").fetchall()
    assert expired == [("late",)]
    assert one(saga_db, "SELECT walsaga.confirm_reservation('late')") == "EXPIRED"
    assert one(saga_db, "SELECT walsaga.release_reservation('new')") is True
    assert one(saga_db, "SELECT walsaga.release_reservation('new')") is False
