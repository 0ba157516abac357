"""The customer service: a legacy service plugged into sagas with no code of its own.

Everything it is lives in three files next to this one: ``schema.sql`` (its
tables and procedures, as a legacy service would have them), ``capture.toml``
(which of its writes are events) and ``handlers.toml`` (which events and
commands call which procedure). This module only installs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from participants.declarative import ParticipantConfig, load_participant_config
from participants.examples.capture import deploy_capture
from walsaga import schema

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "schema.sql"
CAPTURE = HERE / "capture.toml"
HANDLERS = HERE / "handlers.toml"


def install(conn: psycopg.Connection[Any], customers: dict[str, float] | None = None) -> None:
    """Create the legacy schema, some customers, and deploy walsaga with the capture spec."""
    exists = conn.execute("SELECT to_regclass('public.customers') IS NOT NULL").fetchone()
    if not (exists and exists[0]):
        conn.execute(SCHEMA.read_text())
    for customer_id, limit in (customers or {}).items():
        conn.execute(
            "INSERT INTO customers (id, name, credit_limit) VALUES (%s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET credit_limit = EXCLUDED.credit_limit",
            (customer_id, f"Customer {customer_id}", limit),
        )
    with conn.transaction():
        schema.apply(conn, "core")
        schema.apply(conn, "saga")
    conn.commit()
    deploy_capture(conn, CAPTURE)


def config(dsn: str, bootstrap_servers: str, **participant: Any) -> ParticipantConfig:
    """handlers.toml with this machine's database and broker."""
    base = load_participant_config(HANDLERS)
    return base.model_copy(
        update={
            "participant": base.participant.model_copy(update={"dsn": dsn, **participant}),
            "kafka": {**base.kafka, "bootstrap.servers": bootstrap_servers},
        }
    )
