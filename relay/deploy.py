"""Installing the capture layer into a service database (``walsaga deploy``).

:func:`deploy` applies the core schema and a capture spec in one transaction:
all of it or nothing. :func:`plan` runs the same and rolls back, returning the
SQL. :func:`drop` removes exactly what a spec installed. ``walsaga.capture``
records each installed trigger with its definition and the spec it came from,
so re-applying an unchanged spec changes nothing, a changed entry is replaced,
and an entry that left its spec is dropped when that spec is applied again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg import errors as pgerr
from psycopg import sql

from relay.capture import Capture, CaptureSpec, resolve, trigger_type
from walsaga import schema
from walsaga.errors import SetupError, SpecError, TransientError, WalsagaError, from_psycopg

CaptureAction = Literal["installed", "unchanged", "replaced", "dropped"]
RoleAction = Literal["created", "updated", "unchanged"]

DEFAULT_LOCK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RelayRole:
    """The least-privilege role the relay logs in as."""

    name: str
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class CaptureChange:
    entry: str  # "public.orders → OrderCreated"
    operation: str
    action: CaptureAction


@dataclass(frozen=True)
class RoleChange:
    name: str
    action: RoleAction


@dataclass(frozen=True)
class DeployReport:
    """What a deploy, plan or drop did (or, for a plan, would do)."""

    applied: bool  # False for a plan: nothing was changed
    spec: str | None
    schema_version: int
    migrations: tuple[str, ...]  # files applied, e.g. "001_outbox.sql"
    captures: tuple[CaptureChange, ...]
    role: RoleChange | None
    statements: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(
            self.migrations
            or any(c.action != "unchanged" for c in self.captures)
            or (self.role is not None and self.role.action != "unchanged")
        )

    @property
    def sql(self) -> str:
        return "".join(s.rstrip().rstrip(";") + ";\n\n" for s in self.statements)


def deploy(
    conn: psycopg.Connection[Any],
    spec: CaptureSpec | None = None,
    *,
    relay_role: RelayRole | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> DeployReport:
    """Bring the database to the core schema and `spec`, in one transaction.

    Creating a trigger locks its table against writes until the commit; a
    lock that cannot be had within `lock_timeout_s` fails the deploy (as a
    :class:`TransientError`) instead of queueing every writer behind it.
    """
    return _deploy(conn, spec, relay_role, lock_timeout_s, apply=True)


def plan(
    conn: psycopg.Connection[Any],
    spec: CaptureSpec | None = None,
    *,
    relay_role: RelayRole | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> DeployReport:
    """What :func:`deploy` would do, checked the same way, then rolled back."""
    return _deploy(conn, spec, relay_role, lock_timeout_s, apply=False)


def drop(
    conn: psycopg.Connection[Any],
    spec: CaptureSpec,
    *,
    apply: bool = True,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> DeployReport:
    """Remove every trigger, function and ``walsaga.capture`` row that `spec` installed.

    The schema stays. With ``apply=False`` it only reports what it would drop.
    """
    run = _Run(conn)
    try:
        with conn.transaction() as tx:
            _set_lock_timeout(conn, lock_timeout_s)
            changes: list[CaptureChange] = []
            if _has_bookkeeping(conn):
                _lock_bookkeeping(conn)
                for row in _installed(conn).values():
                    if row.spec_file == spec.name:
                        _uninstall(run, row)
                        changes.append(CaptureChange(row.label, row.operation, "dropped"))
            report = DeployReport(
                applied=apply,
                spec=spec.name,
                schema_version=schema.installed_version(conn, "core"),
                migrations=(),
                captures=tuple(changes),
                role=None,
                statements=tuple(run.statements),
            )
            if not apply:
                raise psycopg.Rollback(tx)
    except psycopg.Error as e:
        raise _translate(e, lock_timeout_s) from e
    return report


def _deploy(
    conn: psycopg.Connection[Any],
    spec: CaptureSpec | None,
    relay_role: RelayRole | None,
    lock_timeout_s: float,
    *,
    apply: bool,
) -> DeployReport:
    run = _Run(conn)
    try:
        with conn.transaction() as tx:
            _set_lock_timeout(conn, lock_timeout_s)
            migrations = schema.apply(conn, "core")
            for m in migrations:
                run.statements.append(f"-- walsaga core schema, version {m.version}\n{m.sql}")
            changes = _sync(run, spec) if spec is not None else []
            role = _ensure_role(run, relay_role) if relay_role is not None else None
            report = DeployReport(
                applied=apply,
                spec=spec.name if spec is not None else None,
                schema_version=schema.installed_version(conn, "core"),
                migrations=tuple(m.path.name for m in migrations),
                captures=tuple(changes),
                role=role,
                statements=tuple(run.statements),
            )
            if not apply:
                raise psycopg.Rollback(tx)
    except psycopg.Error as e:
        raise _translate(e, lock_timeout_s) from e
    return report


class _Run:
    """Executes the statements of one deploy and keeps them for the report."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.statements: list[str] = []

    def execute(self, statement: str, *, shown: str | None = None) -> None:
        self.statements.append(shown if shown is not None else statement)
        # binary=True makes psycopg use the extended protocol, which runs
        # exactly one statement: nothing in a spec can append another.
        self.conn.execute(statement, binary=True)


