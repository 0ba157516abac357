"""Versioned SQL of the ``walsaga`` schema, applied in place by ``walsaga deploy``.

Each component (``core`` in every service database, ``saga`` in an
orchestrator's) is a folder of numbered files under ``sql/``. A database
records what it has in ``walsaga.schema_version``; applying runs only the newer
files, in order, inside the caller's transaction, under an advisory lock so
two deploys cannot interleave.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg

# Any fixed number works: it only has to be the same for every deploy.
_DEPLOY_LOCK_KEY = 0x57A15A6A

_FILE_RE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def sql_root() -> Path:
    """The ``sql/`` folder: packaged inside ``walsaga`` in a wheel, top level in a checkout."""
    packaged = resources.files("walsaga") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "sql"


@dataclass(frozen=True)
class Migration:
    component: str
    version: int
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()


def migrations(component: str) -> list[Migration]:
    folder = sql_root() / component
    if not folder.is_dir():
        raise ValueError(f"no SQL component {component!r} under {sql_root()}")
    found = []
    for path in sorted(folder.iterdir()):
        m = _FILE_RE.match(path.name)
        if m:
            found.append(Migration(component, int(m.group(1)), path))
    return found


_BOOKKEEPING = """
CREATE SCHEMA IF NOT EXISTS walsaga;
CREATE TABLE IF NOT EXISTS walsaga.schema_version (
    component  text        NOT NULL,
    version    int         NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
);
"""


def installed_version(conn: psycopg.Connection[Any], component: str) -> int:
    """The highest version of `component` in the database, 0 when none."""
    exists = conn.execute("SELECT to_regclass('walsaga.schema_version') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute(
        "SELECT coalesce(max(version), 0) FROM walsaga.schema_version WHERE component = %s",
        (component,),
    ).fetchone()
    return int(row[0]) if row else 0


def pending(conn: psycopg.Connection[Any], component: str) -> list[Migration]:
    current = installed_version(conn, component)
    return [m for m in migrations(component) if m.version > current]


def apply(conn: psycopg.Connection[Any], component: str) -> list[Migration]:
    """Apply the pending migrations of `component` in the current transaction.

    Returns what was applied (empty when the database is up to date). The
    caller commits or rolls back, so a failed upgrade leaves nothing behind.
    """
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DEPLOY_LOCK_KEY,))
    conn.execute(_BOOKKEEPING)
    todo = pending(conn, component)
    for migration in todo:
        conn.execute(migration.sql)
        conn.execute(
            "INSERT INTO walsaga.schema_version (component, version) VALUES (%s, %s)",
            (migration.component, migration.version),
        )
    return todo
