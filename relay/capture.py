"""Capture specs: which writes of a legacy table become events.

A spec is a TOML file of ``[[capture]]`` entries (format in docs/capture.md).
This module loads and checks a spec, resolves it against a database's catalog
and generates one trigger, with its function, per entry and operation;
:mod:`relay.deploy` installs them. An entry's ``mode`` says how its trigger
emits an event: as a row of ``walsaga.outbox`` (the default) or as a
transactional logical message with prefix ``walsaga``, which leaves no row.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from walsaga.errors import SpecError

Operation = Literal["insert", "update", "delete"]
OPERATIONS: tuple[Operation, ...] = ("insert", "update", "delete")

Mode = Literal["outbox", "message"]
MODES: tuple[Mode, ...] = ("outbox", "message")
DEFAULT_MODE: Mode = "outbox"

# The prefix of the logical messages the relay decodes as events
# (relay.wal2json.EVENT_PREFIX; not imported, to keep the deploy side apart).
MESSAGE_PREFIX = "walsaga"

# The relay sets these Kafka headers itself; a spec header of the same name
# would shadow them (a consumer deduplicating by `id` would drop real events).
RESERVED_HEADERS = frozenset({"id", "type", "aggregatetype", "aggregateid", "source", "lsn", "xid"})

# Identifiers longer than this are truncated by Postgres (NAMEDATALEN - 1).
_MAX_IDENTIFIER_BYTES = 63


class CaptureEntry(BaseModel):
    """One ``[[capture]]`` entry of a spec, as written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    table: str
    on: list[str]
    when: str | None = None
    event: str
    aggregate_type: str
    aggregate_id: str
    payload: list[str] | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    mode: Mode | None = None  # None: the spec's mode (see parse_spec)

    @field_validator("table", "event", "aggregate_type", "aggregate_id")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("on")
    @classmethod
    def _operations(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("lists no operation (expected any of insert, update, delete)")
        for op in value:
            if op not in OPERATIONS:
                raise ValueError(
                    f'unknown operation "{op}" (expected any of insert, update, delete)'
                )
        if len(set(value)) != len(value):
            raise ValueError("lists an operation twice")
        return value

    @field_validator("when")
    @classmethod
    def _when(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty (omit it to capture every row)")
        return value

    @field_validator("payload")
    @classmethod
    def _payload(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("lists no column (omit it to capture the whole row)")
        twice = sorted({c for c in value if value.count(c) > 1})
        if twice:
            raise ValueError(f"lists column {_quoted(twice[0])} twice")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name:
                raise ValueError("a header name is empty")
            if name in RESERVED_HEADERS:
                raise ValueError(
                    f"header {_quoted(name)} is set by the relay on every event; "
                    "choose another name"
                )
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: object) -> object:
        return _check_mode(value)

    @property
    def operations(self) -> tuple[Operation, ...]:
        return cast(tuple[Operation, ...], tuple(self.on))


def _check_mode(value: object) -> object:
    if value is not None and value not in MODES:
        raise ValueError(f'unknown mode {_quoted(str(value))} (expected "outbox" or "message")')
    return value


class _SpecFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Mode = DEFAULT_MODE
    capture: list[CaptureEntry]

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: object) -> object:
        return _check_mode(value)


@dataclass(frozen=True)
class CaptureSpec:
    """A loaded spec. ``name`` (the file name) identifies it in ``walsaga.capture``."""

    name: str
    source: str
    entries: tuple[CaptureEntry, ...]

    def where(self, index: int) -> str:
        """How an error names entry `index` (1-based): file, position, table and event."""
        entry = self.entries[index - 1]
        return f"{self.source}: capture[{index}] ({entry.table} → {entry.event})"


def load_spec(path: str | Path) -> CaptureSpec:
    """Read and check a spec file (not yet against a database)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SpecError(f"{path}: cannot read the spec: {reason}") from e
    return parse_spec(text, source=str(path), name=path.name)


def parse_spec(text: str, *, source: str, name: str | None = None) -> CaptureSpec:
    """Check a spec's text; `source` names it in errors, `name` identifies it once deployed."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{source}: not valid TOML: {e}") from e
    try:
        spec_file = _SpecFile.model_validate(data)
    except ValidationError as e:
        raise SpecError(_describe(e, data, source)) from e
    # An entry without a mode of its own takes the spec's.
    entries = tuple(
        e if e.mode is not None else e.model_copy(update={"mode": spec_file.mode})
        for e in spec_file.capture
    )
    return CaptureSpec(name or Path(source).name, source, entries)


def _describe(error: ValidationError, data: Mapping[str, Any], source: str) -> str:
    """The first problem of a validation error, naming the entry and the key."""
    first = error.errors()[0]
    loc, kind = first["loc"], first["type"]
    message = str(first["ctx"]["error"]) if kind == "value_error" else first["msg"]
    if loc == ("capture",) and kind == "missing":
        return f"{source}: no [[capture]] entries (write `capture = []` to capture nothing)"
    if loc == ("capture",):
        return f"{source}: capture must be an array of tables: write each entry as [[capture]]"
    if len(loc) < 2 or loc[0] != "capture" or not isinstance(loc[1], int):
        if kind == "extra_forbidden":
            return f"{source}: unknown key {_quoted(str(loc[0]))}"
        return f"{source}: {'.'.join(map(str, loc))}: {message}"
    index = loc[1] + 1
    raw = data["capture"][loc[1]]
    label = ""
    if isinstance(raw, dict):
        table, event = raw.get("table"), raw.get("event")
        label = " → ".join(str(v) for v in (table, event) if isinstance(v, str))
    where = f"{source}: capture[{index}]" + (f" ({label})" if label else "")
    if len(loc) == 2:
        return f"{where}: {message}"
    key = str(loc[2])
    if kind == "missing":
        return f"{where}: missing key {_quoted(key)}"
    if kind == "extra_forbidden":
        return f"{where}: unknown key {_quoted(key)}"
    return f"{where}: {key}: {message}"


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '\\"') + '"'


