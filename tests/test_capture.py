"""Capture specs without a database: parsing, the errors a user sees, the SQL generated."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.capture import Capture, CaptureSpec, Table, load_spec, parse_spec
from walsaga.errors import SpecError

ORDERS = """
[[capture]]
table = "public.orders"
on = ["insert", "update"]
when = "NEW.status = 'RESERVED'"
event = "OrderCreated"
aggregate_type = "order"
aggregate_id = "id"
payload = ["id", "customer_id", "total"]
headers = { saga_id = "id" }
"""


def entry(**fields: object) -> str:
    """A one-entry spec: ORDERS' entry with `fields` replaced (None removes a key)."""
    base: dict[str, object] = {
        "table": "public.orders",
        "on": ["insert"],
        "event": "OrderCreated",
        "aggregate_type": "order",
        "aggregate_id": "id",
    }
    base.update(fields)
    lines = ["[[capture]]"]
    for key, value in base.items():
        if value is None:
            continue
        if isinstance(value, str):
            lines.append(f"{key} = {_toml_str(value)}")
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(_toml_str(v) for v in value)}]")
        elif isinstance(value, dict):
            pairs = ", ".join(f"{_toml_str(k)} = {_toml_str(v)}" for k, v in value.items())
            lines.append(f"{key} = {{ {pairs} }}")
        else:
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_a_valid_spec_is_read_as_written() -> None:
    spec = parse_spec(ORDERS, source="spec.toml")
    assert spec.name == "spec.toml"
    (only,) = spec.entries
    assert only.table == "public.orders"
    assert only.operations == ("insert", "update")
    assert only.when == "NEW.status = 'RESERVED'"
    assert only.payload == ["id", "customer_id", "total"]
    assert only.headers == {"saga_id": "id"}


def test_load_spec_names_the_spec_by_its_file_name(tmp_path: Path) -> None:
    path = tmp_path / "orders.toml"
    path.write_text(ORDERS)
    spec = load_spec(path)
    assert (spec.name, spec.source) == ("orders.toml", str(path))


def test_a_missing_file_is_a_spec_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"nope\.toml: cannot read the spec"):
        load_spec(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "[[capture]\ntable = 1\n",
            r"^spec\.toml: not valid TOML: .*line 1",
            id="malformed TOML",
        ),
        pytest.param(
            "",
            r"^spec\.toml: no \[\[capture\]\] entries",
            id="no entries",
        ),
        pytest.param(
            '[capture]\ntable = "orders"\n',
            r"^spec\.toml: capture must be an array of tables",
            id="[capture] instead of [[capture]]",
        ),
        pytest.param(
            "captures = 1\n" + ORDERS,
            r'^spec\.toml: unknown key "captures"$',
            id="unknown top-level key",
        ),
        pytest.param(
            entry(paylod=["id"]),
            r'^spec\.toml: capture\[1\] \(public\.orders → OrderCreated\): unknown key "paylod"$',
            id="unknown key",
        ),
        pytest.param(
            entry(event=None),
            r'^spec\.toml: capture\[1\] \(public\.orders\): missing key "event"$',
            id="missing key",
        ),
        pytest.param(
            entry(on=[]),
            r"capture\[1\] \(public\.orders → OrderCreated\): on: lists no operation",
            id="empty on",
        ),
        pytest.param(
            entry(on=["insert", "upsert"]),
            r'on: unknown operation "upsert" \(expected any of insert, update, delete\)$',
            id="unknown on",
        ),
        pytest.param(
            entry(on=["insert", "insert"]),
            r"on: lists an operation twice$",
            id="operation twice",
        ),
        pytest.param(entry(on="insert"), r"on: Input should be a valid list", id="on not a list"),
        pytest.param(entry(when="  "), r"when: is empty", id="blank when"),
        pytest.param(entry(event=""), r"event: must not be empty", id="empty event"),
        pytest.param(entry(payload=[]), r"payload: lists no column", id="empty payload"),
        pytest.param(
            entry(payload=["id", "id"]), r'payload: lists column "id" twice', id="payload twice"
        ),
        pytest.param(
            entry(headers={"id": "id"}),
            r'headers: header "id" is set by the relay on every event',
            id="reserved header",
        ),
        pytest.param(
            entry(mode="queue"),
            r'capture\[1\] \(public\.orders → OrderCreated\): mode: unknown mode "queue" '
            r'\(expected "outbox" or "message"\)$',
            id="unknown mode",
        ),
        pytest.param(
            'mode = "kafka"\n' + ORDERS,
            r'^spec\.toml: mode: unknown mode "kafka" \(expected "outbox" or "message"\)$',
            id="unknown spec-wide mode",
        ),
        pytest.param(entry(mode=1), r'mode: unknown mode "1"', id="mode not a string"),
    ],
)
def test_bad_specs_fail_with_one_line_naming_the_file_and_the_entry(
    text: str, message: str
) -> None:
    with pytest.raises(SpecError, match=message) as caught:
        parse_spec(text, source="spec.toml")
    assert "\n" not in str(caught.value)


