"""The walsaga schema: versioned, applied in place, idempotent."""

from __future__ import annotations

import psycopg

from walsaga import schema


def test_core_schema_applies_once_and_reports_nothing_to_do_after(empty_db: str) -> None:
    with psycopg.connect(empty_db) as conn:
        applied = schema.apply(conn, "core")
    assert [m.version for m in applied] == [m.version for m in schema.migrations("core")]
    with psycopg.connect(empty_db) as conn:
        assert schema.apply(conn, "core") == []
        assert schema.installed_version(conn, "core") == schema.migrations("core")[-1].version


def test_publish_writes_an_outbox_row_in_the_callers_transaction(walsaga_db: str) -> None:
    with psycopg.connect(walsaga_db) as conn:
        row = conn.execute(
            "SELECT walsaga.publish('order', '42', 'OrderCreated', '{\"total\": 10}', "
            '\'{"saga_id": "s-1"}\')'
        ).fetchone()
        assert row is not None
        event_id = row[0]
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM walsaga.outbox").fetchone() == (0,)
        conn.execute("SELECT walsaga.publish('order', '42', 'OrderCreated', '{\"total\": 10}')")
        conn.commit()
        stored = conn.execute(
            "SELECT aggregatetype, aggregateid, type, payload, headers FROM walsaga.outbox"
        ).fetchall()
    assert event_id is not None
    assert stored == [("order", "42", "OrderCreated", {"total": 10}, {})]