# --- the spec against a database ---------------------------------------------


@dataclass(frozen=True)
class Table:
    """A captured table as the catalog knows it."""

    oid: int
    schema: str
    name: str
    display: str  # schema.name, quoted only where SQL needs it
    columns: tuple[str, ...]

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


@dataclass(frozen=True)
class Capture:
    """One trigger to install: an entry of a spec and one of its operations."""

    index: int  # 1-based position of the entry in its spec
    entry: CaptureEntry
    operation: Operation
    table: Table

    @property
    def key(self) -> str:
        """The entry's identity in ``walsaga.capture`` (with :attr:`operation`)."""
        return f"{self.table.display} -> {self.entry.event}"

    @property
    def label(self) -> str:
        return f"{self.table.display} → {self.entry.event}"

    @property
    def row(self) -> str:
        """The row variable this operation captures: the row after, or the deleted row."""
        return "OLD" if self.operation == "delete" else "NEW"

    @property
    def mode(self) -> Mode:
        return self.entry.mode or DEFAULT_MODE

    @property
    def _hash(self) -> str:
        ident = f"{self.table.display}\0{self.entry.event}\0{self.operation}"
        return hashlib.sha256(ident.encode()).hexdigest()[:10]

    @property
    def trigger_name(self) -> str:
        return _name("walsaga", self.operation, _slug(self.entry.event), self._hash)

    @property
    def function_name(self) -> str:
        slug = _slug(self.table.name) + "_" + _slug(self.entry.event)
        return _name("capture", self.operation, slug, self._hash)

    @property
    def function_ident(self) -> sql.Identifier:
        return sql.Identifier("walsaga", self.function_name)

    def function_sql(self) -> str:
        return function_sql(self)

    def trigger_sql(self) -> str:
        return trigger_sql(self)

    @property
    def definition(self) -> str:
        """Everything that makes this trigger what it is; a change means re-install."""
        return self.function_sql() + ";\n" + self.trigger_sql() + ";\n"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "x"