def test_the_mode_is_outbox_unless_the_spec_or_the_entry_says_message() -> None:
    assert [e.mode for e in parse_spec(ORDERS, source="spec.toml").entries] == ["outbox"]
    text = (
        'mode = "message"\n'
        + ORDERS
        + entry(event="OrderPaid", mode="outbox")
        + entry(event="OrderShipped")
    )
    modes = [(e.event, e.mode) for e in parse_spec(text, source="spec.toml").entries]
    assert modes == [
        ("OrderCreated", "message"),
        ("OrderPaid", "outbox"),
        ("OrderShipped", "message"),
    ]


def test_an_error_names_the_entry_by_its_position() -> None:
    text = ORDERS + entry(event="OrderPaid", aggregate_id=None)
    with pytest.raises(SpecError, match=r"capture\[2\] \(public\.orders → OrderPaid\)"):
        parse_spec(text, source="spec.toml")


# --- generated SQL -----------------------------------------------------------

ORDERS_TABLE = Table(
    oid=1,
    schema="public",
    name="orders",
    display="public.orders",
    columns=("id", "customer_id", "total", "status"),
)


def capture(text: str, operation: str, table: Table = ORDERS_TABLE) -> Capture:
    spec: CaptureSpec = parse_spec(text, source="spec.toml")
    (only,) = spec.entries
    assert operation in only.operations
    return Capture(1, only, operation, table)  # type: ignore[arg-type]


def test_insert_and_update_capture_the_new_row_and_delete_the_old_one() -> None:
    text = entry(on=["insert", "update", "delete"], payload=["total"], headers={"saga": "id"})
    for operation, row in [("insert", "NEW"), ("update", "NEW"), ("delete", "OLD")]:
        function = capture(text, operation).function_sql()
        assert f'{row}."total"' in function
        assert f'{row}."id"::pg_catalog.text' in function
        other = "OLD" if row == "NEW" else "NEW"
        assert f"{other}." not in function
    trigger = capture(text, "delete").trigger_sql()
    assert "AFTER DELETE ON" in trigger
    assert "FOR EACH ROW" in trigger


def test_the_trigger_writes_the_outbox_and_never_sets_created_at() -> None:
    function = capture(ORDERS, "insert").function_sql()
    assert "SECURITY DEFINER" in function
    assert "INSERT INTO walsaga.outbox (aggregatetype, aggregateid, type, payload, headers)" in (
        function
    )
    assert "created_at" not in function
    assert (
        "pg_catalog.jsonb_build_object('id', NEW.\"id\", 'customer_id', NEW.\"customer_id\""
        in function
    )
    assert "pg_catalog.jsonb_build_object('saga_id', NEW.\"id\"::pg_catalog.text)" in function


def test_without_payload_the_whole_row_is_captured_and_headers_only_carry_the_trace() -> None:
    function = capture(entry(), "insert").function_sql()
    assert "pg_catalog.to_jsonb(NEW)" in function
    headers = function[function.index("payload, headers)") :]
    assert "current_setting('walsaga.traceparent', true)" in headers
    assert "NEW." not in headers.split("'OrderCreated'")[1].split("THEN")[0]


def test_when_becomes_the_trigger_when_clause() -> None:
    trigger = capture(ORDERS, "update").trigger_sql()
    assert "WHEN (NEW.status = 'RESERVED')" in trigger
    assert 'AFTER UPDATE ON "public"."orders"' in trigger


def test_a_when_ending_in_a_comment_does_not_swallow_the_rest() -> None:
    trigger = capture(entry(when="NEW.total > 0 -- big ones"), "insert").trigger_sql()
    assert trigger.endswith(f'-- big ones\n) EXECUTE FUNCTION "walsaga"."{capture_fn(trigger)}"()')