def _set_lock_timeout(conn: psycopg.Connection[Any], timeout_s: float) -> None:
    conn.execute(
        "SELECT set_config('lock_timeout', %s, true)", (f"{max(1, round(timeout_s * 1000))}ms",)
    )


def _translate(error: psycopg.Error, lock_timeout_s: float) -> WalsagaError:
    if isinstance(error, pgerr.LockNotAvailable):
        return TransientError(
            f"deploy: could not lock a table within {lock_timeout_s:g}s (a long transaction "
            "holds it); nothing was changed, try again"
        )
    return from_psycopg(error, "deploy")


# --- capture triggers --------------------------------------------------------


@dataclass(frozen=True)
class _Installed:
    """A row of ``walsaga.capture``."""

    entry: str
    operation: str
    table_name: str
    trigger_name: str
    function_name: str
    definition: str
    spec_file: str | None

    @property
    def label(self) -> str:
        return self.entry.replace(" -> ", " → ", 1)


def _has_bookkeeping(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass('walsaga.capture') IS NOT NULL").fetchone()
    return bool(row and row[0])


def _lock_bookkeeping(conn: psycopg.Connection[Any]) -> None:
    # Two deploys of the same database take turns (readers are not blocked).
    conn.execute("LOCK TABLE walsaga.capture IN EXCLUSIVE MODE")


def _installed(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], _Installed]:
    rows = conn.execute(
        """
        SELECT entry, operation, table_name, trigger_name, function_name, definition, spec_file
        FROM walsaga.capture ORDER BY entry, operation
        """
    ).fetchall()
    return {(r[0], r[1]): _Installed(*r) for r in rows}


def _sync(run: _Run, spec: CaptureSpec) -> list[CaptureChange]:
    conn = run.conn
    captures = resolve(conn, spec)
    _lock_bookkeeping(conn)
    installed = _installed(conn)
    for c in captures:
        row = installed.get((c.key, c.operation))
        if row is not None and row.spec_file != spec.name:
            owner = row.spec_file or "another spec"
            raise SpecError(
                f"{spec.where(c.index)}: {c.operation} on {c.table.display} is already captured "
                f"as {c.entry.event} by {owner}; drop it there first "
                f"(walsaga deploy --spec {owner} --drop)"
            )
    wanted = {(c.key, c.operation) for c in captures}
    changes: list[CaptureChange] = []
    for key, row in installed.items():
        if row.spec_file == spec.name and key not in wanted:
            _uninstall(run, row)
            changes.append(CaptureChange(row.label, row.operation, "dropped"))
    for c in captures:
        row = installed.get((c.key, c.operation))
        present = row is not None and _present(conn, row, c)
        if present and row is not None and row.definition == c.definition:
            changes.append(CaptureChange(c.label, c.operation, "unchanged"))
            continue
        if row is not None:
            _uninstall(run, row)
        _install(run, c, spec)
        changes.append(CaptureChange(c.label, c.operation, "replaced" if present else "installed"))
    return changes


def _present(conn: psycopg.Connection[Any], row: _Installed, capture: Capture) -> bool:
    """Whether the recorded trigger still exists, enabled, on the table the spec names."""
    found = conn.execute(
        """
        SELECT EXISTS (
            SELECT 1 FROM pg_trigger
            WHERE tgrelid = %s AND tgname = %s AND tgenabled IN ('O', 'A')
              AND tgfoid = to_regprocedure(format('walsaga.%%I()', %s::text)))
        """,
        (capture.table.oid, row.trigger_name, row.function_name),
    ).fetchone()
    return bool(found and found[0])