def _name(prefix: str, operation: str, slug: str, digest: str) -> str:
    room = _MAX_IDENTIFIER_BYTES - len(f"{prefix}_{operation}__{digest}")
    return f"{prefix}_{slug[:room].rstrip('_')}_{operation}_{digest}"


def _render(composable: sql.Composable) -> str:
    return composable.as_string(None)


def function_sql(capture: Capture) -> str:
    """``CREATE FUNCTION`` for the trigger function of `capture`.

    The body makes one write, an INSERT or a logical message, and nothing else:
    the trigger runs inside every captured write, so each call or cast here is
    paid once per row of the legacy table.

    SECURITY DEFINER: the roles that write a legacy table need no privilege on
    schema walsaga, nor on ``pg_logical_emit_message`` (which an administrator
    may therefore revoke from PUBLIC, so that those roles cannot forge events).
    Measured, it costs nothing noticeable per call. So that the caller's
    search_path cannot put its own functions or types in the owner's place,
    every name in the body is schema-qualified (cheaper per call than a
    ``SET search_path`` clause, which makes each call open a GUC nesting level).
    """
    body = _message_body(capture) if capture.mode == "message" else _outbox_body(capture)
    tag = _dollar_tag(body)
    head = _render(
        sql.SQL(
            "CREATE FUNCTION {}() RETURNS trigger\nLANGUAGE plpgsql SECURITY DEFINER\nAS "
        ).format(capture.function_ident)
    )
    return f"{head}{tag}{body}{tag}"


def _field(capture: Capture, column: str) -> sql.Composable:
    return sql.SQL("{}.{}").format(sql.SQL(capture.row), sql.Identifier(column))


def _as_text(capture: Capture, column: str) -> sql.Composable:
    return sql.SQL("{}::pg_catalog.text").format(_field(capture, column))


def _outbox_body(capture: Capture) -> str:
    """One INSERT into walsaga.outbox; ``id`` and ``created_at`` come from its defaults."""
    entry = capture.entry
    if entry.payload is None:
        payload: sql.Composable = sql.SQL("pg_catalog.to_jsonb({})").format(sql.SQL(capture.row))
    else:
        payload = _object("jsonb", ((c, _field(capture, c)) for c in entry.payload))
    columns = [sql.SQL("aggregatetype, aggregateid, type, payload")]
    values = [
        sql.Literal(entry.aggregate_type),
        _as_text(capture, entry.aggregate_id),
        sql.Literal(entry.event),
        payload,
    ]
    columns.append(sql.SQL("headers"))
    if entry.headers:
        values.append(
            sql.SQL("{} || {}").format(
                _trace("jsonb"),
                _object("jsonb", ((n, _as_text(capture, c)) for n, c in entry.headers.items())),
            )
        )
    else:
        values.append(_trace("jsonb"))
    return _render(
        sql.SQL(
            "\nBEGIN\n"
            "    INSERT INTO walsaga.outbox ({columns})\n"
            "    VALUES ({values});\n"
            "    RETURN NULL;\n"
            "END\n"
        ).format(
            columns=sql.SQL(", ").join(columns),
            values=sql.SQL(",\n            ").join(values),
        )
    )


