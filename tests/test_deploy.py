"""``walsaga deploy`` against real Postgres: capture triggers, plan, drop, bad specs, relay role."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import conninfo, sql

from relay import deploy, wal2json
from relay.capture import load_spec
from relay.deploy import password_matches
from relay.wal2json import PLUGIN_OPTIONS, OutboxEvent
from walsaga.cli import main
from walsaga.errors import TransientError

LEGACY_SCHEMA = '''
CREATE TABLE customers (
    id           bigint PRIMARY KEY,
    name         text NOT NULL,
    credit_limit numeric(12,2) NOT NULL
);
CREATE TABLE orders (
    id          bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers (id),
    total       numeric(12,2) NOT NULL,
    status      text NOT NULL DEFAULT 'PENDING',
    note        text
);
CREATE VIEW big_orders AS SELECT * FROM orders WHERE total > 1000;
CREATE TABLE "Order Items" (
    "Order Id"  bigint NOT NULL REFERENCES orders (id),
    sku         text NOT NULL,
    "qty ""x""" int NOT NULL,
    PRIMARY KEY ("Order Id", sku)
);
INSERT INTO customers VALUES (7, 'Ada', 100.00), (8, 'Bob', 50.00);
'''

ORDER_CREATED = """
[[capture]]
table = "orders"
on = ["insert"]
event = "OrderCreated"
aggregate_type = "order"
aggregate_id = "id"
payload = ["id", "customer_id", "total"]
headers = { customer = "customer_id" }
"""

ORDER_APPROVED = """
[[capture]]
table = "public.orders"
on = ["update"]
when = "OLD.status IS DISTINCT FROM NEW.status AND NEW.status = 'APPROVED'"
event = "OrderApproved"
aggregate_type = "order"
aggregate_id = "id"
payload = ["id", "status"]
"""

ORDER_DELETED = """
[[capture]]
table = "orders"
on = ["delete"]
event = "OrderDeleted"
aggregate_type = "order"
aggregate_id = "id"
"""

SPEC = ORDER_CREATED + ORDER_APPROVED + ORDER_DELETED


@pytest.fixture
def legacy_db(empty_db: str) -> str:
    """A legacy service's database: business tables, no walsaga yet."""
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(LEGACY_SCHEMA)
    return empty_db


def write_spec(folder: Path, text: str, name: str = "capture.toml") -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def deployed(dsn: str, spec: str, *extra: str) -> Result:
    result = cli("deploy", "--dsn", dsn, "--spec", spec, *extra)
    assert result.exit_code == 0, result.output
    return result


def run(dsn: str, *statements: str) -> None:
    """Each statement in a transaction of its own."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def outbox(dsn: str) -> list[tuple[Any, ...]]:
    # ctid: insertion order, since the tests only ever append to the outbox.
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT type, aggregatetype, aggregateid, payload, headers FROM walsaga.outbox"
            " ORDER BY ctid"
        ).fetchall()


def catalog(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """What a deploy could have changed, down to the row versions (xmin) of its objects."""
    queries = {
        "schemas": "SELECT oid, nspname FROM pg_namespace ORDER BY oid",
        "relations": """
            SELECT c.oid, c.relname, c.relkind FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
            ORDER BY c.oid""",
        "triggers": """
            SELECT oid, tgrelid::regclass::text, tgname, tgenabled, xmin::text
            FROM pg_trigger WHERE NOT tgisinternal ORDER BY oid""",
        "functions": """
            SELECT p.oid, n.nspname, p.proname, p.xmin::text FROM pg_proc p
            JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
            ORDER BY p.oid""",
        "roles": "SELECT oid, rolname, xmin::text FROM pg_authid ORDER BY oid",
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        snapshot = {key: conn.execute(q).fetchall() for key, q in queries.items()}  # type: ignore[call-overload]
        if conn.execute("SELECT to_regclass('walsaga.capture')").fetchone() != (None,):
            snapshot["capture"] = conn.execute(
                "SELECT entry, operation, installed_at, xmin::text FROM walsaga.capture"
                " ORDER BY entry, operation"
            ).fetchall()
            snapshot["versions"] = conn.execute(
                "SELECT component, version, xmin::text FROM walsaga.schema_version ORDER BY 1, 2"
            ).fetchall()
    return snapshot


def captures(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT entry, operation FROM walsaga.capture ORDER BY entry, operation"
        ).fetchall()


# --- what gets captured ------------------------------------------------------


def test_writes_on_a_legacy_schema_produce_exactly_the_expected_outbox_rows(
    legacy_db: str, tmp_path: Path
) -> None:
    deployed(legacy_db, write_spec(tmp_path, SPEC))
    run(
        legacy_db,
        "INSERT INTO orders (customer_id, total) VALUES (7, 10.50)",
        "INSERT INTO orders (customer_id, total, note) VALUES (8, 20, 'gift')",
        "UPDATE orders SET note = 'rush' WHERE id = 1",  # status unchanged: no event
        "UPDATE orders SET status = 'APPROVED' WHERE id = 1",
        "UPDATE orders SET status = 'APPROVED', note = 'again' WHERE id = 1",  # still APPROVED
        "UPDATE orders SET status = 'REJECTED' WHERE id = 2",  # not APPROVED: no event
        "DELETE FROM orders WHERE id = 2",
    )
    created = ("OrderCreated", "order")
    assert outbox(legacy_db) == [
        (*created, "1", {"id": 1, "customer_id": 7, "total": 10.5}, {"customer": "7"}),
        (*created, "2", {"id": 2, "customer_id": 8, "total": 20}, {"customer": "8"}),
        ("OrderApproved", "order", "1", {"id": 1, "status": "APPROVED"}, {}),
        (
            "OrderDeleted",
            "order",
            "2",
            # No payload listed: the whole row, as it was before the delete.
            {"id": 2, "customer_id": 8, "total": 20, "status": "REJECTED", "note": "gift"},
            {},
        ),
    ]  # fmt: skip


def test_an_update_captures_the_row_after_it(legacy_db: str, tmp_path: Path) -> None:
    spec = ORDER_CREATED.replace('["insert"]', '["insert", "update"]')
    deployed(legacy_db, write_spec(tmp_path, spec))
    run(
        legacy_db,
        "INSERT INTO orders (customer_id, total) VALUES (7, 1)",
        "UPDATE orders SET total = 2, customer_id = 8",
    )
    assert [row[3] for row in outbox(legacy_db)] == [
        {"id": 1, "customer_id": 7, "total": 1},
        {"id": 1, "customer_id": 8, "total": 2},
    ]


def test_events_keep_the_outbox_defaults_for_id_and_created_at(
    legacy_db: str, tmp_path: Path
) -> None:
    deployed(legacy_db, write_spec(tmp_path, ORDER_CREATED))
    with psycopg.connect(legacy_db) as conn:
        started = conn.execute("SELECT now()").fetchone()
        conn.execute("INSERT INTO orders (customer_id, total) VALUES (7, 1), (8, 2)")
        conn.commit()
        rows = conn.execute("SELECT id, created_at FROM walsaga.outbox").fetchall()
    assert started is not None
    assert [created_at for _, created_at in rows] == [started[0]] * 2
    assert len({event_id for event_id, _ in rows}) == 2
    assert all(event_id.version == 7 for event_id, _ in rows)


def test_a_rolled_back_write_leaves_no_event(legacy_db: str, tmp_path: Path) -> None:
    deployed(legacy_db, write_spec(tmp_path, ORDER_CREATED))
    with psycopg.connect(legacy_db) as conn:
        conn.execute("INSERT INTO orders (customer_id, total) VALUES (7, 1)")
        conn.rollback()
        with conn.transaction():
            conn.execute("INSERT INTO orders (customer_id, total) VALUES (8, 2)")
            with conn.transaction() as savepoint:
                conn.execute("INSERT INTO orders (customer_id, total) VALUES (7, 3)")
                raise psycopg.Rollback(savepoint)
    assert [(row[2], row[3]["total"]) for row in outbox(legacy_db)] == [("2", 2)]


def test_odd_identifiers_work(legacy_db: str, tmp_path: Path) -> None:
    spec = '''