def capture_fn(trigger: str) -> str:
    return trigger.rsplit('"walsaga"."', 1)[1].split('"', 1)[0]


def test_odd_names_are_quoted_and_literals_cannot_end_the_function_body() -> None:
    odd = Table(2, "Sales Dept", 'Order "Items"', '"Sales Dept"."Order ""Items"""', ('qty "x"',))
    text = entry(
        table='"Sales Dept"."Order ""Items"""',
        event="It's $walsaga$ done",
        aggregate_type="o'rder",
        aggregate_id='qty "x"',
        payload=['qty "x"'],
    )
    c = capture(text, "insert", odd)
    function = c.function_sql()
    assert 'NEW."qty ""x"""::pg_catalog.text' in function
    assert "'It''s $walsaga$ done'" in function
    assert "'o''rder'" in function
    # The body is dollar-quoted with a tag the literal does not contain.
    assert "AS $walsaga1$" in function
    assert function.endswith("$walsaga1$")
    assert 'ON "Sales Dept"."Order ""Items"""' in c.trigger_sql()


def test_generated_names_fit_postgres_identifiers_and_differ_per_operation() -> None:
    text = entry(on=["insert", "update"], event="E" * 200)
    long_table = Table(3, "public", "t" * 63, "public." + "t" * 63, ("id",))
    names = set()
    for operation in ("insert", "update"):
        c = capture(text, operation, long_table)
        assert len(c.trigger_name.encode()) <= 63
        assert len(c.function_name.encode()) <= 63
        names.update({c.trigger_name, c.function_name})
    assert len(names) == 4


def test_the_definition_changes_with_the_entry() -> None:
    before = capture(ORDERS, "insert").definition
    after = capture(ORDERS.replace('"total"]', '"total", "status"]'), "insert").definition
    assert before != after
    assert capture(ORDERS, "insert").definition == before


# --- message mode ------------------------------------------------------------


def test_a_message_mode_trigger_emits_a_logical_message_and_never_touches_the_outbox() -> None:
    function = capture(entry(mode="message", payload=["id", "total"]), "insert").function_sql()
    assert "SECURITY DEFINER" in function
    assert "walsaga.outbox" not in function
    assert "lsn := pg_catalog.pg_logical_emit_message(true, 'walsaga'," in function
    # The JSON shape of walsaga.emit(): id, aggregatetype, aggregateid, type, payload, headers.
    assert (
        "pg_catalog.json_build_object(\n"
        "            'id', pg_catalog.gen_random_uuid(),\n"
        "            'aggregatetype', 'order',\n"
        "            'aggregateid', NEW.\"id\"::pg_catalog.text,\n"
        "            'type', 'OrderCreated',\n"
        "            'payload', pg_catalog.json_build_object("
        "'id', NEW.\"id\", 'total', NEW.\"total\"),\n"
        "            'headers', CASE WHEN pg_catalog.current_setting('walsaga.traceparent', "
        "true) > '' THEN"
    ) in function
    assert "ELSE '{}'::pg_catalog.jsonb END)::pg_catalog.text);" in function
    # A NULL key is refused, as the outbox's NOT NULL refuses it.
    assert 'IF NEW."id" IS NULL THEN' in function
    assert "ERRCODE = 'not_null_violation'" in function


def test_a_message_mode_trigger_captures_the_right_row_and_its_headers() -> None:
    text = entry(on=["insert", "delete"], mode="message", headers={"saga": "customer_id"})
    deleted = capture(text, "delete").function_sql()
    assert "pg_catalog.to_json(OLD)" in deleted
    assert 'IF OLD."id" IS NULL THEN' in deleted
    assert "NEW." not in deleted
    assert (
        "|| pg_catalog.jsonb_build_object('saga', OLD.\"customer_id\"::pg_catalog.text))" in deleted
    )
    assert "pg_catalog.to_json(NEW)" in capture(text, "insert").function_sql()


def test_changing_the_mode_changes_the_definition() -> None:
    outbox = capture(ORDERS, "insert")
    message = capture('mode = "message"\n' + ORDERS, "insert")
    assert outbox.mode == "outbox"
    assert message.mode == "message"
    assert outbox.definition != message.definition
    assert (outbox.trigger_name, outbox.function_name) == (
        message.trigger_name,
        message.function_name,
    )