def _message_body(capture: Capture) -> str:
    """A transactional logical message with the JSON that ``walsaga.emit()`` sends.

    An assignment, not PERFORM: PL/pgSQL evaluates a simple expression
    directly, while PERFORM runs a query through SPI and the executor. The JSON
    is built as ``json``, not ``jsonb`` (about 2 µs less per call, measured):
    it is only ever sent as text, and the relay parses it anyway. The id is
    random (version 4), as ``walsaga.emit()`` makes it: nothing indexes it.
    """
    entry = capture.entry
    if entry.payload is None:
        payload: sql.Composable = sql.SQL("pg_catalog.to_json({})").format(sql.SQL(capture.row))
    else:
        payload = _object("json", ((c, _field(capture, c)) for c in entry.payload))
    headers: sql.Composable = _trace("jsonb")
    if entry.headers:
        headers = sql.SQL("{} || {}").format(
            _trace("jsonb"),
            _object("jsonb", ((n, _as_text(capture, c)) for n, c in entry.headers.items())),
        )
    event = sql.SQL(",\n            ").join(
        sql.SQL("{}, {}").format(sql.Literal(key), value)
        for key, value in (
            ("id", sql.SQL("pg_catalog.gen_random_uuid()")),
            ("aggregatetype", sql.Literal(entry.aggregate_type)),
            ("aggregateid", _as_text(capture, entry.aggregate_id)),
            ("type", sql.Literal(entry.event)),
            ("payload", payload),
            ("headers", headers),
        )
    )
    # The outbox refuses a NULL aggregate id (NOT NULL); a message must too,
    # or the relay would meet an event it cannot key.
    null_id = (
        f"{capture.label}: aggregate_id {_quoted(entry.aggregate_id)} is null "
        "(an event needs a key)"
    )
    return _render(
        sql.SQL(
            "\nDECLARE\n"
            "    lsn pg_catalog.pg_lsn;\n"
            "BEGIN\n"
            "    IF {aggregate_id} IS NULL THEN\n"
            "        RAISE EXCEPTION USING ERRCODE = 'not_null_violation', MESSAGE = {null_id};\n"
            "    END IF;\n"
            "    lsn := pg_catalog.pg_logical_emit_message(true, {prefix},\n"
            "        pg_catalog.json_build_object(\n"
            "            {event})::pg_catalog.text);\n"
            "    RETURN NULL;\n"
            "END\n"
        ).format(
            aggregate_id=_field(capture, entry.aggregate_id),
            null_id=sql.Literal(null_id),
            prefix=sql.Literal(MESSAGE_PREFIX),
            event=event,
        )
    )


def _trace(kind: Literal["jsonb"]) -> sql.Composable:
    """The transaction's trace context (``walsaga.traceparent``/``tracestate``, and the
    ``walsaga.causation_id`` a participant sets with them) as headers.

    Read with one setting lookup when none is set, the usual case; a
    transaction that sets them has its events carry them.
    """
    return sql.SQL(
        "CASE WHEN pg_catalog.current_setting('walsaga.traceparent', true) > '' "
        "THEN pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object("
        "'traceparent', pg_catalog.current_setting('walsaga.traceparent', true), "
        "'tracestate', NULLIF(pg_catalog.current_setting('walsaga.tracestate', true), ''), "
        "'causation_id', NULLIF(pg_catalog.current_setting('walsaga.causation_id', true), ''))) "
        "ELSE '{}'::pg_catalog.jsonb END"
    )


def _object(
    kind: Literal["json", "jsonb"], pairs: Iterable[tuple[str, sql.Composable]]
) -> sql.Composable:
    args = sql.SQL(", ").join(sql.SQL("{}, {}").format(sql.Literal(k), v) for k, v in pairs)
    return sql.SQL("pg_catalog.{}_build_object({})").format(sql.SQL(kind), args)


def _dollar_tag(body: str) -> str:
    """A dollar-quote tag that does not occur in `body`, so no literal can end the quote."""
    tag, n = "$walsaga$", 0
    while tag in body:
        n += 1
        tag = f"$walsaga{n}$"
    return tag