[[capture]]
table = 'public."Order Items"'
on = ["insert", "delete"]
event = "It's $walsaga$ done"
aggregate_type = "order'item"
aggregate_id = "Order Id"
payload = ["Order Id", 'qty "x"', "sku"]
headers = { 'the "sku"' = "sku" }

[[capture]]
table = '"Order Items"'
on = ["update"]
when = 'NEW."qty ""x""" > OLD."qty ""x"""'
event = "QtyRaised"
aggregate_type = "order'item"
aggregate_id = 'qty "x"'
'''
    deployed(legacy_db, write_spec(tmp_path, spec))
    sku = "a'); DROP TABLE orders; --"
    with psycopg.connect(legacy_db, autocommit=True) as conn:
        conn.execute("INSERT INTO orders (customer_id, total) VALUES (7, 1)")
        conn.execute('INSERT INTO "Order Items" VALUES (1, %s, 2)', (sku,))
        conn.execute('UPDATE "Order Items" SET "qty ""x""" = 1')  # lower: no event
        conn.execute('UPDATE "Order Items" SET "qty ""x""" = 5')
        conn.execute('DELETE FROM "Order Items"')
    line = {"Order Id": 1, 'qty "x"': 2, "sku": sku}
    assert outbox(legacy_db) == [
        ("It's $walsaga$ done", "order'item", "1", line, {'the "sku"': sku}),
        ("QtyRaised", "order'item", "5", {"Order Id": 1, 'qty "x"': 5, "sku": sku}, {}),
        ("It's $walsaga$ done", "order'item", "1", {**line, 'qty "x"': 5}, {'the "sku"': sku}),
    ]


def test_roles_writing_the_table_need_no_privilege_on_walsaga(
    legacy_db: str, tmp_path: Path, pg_server: Any
) -> None:
    deployed(legacy_db, write_spec(tmp_path, ORDER_DELETED))
    app = f"app_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    with as_role(pg_server, legacy_db, app, password) as app_dsn:
        run(
            legacy_db,
            f"GRANT SELECT, INSERT, DELETE ON orders TO {app}",
            f"GRANT USAGE ON SEQUENCE orders_id_seq TO {app}",
            # A search_path that puts the caller's functions first must not
            # reach the trigger, which runs with its owner's rights.
            "CREATE SCHEMA evil",
            "CREATE FUNCTION evil.to_jsonb(anyelement) RETURNS jsonb LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$",
            f"GRANT USAGE ON SCHEMA evil TO {app}",
        )
        with psycopg.connect(app_dsn, autocommit=True) as conn:
            conn.execute("SET search_path = evil, pg_catalog, public")
            conn.execute("INSERT INTO orders (customer_id, total) VALUES (7, 1)")
            conn.execute("DELETE FROM orders")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM walsaga.outbox")
    assert [(row[0], row[3]["total"]) for row in outbox(legacy_db)] == [("OrderDeleted", 1)]


# --- message mode ------------------------------------------------------------


@pytest.fixture
def slot(legacy_db: str) -> Iterator[str]:
    """A wal2json slot on the legacy database, read as the relay reads its own."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(legacy_db, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (name,))
    yield name
    with psycopg.connect(legacy_db, autocommit=True) as conn, contextlib.suppress(psycopg.Error):
        conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))


def events(dsn: str, slot: str) -> list[tuple[dict[str, Any], OutboxEvent]]:
    """What the relay would publish from `slot` since the last call: each wal2json
    message with the event decoded from it."""
    options = [text for pair in PLUGIN_OPTIONS.items() for text in pair]
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, VARIADIC %s::text[])",
            (slot, options),
        ).fetchall()
    found = []
    for (data,) in rows:
        event = wal2json.decode(data.encode())
        if isinstance(event, OutboxEvent):
            found.append((json.loads(data), event))
    return found


def published(event: OutboxEvent) -> tuple[Any, ...]:
    return (
        event.type,
        event.aggregatetype,
        event.aggregateid,
        json.loads(event.payload),
        event.headers,
    )


def test_message_mode_writes_no_outbox_row_and_emits_the_event_as_a_logical_message(
    legacy_db: str, tmp_path: Path, slot: str
) -> None:
    approved_in_outbox = ORDER_APPROVED.replace(
        'event = "OrderApproved"', 'event = "OrderApproved"\nmode = "outbox"'
    )
    spec = 'mode = "message"\n' + ORDER_CREATED + approved_in_outbox + ORDER_DELETED
    deployed(legacy_db, write_spec(tmp_path, spec))
    run(
        legacy_db,
        "INSERT INTO orders (customer_id, total) VALUES (7, 10.50)",
        "INSERT INTO orders (customer_id, total, note) VALUES (8, 20, 'gift')",
        "UPDATE orders SET status = 'APPROVED' WHERE id = 1",
        "DELETE FROM orders WHERE id = 2",
    )
    with psycopg.connect(legacy_db) as conn:  # transactional messages: none if rolled back
        conn.execute("INSERT INTO orders (customer_id, total) VALUES (7, 99)")
        conn.rollback()

    found = events(legacy_db, slot)
    created = ("OrderCreated", "order")
    assert [published(event) for _, event in found] == [
        (*created, "1", {"id": 1, "customer_id": 7, "total": 10.5}, {"customer": "7"}),
        (*created, "2", {"id": 2, "customer_id": 8, "total": 20}, {"customer": "8"}),
        ("OrderApproved", "order", "1", {"id": 1, "status": "APPROVED"}, None),
        (
            "OrderDeleted",
            "order",
            "2",
            {"id": 2, "customer_id": 8, "total": 20, "status": "PENDING", "note": "gift"},
            None,
        ),
    ]  # fmt: skip
    messages = [(raw, event) for raw, event in found if raw["action"] == "M"]
    assert [event.type for _, event in messages] == ["OrderCreated", "OrderCreated", "OrderDeleted"]
    for raw, event in messages:
        assert raw["prefix"] == "walsaga"
        assert raw["transactional"] is True
        # The shape walsaga.emit() gives a message.
        content = json.loads(raw["content"])
        assert list(content) == ["id", "aggregatetype", "aggregateid", "type", "payload", "headers"]
        assert uuid.UUID(event.id).version == 4
        assert event.xid is not None
    assert len({event.id for _, event in found}) == 4
    # Only the outbox-mode entry left a row.
    assert [row[0] for row in outbox(legacy_db)] == ["OrderApproved"]


def test_message_mode_needs_no_right_to_emit_messages(
    legacy_db: str, tmp_path: Path, slot: str, pg_server: Any
) -> None:
    deployed(legacy_db, write_spec(tmp_path, 'mode = "message"\n' + ORDER_CREATED))
    app = f"app_{uuid.uuid4().hex[:8]}"
    with as_role(pg_server, legacy_db, app, uuid.uuid4().hex) as app_dsn:
        run(
            legacy_db,
            f"GRANT SELECT, INSERT ON orders TO {app}",
            f"GRANT USAGE ON SEQUENCE orders_id_seq TO {app}",
            # With the right to emit messages revoked, a role that writes the
            # table cannot forge events, and its writes are still captured.
            "REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text),"
            " pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC",
            "CREATE SCHEMA evil",
            "CREATE FUNCTION evil.gen_random_uuid() RETURNS uuid LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$",
            f"GRANT USAGE ON SCHEMA evil TO {app}",
        )
        with psycopg.connect(app_dsn, autocommit=True) as conn:
            conn.execute("SET search_path = evil, pg_catalog, public")
            conn.execute("INSERT INTO orders (customer_id, total) VALUES (7, 1)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT pg_logical_emit_message(true, 'walsaga', '{}')")
    assert [published(event)[:3] for _, event in events(legacy_db, slot)] == [
        ("OrderCreated", "order", "1")
    ]


def test_message_mode_refuses_a_write_whose_aggregate_id_is_null(
    legacy_db: str, tmp_path: Path, slot: str
) -> None:
    spec = 'mode = "message"\n' + ORDER_CREATED.replace(
        'aggregate_id = "id"', 'aggregate_id = "note"'
    )
    deployed(legacy_db, write_spec(tmp_path, spec))
    with pytest.raises(psycopg.errors.NotNullViolation, match='aggregate_id "note" is null'):
        run(legacy_db, "INSERT INTO orders (customer_id, total) VALUES (7, 1)")
    run(legacy_db, "INSERT INTO orders (customer_id, total, note) VALUES (7, 1, 'n-1')")
    assert [event.aggregateid for _, event in events(legacy_db, slot)] == ["n-1"]


def test_changing_the_mode_replaces_the_trigger(legacy_db: str, tmp_path: Path) -> None:
    deployed(legacy_db, write_spec(tmp_path, ORDER_CREATED))
    result = deployed(legacy_db, write_spec(tmp_path, 'mode = "message"\n' + ORDER_CREATED))
    assert result.stdout.splitlines()[1:] == ["public.orders → OrderCreated on insert: replaced"]
    run(legacy_db, "INSERT INTO orders (customer_id, total) VALUES (7, 1)")
    assert outbox(legacy_db) == []


@contextlib.contextmanager
def as_role(pg_server: Any, dsn: str, role: str, password: str) -> Iterator[str]:
    """A login role for the test (roles are per cluster: dropped afterwards)."""
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    try:
        yield conninfo.make_conninfo(dsn, user=role, password=password)
    finally:
        drop_role(pg_server, dsn, role)


def drop_role(pg_server: Any, dsn: str, role: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# --- deploy, re-apply, plan, drop --------------------------------------------


def test_without_a_spec_deploy_installs_then_reports_the_schema_up_to_date(
    legacy_db: str,
) -> None:
    first = cli("deploy", "--dsn", legacy_db)
    assert first.exit_code == 0, first.output
    assert (
        "schema: applied version 5 (001_outbox.sql, 002_outbox_time_ordered_ids.sql, "
        "003_relay_dead_letter.sql, 004_trace_context.sql, "
        "005_publish_cached_plan.sql)"
    ) in first.stdout
    again = cli("deploy", env={"WALSAGA_DSN": legacy_db})
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines() == [
        "schema: version 5, up to date",
        "nothing changed: the database already matches",
    ]


def test_deploy_reports_each_entry_and_reapplying_changes_nothing(
    legacy_db: str, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, SPEC)
    first = deployed(legacy_db, spec)
    assert first.stdout.splitlines()[1:] == [
        "public.orders → OrderCreated on insert: installed",
        "public.orders → OrderApproved on update: installed",
        "public.orders → OrderDeleted on delete: installed",
    ]
    before = catalog(legacy_db)
    again = deployed(legacy_db, spec)
    assert again.stdout.splitlines() == [
        "schema: version 5, up to date",
        "public.orders → OrderCreated on insert: unchanged",
        "public.orders → OrderApproved on update: unchanged",
        "public.orders → OrderDeleted on delete: unchanged",
        "nothing changed: the database already matches",
    ]
    assert catalog(legacy_db) == before


def test_a_changed_entry_is_replaced_and_one_left_out_of_the_spec_is_dropped(
    legacy_db: str, tmp_path: Path
) -> None:
    deployed(legacy_db, write_spec(tmp_path, SPEC))
    changed = ORDER_CREATED.replace('"total"]', '"total", "status"]') + ORDER_APPROVED
    result = deployed(legacy_db, write_spec(tmp_path, changed))
    assert sorted(result.stdout.splitlines()[1:]) == [
        "public.orders → OrderApproved on update: unchanged",
        "public.orders → OrderCreated on insert: replaced",
        "public.orders → OrderDeleted on delete: dropped",
    ]
    run(
        legacy_db,
        "INSERT INTO orders (customer_id, total) VALUES (7, 1)",
        "DELETE FROM orders",
    )
    assert outbox(legacy_db) == [
        (
            "OrderCreated",
            "order",
            "1",
            {"id": 1, "customer_id": 7, "total": 1, "status": "PENDING"},
            {"customer": "7"},
        )
    ]
    assert captures(legacy_db) == [
        ("public.orders -> OrderApproved", "update"),
        ("public.orders -> OrderCreated", "insert"),
    ]


def test_a_trigger_removed_or_disabled_by_hand_is_restored_by_reapplying(
    legacy_db: str, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, ORDER_CREATED + ORDER_DELETED)
    deployed(legacy_db, spec)
    with psycopg.connect(legacy_db, autocommit=True) as conn:
        triggers = dict(
            conn.execute(
                "SELECT operation, trigger_name FROM walsaga.capture ORDER BY operation"
            ).fetchall()
        )
        conn.execute(
            sql.SQL("DROP TRIGGER {} ON orders").format(sql.Identifier(triggers["insert"]))
        )
        conn.execute(
            sql.SQL("ALTER TABLE orders DISABLE TRIGGER {}").format(
                sql.Identifier(triggers["delete"])
            )
        )
    result = deployed(legacy_db, spec)
    assert result.stdout.splitlines()[1:] == [
        "public.orders → OrderCreated on insert: installed",
        "public.orders → OrderDeleted on delete: installed",
    ]
    run(legacy_db, "INSERT INTO orders (customer_id, total) VALUES (7, 1)", "DELETE FROM orders")
    assert [row[0] for row in outbox(legacy_db)] == ["OrderCreated", "OrderDeleted"]


def test_plan_prints_the_sql_and_changes_nothing(legacy_db: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SPEC)
    before = catalog(legacy_db)
    result = deployed(legacy_db, spec, "--plan")
    assert catalog(legacy_db) == before
    out = result.stdout
    assert "CREATE TABLE walsaga.outbox" in out
    assert out.count("CREATE TRIGGER") == 3
    assert "WHEN (OLD.status IS DISTINCT FROM NEW.status AND NEW.status = 'APPROVED')" in out
    assert "-- public.orders → OrderCreated on insert: would be installed" in out
    assert out.endswith("-- plan only: nothing was changed\n")
    # Every line that is not SQL is an SQL comment: the plan can be reviewed as a script.
    assert "\n-- schema: would apply version 5" in out

    deployed(legacy_db, spec)
    changed = write_spec(tmp_path, SPEC.replace('"status"]', '"status", "note"]'))
    before = catalog(legacy_db)
    result = deployed(legacy_db, changed, "--plan")
    assert catalog(legacy_db) == before
    assert "-- public.orders → OrderApproved on update: would be replaced" in result.stdout
    assert "-- public.orders → OrderCreated on insert: unchanged" in result.stdout
    assert result.stdout.count("CREATE TRIGGER") == 1


def test_drop_leaves_no_trace(legacy_db: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SPEC)
    assert cli("deploy", "--dsn", legacy_db).exit_code == 0
    before = catalog(legacy_db)
    deployed(legacy_db, spec)
    planned = deployed(legacy_db, spec, "--drop", "--plan")
    assert "DROP TRIGGER" in planned.stdout
    assert "-- public.orders → OrderCreated on insert: would be dropped" in planned.stdout
    assert catalog(legacy_db) != before

    result = deployed(legacy_db, spec, "--drop")
    assert result.stdout.splitlines() == [
        "public.orders → OrderApproved on update: dropped",
        "public.orders → OrderCreated on insert: dropped",
        "public.orders → OrderDeleted on delete: dropped",
    ]
    assert catalog(legacy_db) == before
    run(legacy_db, "INSERT INTO orders (customer_id, total) VALUES (7, 1)", "DELETE FROM orders")
    assert outbox(legacy_db) == []
    again = deployed(legacy_db, spec, "--drop")
    assert again.stdout.splitlines() == [
        "capture.toml: nothing installed",
        "nothing changed: the database already matches",
    ]


def test_drop_removes_only_what_its_own_spec_installed(legacy_db: str, tmp_path: Path) -> None:
    orders = write_spec(tmp_path, ORDER_CREATED, "orders.toml")
    items = write_spec(
        tmp_path,
        """
[[capture]]
table = '"Order Items"'
on = ["insert"]
event = "ItemAdded"
aggregate_type = "order"
aggregate_id = "Order Id"
""",
        "items.toml",
    )
    deployed(legacy_db, orders)
    deployed(legacy_db, items)
    # Applying orders.toml again does not drop what items.toml installed.
    deployed(legacy_db, orders)
    deployed(legacy_db, orders, "--drop")
    assert captures(legacy_db) == [('public."Order Items" -> ItemAdded', "insert")]


def test_an_entry_already_captured_by_another_spec_is_refused(
    legacy_db: str, tmp_path: Path
) -> None:
    deployed(legacy_db, write_spec(tmp_path, ORDER_CREATED, "a.toml"))
    before = catalog(legacy_db)
    other = write_spec(tmp_path, ORDER_DELETED + ORDER_CREATED, "b.toml")
    result = cli("deploy", "--dsn", legacy_db, "--spec", other)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {other}: capture[2] (orders → OrderCreated): insert on public.orders is already"
        " captured as OrderCreated by a.toml; drop it there first"
        " (walsaga deploy --spec a.toml --drop)\n"
    )
    assert catalog(legacy_db) == before


def test_deploy_waits_for_a_table_lock_only_so_long(legacy_db: str, tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, ORDER_CREATED))
    before = catalog(legacy_db)
    with psycopg.connect(legacy_db) as writer, psycopg.connect(legacy_db) as conn:
        writer.execute("INSERT INTO orders (customer_id, total) VALUES (7, 1)")  # left open
        with pytest.raises(TransientError, match=r"could not lock a table within 0\.5s"):
            deploy.deploy(conn, spec, lock_timeout_s=0.5)
        writer.rollback()
    assert catalog(legacy_db) == before


# --- bad specs ---------------------------------------------------------------

BAD_SPECS = [
    pytest.param(
        ORDER_CREATED.replace('"orders"', '"public.ordres"'),
        r'capture\[1\] \(public\.ordres → OrderCreated\): unknown table "public\.ordres"$',
        id="unknown table",
    ),
    pytest.param(
        ORDER_CREATED.replace('"orders"', '"Order Items"'),
        r'table "Order Items" is not a valid name: invalid name syntax \(quote names',
        id="unquoted name with a space",
    ),
    pytest.param(
        ORDER_CREATED.replace('"orders"', '"big_orders"'),
        r"public\.big_orders is not a table",
        id="a view",
    ),
    pytest.param(
        ORDER_CREATED.replace('"total"]', '"totl"]'),
        r'capture\[1\] \(orders → OrderCreated\): unknown column "totl" in payload: '
        r'public\.orders has no such column \(did you mean "total"\?\)$',
        id="unknown payload column",
    ),
    pytest.param(
        ORDER_CREATED.replace('customer = "customer_id"', 'customer = "client"'),
        r'unknown column "client" in headers\.customer',
        id="unknown header column",
    ),
    pytest.param(
        ORDER_CREATED.replace('aggregate_id = "id"', 'aggregate_id = "ID"'),
        r'unknown column "ID" in aggregate_id',
        id="unknown aggregate_id column",
    ),
    pytest.param(
        ORDER_CREATED.replace('["insert"]', "[]"),
        r"capture\[1\] \(orders → OrderCreated\): on: lists no operation",
        id="empty on",
    ),
    pytest.param(
        ORDER_CREATED.replace('["insert"]', '["insert", "truncate"]'),
        r'on: unknown operation "truncate"',
        id="unknown on",
    ),
    pytest.param(
        ORDER_APPROVED.replace("NEW.status = 'APPROVED'", "NEW.status = "),
        r"capture\[1\] \(public\.orders → OrderApproved\): when does not compile for update: "
        r"syntax error",
        id="when syntax error",
    ),
    pytest.param(
        ORDER_APPROVED.replace("NEW.status = 'APPROVED'", "NEW.state = 'APPROVED'"),
        r"when does not compile for update: column new\.state does not exist$",
        id="when unknown column",
    ),
    pytest.param(
        ORDER_APPROVED.replace('["update"]', '["update", "delete"]'),
        r"when does not compile for delete: DELETE trigger's WHEN condition cannot reference "
        r"NEW values \(a delete captures OLD; give delete an entry of its own\)$",
        id="when NEW on delete",
    ),
    pytest.param(
        ORDER_CREATED + ORDER_CREATED.replace('"orders"', '"public.orders"'),
        r"capture\[2\] \(public\.orders → OrderCreated\): duplicates capture\[1\]: "
        r"both capture insert on public\.orders as OrderCreated$",
        id="duplicate entry",
    ),
    pytest.param(
        ORDER_CREATED + "[[capture]\n",
        r"capture\.toml: not valid TOML: ",
        id="malformed TOML",
    ),
    pytest.param(
        # Valid SQL if it ran as several statements: the trigger, a DROP, another trigger.
        ORDER_CREATED
        + ORDER_APPROVED.replace(
            "OLD.status IS DISTINCT FROM NEW.status AND NEW.status = 'APPROVED'",
            "true) EXECUTE FUNCTION pg_catalog.suppress_redundant_updates_trigger();"
            " DROP TABLE customers CASCADE;"
            " CREATE TRIGGER x AFTER UPDATE ON orders FOR EACH ROW WHEN (true",
        ),
        r"capture\[2\] \(public\.orders → OrderApproved\): when does not compile for update: "
        r"it must be one SQL expression$",
        id="when smuggling statements",
    ),
    pytest.param(
        ORDER_APPROVED.replace(
            "OLD.status IS DISTINCT FROM NEW.status AND NEW.status = 'APPROVED'",
            "true) EXECUTE FUNCTION pg_catalog.suppress_redundant_updates_trigger() --",
        ),
        r"when does not compile for update: syntax error",
        id="when commenting out the rest",
    ),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_a_bad_spec_is_refused_with_one_line_and_the_database_unchanged(
    legacy_db: str, tmp_path: Path, spec: str, message: str
) -> None:
    path = write_spec(tmp_path, spec)
    before = catalog(legacy_db)
    result = cli("deploy", "--dsn", legacy_db, "--spec", path)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {path}: ")
    assert result.stderr.count("\n") == 1
    assert result.stderr.rstrip("\n") == result.stderr.rstrip("\n").strip()
    assert re.search(message, result.stderr.rstrip("\n")), result.stderr
    # Not even the schema: a deploy is all or nothing.
    assert catalog(legacy_db) == before


def test_a_bad_spec_leaves_an_installed_spec_as_it_was(legacy_db: str, tmp_path: Path) -> None:
    path = write_spec(tmp_path, SPEC)
    deployed(legacy_db, path)
    before = catalog(legacy_db)
    write_spec(tmp_path, ORDER_CREATED.replace('"total"]', '"total", "totl"]'))
    assert cli("deploy", "--dsn", legacy_db, "--spec", path).exit_code == 2
    assert catalog(legacy_db) == before


def test_errors_are_one_line_on_stderr_with_exit_status_2(legacy_db: str, tmp_path: Path) -> None:
    bad = write_spec(tmp_path, ORDER_CREATED.replace('"id"', '"order_id"', 1))
    walsaga = [sys.executable, "-c", "from walsaga.cli import main; main()", "deploy"]
    env = {**os.environ, "WALSAGA_DSN": legacy_db}
    result = subprocess.run([*walsaga, "--spec", bad], capture_output=True, text=True, env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f'error: {bad}: capture[1] (orders → OrderCreated): unknown column "order_id" in '
        'aggregate_id: public.orders has no such column (did you mean "customer_id"?)'
    ]
    nowhere = conninfo.make_conninfo(legacy_db, host="127.0.0.1", port="1", connect_timeout="2")
    result = subprocess.run(
        [*walsaga, "--dsn", nowhere], capture_output=True, text=True, env=os.environ
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: cannot connect to the database: ")
    assert "Traceback" not in result.stderr


# --- the relay's role --------------------------------------------------------


def test_the_relay_role_can_do_its_work_and_nothing_more(
    legacy_db: str, tmp_path: Path, pg_server: Any
) -> None:
    role = f"relay_{uuid.uuid4().hex[:8]}"
    password = "s3cret 'pw'"
    env = {"RELAY_PASSWORD": password}
    args = ("deploy", "--dsn", legacy_db, "--relay-role", role, "--relay-password-env")
    try:
        result = cli(*args, "RELAY_PASSWORD", "--spec", write_spec(tmp_path, SPEC), env=env)
        assert result.exit_code == 0, result.output
        assert f"relay role {role}: created" in result.stdout
        again = cli(*args, "RELAY_PASSWORD", env=env)
        assert again.stdout.splitlines()[-2:] == [
            f"relay role {role}: unchanged",
            "nothing changed: the database already matches",
        ]
        with psycopg.connect(pg_server.admin_dsn) as admin:
            stored = admin.execute(
                "SELECT rolcanlogin, rolreplication, rolsuper, rolpassword FROM pg_authid"
                " WHERE rolname = %s",
                (role,),
            ).fetchone()
        assert stored is not None
        assert stored[:3] == (True, True, False)
        assert password not in stored[3]
        assert password_matches(stored[3], role, password)
        assert not password_matches(stored[3], role, "wrong")

        run(legacy_db, "INSERT INTO orders (customer_id, total) VALUES (7, 1)")
        relay_dsn = conninfo.make_conninfo(legacy_db, user=role, password=password)
        with psycopg.connect(relay_dsn, autocommit=True) as conn:
            (event_id,) = conn.execute("SELECT id FROM walsaga.outbox").fetchone() or (None,)
            conn.execute("DELETE FROM walsaga.outbox WHERE id = %s", (event_id,))
            conn.execute("INSERT INTO walsaga.relay_slot (slot_name) VALUES ('s')")
            conn.execute("UPDATE walsaga.relay_slot SET seen_at = now()")
            conn.execute("SELECT pg_logical_emit_message(true, 'walsaga', 'heartbeat')")
            conn.execute("SELECT slot_name, confirmed_flush_lsn FROM pg_replication_slots")
            for forbidden in (
                "SELECT * FROM orders",
                "SELECT * FROM customers",
                "INSERT INTO walsaga.outbox (aggregatetype, aggregateid, type)"
                " VALUES ('a', 'b', 'c')",
                "SELECT * FROM walsaga.capture",
                "SELECT * FROM walsaga.inbox",
                "CREATE TABLE walsaga.mine (x int)",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(forbidden)  # type: ignore[arg-type]
        with psycopg.connect(relay_dsn, replication="database", autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL wal2json").format(
                    sql.Identifier(f"t_{role}")
                )
            )
    finally:
        drop_role(pg_server, legacy_db, role)


def test_the_relay_password_comes_only_from_the_environment(legacy_db: str) -> None:
    args = ("deploy", "--dsn", legacy_db, "--relay-role", "relay_x")
    result = cli(*args, "--relay-password-env", "WALSAGA_TEST_UNSET_VAR")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: --relay-password-env: environment variable WALSAGA_TEST_UNSET_VAR is not set\n"
    )
    assert "--relay-password " not in cli("deploy", "--help").stdout
