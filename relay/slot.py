"""Replication slots of the relay: checking a source, creating, watching and resetting slots.

A slot the relay created is recorded in ``walsaga.relay_slot``; a recorded slot
that no longer exists, or one Postgres invalidated, stops the relay with
:class:`~walsaga.errors.SlotLostError` and the steps to recover, because the
events it held may be gone. It is never recreated silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg

from relay.config import SourceConfig
from relay.wal2json import parse_lsn
from walsaga.errors import SetupError, SlotLostError


def no_wal2json(source: str, server_version: int) -> str:
    """What to do when the server lacks wal2json (`server_version` as libpq reports it)."""
    major = server_version // 10000
    return (
        f"source {source!r}: the wal2json output plugin is not installed on the server "
        f"(Debian/Ubuntu: apt-get install postgresql-{major}-wal2json; RHEL: "
        f"dnf install wal2json_{major} from the PGDG repository)"
    )


def check_source(conn: psycopg.Connection[Any], source: SourceConfig) -> None:
    """Refuse to start, with what to do, when the source is not set up for the relay."""
    row = conn.execute(
        """
        SELECT current_setting('wal_level'),
               EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE n.nspname = 'walsaga' AND c.relname = 'outbox'),
               (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
               current_database(), current_user,
               EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE n.nspname = 'walsaga' AND c.relname = 'relay_dead_letter')
        """
    ).fetchone()
    assert row is not None
    wal_level, deployed, may_replicate, dbname, user, current = row
    if wal_level != "logical":
        raise SetupError(
            f"source {source.name!r}: wal_level is {wal_level!r}; the relay needs "
            "wal_level=logical (set it in postgresql.conf and restart Postgres)"
        )
    if not deployed:
        raise SetupError(
            f"source {source.name!r}: database {dbname!r} has no walsaga schema; "
            "deploy it first with: walsaga deploy --dsn <dsn of that database>"
        )
    if not current:
        raise SetupError(
            f"source {source.name!r}: database {dbname!r} has an older walsaga schema than "
            "this relay needs; upgrade it in place with: walsaga deploy --dsn <dsn of that "
            "database>"
        )
    if not may_replicate:
        raise SetupError(
            f"source {source.name!r}: role {user!r} lacks the REPLICATION attribute "
            "(ALTER ROLE ... REPLICATION, or use the role `walsaga deploy --relay-role` creates)"
        )
    missing = conn.execute(
        """
        SELECT array_remove(ARRAY[
            CASE WHEN NOT has_schema_privilege('walsaga', 'USAGE')
                 THEN 'USAGE on schema walsaga' END,
            CASE WHEN NOT has_table_privilege('walsaga.outbox', 'SELECT, DELETE')
                 THEN 'SELECT, DELETE on walsaga.outbox' END,
            CASE WHEN NOT has_table_privilege('walsaga.relay_slot', 'SELECT, INSERT, UPDATE')
                 THEN 'SELECT, INSERT, UPDATE on walsaga.relay_slot' END,
            CASE WHEN NOT has_table_privilege('walsaga.relay_dead_letter',
                                              'SELECT, INSERT, UPDATE')
                 THEN 'SELECT, INSERT, UPDATE on walsaga.relay_dead_letter' END
        ], NULL)
        """
    ).fetchone()
    if missing and missing[0]:
        raise SetupError(
            f"source {source.name!r}: role {user!r} lacks {'; '.join(missing[0])} "
            "(grant them, or use the role `walsaga deploy --relay-role` creates)"
        )


def ensure_slot(conn: psycopg.Connection[Any], slot: str, logger: Any) -> int:
    """Create the slot if it never existed; refuse if it was invalidated or lost.

    Returns the slot's confirmed position.
    """
    row = conn.execute(
        """
        SELECT plugin, database, wal_status, confirmed_flush_lsn::text
        FROM pg_replication_slots WHERE slot_name = %s
        """,
        (slot,),
    ).fetchone()
    dbname = conn.info.dbname
    if row is not None:
        plugin, database, wal_status, confirmed = row
        if plugin != "wal2json" or database != dbname:
            raise SetupError(
                f"slot {slot!r} exists but belongs to plugin {plugin!r} on database {database!r}; "
                "choose another slot name in the relay config"
            )
        if wal_status == "lost":
            raise SlotLostError(
                f"slot {slot!r} was invalidated by Postgres (max_slot_wal_keep_size exceeded): "
                "events in the WAL it needed are gone. Run `walsaga relay reset-slot`, start the "
                "relay, then re-publish from the outbox with `walsaga relay replay --since ...`"
            )
        return parse_lsn(confirmed) if confirmed else 0
    known = conn.execute(
        """
        SELECT created_at, confirmed_lsn::text, seen_at
        FROM walsaga.relay_slot WHERE slot_name = %s
        """,
        (slot,),
    ).fetchone()
    if known is not None:
        created_at, last_lsn, seen_at = known
        since = (seen_at or created_at) - timedelta(minutes=10)
        raise SlotLostError(
            f"slot {slot!r}, created by the relay at {created_at}, has disappeared "
            f"(last confirmed {last_lsn or 'unknown'} at {seen_at or 'unknown'}): events written "
            "since may never have been published. Run `walsaga relay reset-slot`, start the "
            "relay, then re-publish what it may have missed with `walsaga relay replay --since "
            f"'{since.isoformat(sep=' ', timespec='seconds')}'` (a margin before the last "
            "confirmation: a transaction may have started earlier than it committed)"
        )
    # Creating a logical slot waits until every transaction in progress on the
    # server (any database) has ended: a session left idle in a transaction
    # holds the relay here, and this line says where it is.
    logger.info("creating replication slot (waits for transactions in progress to end)")
    create_slot(conn, slot)
    logger.info("created replication slot")
    got = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    return parse_lsn(got[0]) if got and got[0] else 0


def create_slot(conn: psycopg.Connection[Any], slot: str) -> bool:
    """Create the wal2json slot `slot` and record it as the relay's; False if it existed.

    The record in ``walsaga.relay_slot`` is what lets a relay tell a slot that
    vanished (events may be lost) from one that never existed.
    """
    created = True
    try:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))
    except psycopg.errors.DuplicateObject:
        created = False  # another instance created it a moment ago
    except psycopg.errors.UndefinedFile as e:
        raise SetupError(no_wal2json(conn.info.dbname, conn.info.server_version)) from e
    conn.execute(
        "INSERT INTO walsaga.relay_slot (slot_name) VALUES (%s) ON CONFLICT DO NOTHING", (slot,)
    )
    return created


def reset_slot(conn: psycopg.Connection[Any], slot: str, *, force: bool = False) -> None:
    """Forget `slot` so the next relay creates it afresh at the current WAL position.

    Refuses a slot in use, and a healthy one unless `force` (its unpublished
    events would be lost). `conn` must be in autocommit mode.
    """
    row = conn.execute(
        "SELECT active, wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    if row is not None and row[0]:
        raise SetupError(f"slot {slot!r} is in use by a running relay")
    if row is not None and row[1] != "lost" and not force:
        raise SetupError(
            f"slot {slot!r} is healthy: resetting it would lose the events it still "
            "holds for the relay; start the relay instead (or use --force)"
        )
    # Bookkeeping first: once the slot is gone the relay refuses to start
    # until this row is, so never leave the slot dropped alone.
    conn.execute("DELETE FROM walsaga.relay_slot WHERE slot_name = %s", (slot,))
    if row is not None:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


@dataclass(frozen=True)
class SlotState:
    """What the server says of a slot while the relay streams it."""

    current_lsn: int
    confirmed_lsn: int | None

    @property
    def lag_bytes(self) -> int | None:
        return None if self.confirmed_lsn is None else self.current_lsn - self.confirmed_lsn


def check_slot(conn: psycopg.Connection[Any], slot: str) -> SlotState:
    """The slot's lag, noted in ``walsaga.relay_slot``; SlotLostError if it is gone."""
    row = conn.execute(
        """
        SELECT pg_current_wal_lsn()::text, confirmed_flush_lsn::text, wal_status
        FROM pg_replication_slots WHERE slot_name = %s
        """,
        (slot,),
    ).fetchone()
    if row is None:
        raise SlotLostError(f"slot {slot!r} was dropped while streaming")
    current, confirmed, wal_status = row
    if wal_status == "lost":
        raise SlotLostError(f"slot {slot!r} was invalidated by Postgres")
    conn.execute(
        "UPDATE walsaga.relay_slot SET confirmed_lsn = %s, seen_at = now() WHERE slot_name = %s",
        (confirmed, slot),
    )
    return SlotState(parse_lsn(current), parse_lsn(confirmed) if confirmed else None)
