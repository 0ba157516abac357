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


def test_publish_returns_the_id_of_the_row_it_wrote_whatever_the_search_path(
    walsaga_db: str,
) -> None:
    # The function keeps its plan for the session: every call must still
    # write its own arguments, and nothing may depend on the caller's
    # search_path (a legacy service's role may have its own).
    with psycopg.connect(walsaga_db) as conn:
        conn.execute("SET search_path = pg_catalog")
        ids = []
        for n, payload, headers in [
            (1, '{"total": 10.50}', '{"saga_id": "s-1"}'),
            (2, None, None),
            (3, "[1, 2]", "{}"),
        ]:
            row = conn.execute(
                "SELECT walsaga.publish(%s, %s, %s, %s::jsonb, %s::jsonb)::text",
                (f"topic-{n}", f"key-{n}", f"Type{n}", payload, headers),
            ).fetchone()
            assert row is not None
            ids.append(row[0])
        conn.commit()
        stored = conn.execute(
            "SELECT id::text, aggregatetype, aggregateid, type, payload, headers "
            "FROM walsaga.outbox ORDER BY aggregatetype"
        ).fetchall()
    assert stored == [
        (ids[0], "topic-1", "key-1", "Type1", {"total": 10.50}, {"saga_id": "s-1"}),
        (ids[1], "topic-2", "key-2", "Type2", {}, {}),
        (ids[2], "topic-3", "key-3", "Type3", [1, 2], {}),
    ]