def _install(run: _Run, capture: Capture, spec: CaptureSpec) -> None:
    conn = run.conn
    where = spec.where(capture.index)
    stage = "function"
    try:
        # A savepoint, so a failure is reported for this entry.
        with conn.transaction():
            run.execute(capture.function_sql())
            stage = "trigger"
            run.execute(capture.trigger_sql())
            _verify(conn, capture, where)
    except (pgerr.LockNotAvailable, pgerr.QueryCanceled):
        raise
    except psycopg.Error as e:
        raise _entry_error(e, capture, where, stage) from e
    conn.execute(
        """
        INSERT INTO walsaga.capture
            (entry, operation, table_name, trigger_name, function_name, definition, spec_file)
        VALUES (%s, %s, %s, %s, %s, %s, %s)
        """,
        (
            capture.key,
            capture.operation,
            capture.table.display,
            capture.trigger_name,
            capture.function_name,
            capture.definition,
            spec.name,
        ),
    )


def _verify(conn: psycopg.Connection[Any], capture: Capture, where: str) -> None:
    """Check the trigger is exactly the one generated.

    The `when` is SQL placed in the trigger's WHEN clause; text that closes the
    clause and names another function would still make one valid statement.
    """
    row = conn.execute(
        """
        SELECT count(*) FROM pg_trigger
        WHERE tgrelid = %s AND tgname = %s AND tgtype = %s AND tgnargs = 0
          AND tgfoid = to_regprocedure(format('walsaga.%%I()', %s::text))
        """,
        (
            capture.table.oid,
            capture.trigger_name,
            trigger_type(capture.operation),
            capture.function_name,
        ),
    ).fetchone()
    if not row or row[0] != 1:
        raise SpecError(f"{where}: when must be one SQL expression")


def _entry_error(error: psycopg.Error, capture: Capture, where: str, stage: str) -> WalsagaError:
    message = error.diag.message_primary or str(error)
    if isinstance(error, pgerr.InsufficientPrivilege):
        return SetupError(f"{where}: {message}")
    if stage == "trigger" and capture.entry.when is not None:
        hint = ""
        if "cannot reference NEW" in message:
            hint = " (a delete captures OLD; give delete an entry of its own)"
        elif "cannot reference OLD" in message:
            hint = " (an insert has no old row; give insert an entry of its own)"
        elif "multiple commands" in message:
            message = "it must be one SQL expression"
        return SpecError(f"{where}: when does not compile for {capture.operation}: {message}{hint}")
    return SpecError(f"{where}: cannot install the {capture.operation} trigger: {message}")


def _uninstall(run: _Run, row: _Installed) -> None:
    conn = run.conn
    tables = conn.execute(
        """
        SELECT n.nspname, c.relname
        FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE t.tgname = %s AND t.tgfoid = to_regprocedure(format('walsaga.%%I()', %s::text))
        """,
        (row.trigger_name, row.function_name),
    ).fetchall()
    for schema_name, table_name in tables:
        run.execute(
            sql.SQL("DROP TRIGGER {} ON {}")
            .format(sql.Identifier(row.trigger_name), sql.Identifier(schema_name, table_name))
            .as_string(conn)
        )
    run.execute(
        sql.SQL("DROP FUNCTION IF EXISTS {}()")
        .format(sql.Identifier("walsaga", row.function_name))
        .as_string(conn)
    )
    conn.execute(
        "DELETE FROM walsaga.capture WHERE entry = %s AND operation = %s",
        (row.entry, row.operation),
    )


# --- the relay's role --------------------------------------------------------

# What the relay needs, and nothing more: it streams with a replication
# connection (REPLICATION), deletes published outbox rows, keeps its slot's
# bookkeeping. pg_replication_slots and pg_logical_emit_message (heartbeats)
# are open to every role.
_RELAY_GRANTS = (
    ("database", None, "CONNECT"),
    ("schema", "walsaga", "USAGE"),
    ("table", "walsaga.outbox", "SELECT"),
    ("table", "walsaga.outbox", "DELETE"),
    ("table", "walsaga.relay_slot", "SELECT"),
    ("table", "walsaga.relay_slot", "INSERT"),
    ("table", "walsaga.relay_slot", "UPDATE"),
    ("table", "walsaga.relay_slot", "DELETE"),
    ("table", "walsaga.relay_dead_letter", "SELECT"),
    ("table", "walsaga.relay_dead_letter", "INSERT"),
    ("table", "walsaga.relay_dead_letter", "UPDATE"),
)