def trigger_sql(capture: Capture) -> str:
    when = capture.entry.when
    clause: sql.Composable = sql.SQL("")
    if when is not None:
        # The newline lets the expression end in a -- comment.
        end = "\n" if "\n" in when or "--" in when else ""
        clause = sql.SQL("\n    WHEN ({}{})").format(sql.SQL(when.strip()), sql.SQL(end))
    return _render(
        sql.SQL(
            "CREATE TRIGGER {trigger} AFTER {operation} ON {table}\n"
            "    FOR EACH ROW{when} EXECUTE FUNCTION {function}()"
        ).format(
            trigger=sql.Identifier(capture.trigger_name),
            operation=sql.SQL(capture.operation.upper()),
            table=capture.table.ident,
            when=clause,
            function=capture.function_ident,
        )
    )


# pg_trigger.tgtype bits (Postgres's trigger.h): ROW, then one bit per event.
_TGTYPE_ROW = 1
_TGTYPE_EVENT = {"insert": 4, "delete": 8, "update": 16}


def trigger_type(operation: Operation) -> int:
    """``pg_trigger.tgtype`` of an AFTER ... FOR EACH ROW trigger on `operation`."""
    return _TGTYPE_ROW | _TGTYPE_EVENT[operation]


def resolve(conn: psycopg.Connection[Any], spec: CaptureSpec) -> list[Capture]:
    """Check `spec` against the catalog and return the triggers it asks for.

    Catches unknown tables and columns and duplicate entries; a ``when`` is
    checked later, by creating its trigger (see :mod:`relay.deploy`).
    """
    captures: list[Capture] = []
    seen: dict[tuple[str, str], int] = {}
    tables: dict[str, Table] = {}
    for index, entry in enumerate(spec.entries, start=1):
        where = spec.where(index)
        table = tables.get(entry.table)
        if table is None:
            table = tables[entry.table] = _table(conn, entry.table, where)
        _check_columns(entry, table, where)
        for operation in entry.operations:
            capture = Capture(index, entry, operation, table)
            first = seen.setdefault((capture.key, operation), index)
            if first != index:
                raise SpecError(
                    f"{where}: duplicates capture[{first}]: both capture {operation} "
                    f"on {table.display} as {entry.event}"
                )
            captures.append(capture)
    return captures


def _table(conn: psycopg.Connection[Any], name: str, where: str) -> Table:
    try:
        with conn.transaction():
            found = conn.execute(
                """
                SELECT c.oid, n.nspname, c.relname, c.relkind,
                       format('%%I.%%I', n.nspname, c.relname),
                       array(SELECT a.attname::text FROM pg_attribute a
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                              ORDER BY a.attnum)
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.oid = to_regclass(%s)
                """,
                (name,),
            ).fetchone()
    except psycopg.Error as e:
        hint = ""
        if '"' not in name:
            hint = " (quote names with spaces or capitals as in SQL: 'public.\"Order Items\"')"
        reason = e.diag.message_primary or str(e)
        raise SpecError(
            f"{where}: table {_quoted(name)} is not a valid name: {reason}{hint}"
        ) from e
    if found is None:
        raise SpecError(f"{where}: unknown table {_quoted(name)}")
    oid, schema_name, rel_name, kind, display, columns = found
    if kind not in ("r", "p"):
        raise SpecError(f"{where}: {display} is not a table (only tables can be captured)")
    if schema_name == "walsaga":
        raise SpecError(f"{where}: {display} belongs to walsaga itself and cannot be captured")
    return Table(int(oid), schema_name, rel_name, display, tuple(columns))


def _check_columns(entry: CaptureEntry, table: Table, where: str) -> None:
    uses = [("aggregate_id", entry.aggregate_id)]
    uses += [("payload", c) for c in entry.payload or ()]
    uses += [(f"headers.{name}", c) for name, c in entry.headers.items()]
    for key, column in uses:
        if column not in table.columns:
            close = difflib.get_close_matches(column, table.columns, n=1)
            hint = f" (did you mean {_quoted(close[0])}?)" if close else ""
            raise SpecError(
                f"{where}: unknown column {_quoted(column)} in {key}: "
                f"{table.display} has no such column{hint}"
            )