def _ensure_role(run: _Run, role: RelayRole) -> RoleChange:
    conn = run.conn
    ident = sql.Identifier(role.name)
    found = conn.execute(
        "SELECT rolcanlogin, rolreplication FROM pg_roles WHERE rolname = %s", (role.name,)
    ).fetchone()
    action: RoleAction = "unchanged"
    stale_password = role.password is not None and not _password_is(conn, role)
    if found is None or not (found[0] and found[1]) or stale_password:
        action = "created" if found is None else "updated"
        verb = sql.SQL("CREATE ROLE" if found is None else "ALTER ROLE")
        statement = sql.SQL("{} {} LOGIN REPLICATION").format(verb, ident)
        shown = statement
        if role.password is not None and (found is None or stale_password):
            secret = _password_verifier(conn, role.name, role.password)
            statement = sql.SQL("{} PASSWORD {}").format(statement, sql.Literal(secret))
            shown = sql.SQL("{} PASSWORD '********'").format(shown)
        run.execute(statement.as_string(conn), shown=shown.as_string(conn))
    for kind, target, privilege in _RELAY_GRANTS:
        if _has_privilege(conn, role.name, kind, target, privilege):
            continue
        if action == "unchanged":
            action = "updated"
        on = {
            "database": sql.SQL("DATABASE {}").format(sql.Identifier(conn.info.dbname)),
            "schema": sql.SQL("SCHEMA {}").format(sql.Identifier(target or "")),
            "table": sql.SQL("TABLE {}").format(sql.Identifier(*(target or "").split("."))),
        }[kind]
        run.execute(
            sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(privilege), on, ident).as_string(conn)
        )
    return RoleChange(role.name, action)


def _has_privilege(
    conn: psycopg.Connection[Any], role: str, kind: str, target: str | None, privilege: str
) -> bool:
    query = {
        "database": "SELECT has_database_privilege(%s, current_database(), %s)",
        "schema": "SELECT has_schema_privilege(%s, %s, %s)",
        "table": "SELECT has_table_privilege(%s, %s, %s)",
    }[kind]
    params = (role, privilege) if target is None else (role, target, privilege)
    row = conn.execute(query, params).fetchone()
    return bool(row and row[0])


def _password_verifier(conn: psycopg.Connection[Any], user: str, password: str) -> str:
    """The hashed form of `password`, so the clear text never reaches the server's logs."""
    row = conn.execute("SELECT current_setting('password_encryption')").fetchone()
    algorithm = str(row[0]) if row else "scram-sha-256"
    secret = conn.pgconn.encrypt_password(password.encode(), user.encode(), algorithm.encode())
    return secret.decode("ascii")


def _password_is(conn: psycopg.Connection[Any], role: RelayRole) -> bool:
    """Whether `role` already has this password (False when it cannot be told)."""
    if role.password is None:
        return True
    try:
        with conn.transaction():
            row = conn.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role.name,)
            ).fetchone()
    except pgerr.InsufficientPrivilege:
        return False
    stored = row[0] if row else None
    return isinstance(stored, str) and password_matches(stored, role.name, role.password)


_SCRAM_RE = re.compile(r"^SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)$")


def password_matches(verifier: str, user: str, password: str) -> bool:
    """Check `password` against a ``pg_authid.rolpassword`` (SCRAM-SHA-256 or md5)."""
    m = _SCRAM_RE.match(verifier)
    if m:
        iterations, salt, _stored_key, server_key = m.groups()
        salted = hashlib.pbkdf2_hmac(
            "sha256", password.encode(), base64.b64decode(salt), int(iterations)
        )
        expected = hmac.new(salted, b"Server Key", "sha256").digest()
        return hmac.compare_digest(expected, base64.b64decode(server_key))
    if verifier.startswith("md5"):
        digest = hashlib.md5((password + user).encode(), usedforsecurity=False).hexdigest()
        return hmac.compare_digest("md5" + digest, verifier)
    return False
