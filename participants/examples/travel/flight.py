"""The flight service: seats on flights, held for trips (Python handlers).

Commands on ``flight-commands``: ``HoldSeats``, ``ConfirmSeats``,
``ReleaseSeats`` with ``{"trip_id", "flight_id", "seats"}`` (and ``hold_s``
for a hold). Events on ``flight``: ``SeatsHeld``, ``SeatsUnavailable``,
``SeatsConfirmed``, ``SeatConfirmationFailed``, ``SeatsReleased``,
``SeatHoldExpired``, each carrying the command's ``saga_id`` header.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg

from participants.examples.travel import holds
from participants.runtime import Participant
from walsaga import schema

COMMANDS = "flight-commands"
EVENTS = "flight"

FLIGHTS = holds.Inventory(
    service="flight-service",
    commands=COMMANDS,
    events=EVENTS,
    table="flights",
    capacity_column="seats",
    item_field="flight_id",
    quantity_field="seats",
    hold="HoldSeats",
    confirm="ConfirmSeats",
    release="ReleaseSeats",
    held="SeatsHeld",
    unavailable="SeatsUnavailable",
    confirmed="SeatsConfirmed",
    confirmation_failed="SeatConfirmationFailed",
    released="SeatsReleased",
    expired="SeatHoldExpired",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS flights (
    id          text PRIMARY KEY,   -- a dated flight: 'TP1234-2025-06-01'
    origin      text,
    destination text,
    seats       int  NOT NULL CHECK (seats >= 0)
);
"""


def install(conn: psycopg.Connection[Any], flights: Mapping[str, int] | None = None) -> None:
    """The flight service's tables and walsaga (core and saga components), and
    `flights` (id -> seats) when given, in one transaction."""
    with conn.transaction():
        schema.apply(conn, "core")
        schema.apply(conn, "saga")
        conn.execute(SCHEMA)
        for flight_id, seats in (flights or {}).items():
            conn.execute(
                "INSERT INTO flights (id, seats) VALUES (%s, %s) "
                "ON CONFLICT (id) DO UPDATE SET seats = EXCLUDED.seats",
                (flight_id, seats),
            )


def participant(
    *, dsn: str, kafka: dict[str, Any], name: str = FLIGHTS.service, **settings: Any
) -> Participant:
    """The flight service's consumer."""
    return holds.participant(FLIGHTS, dsn=dsn, kafka=kafka, name=name, **settings)


def seats_left(conn: psycopg.Connection[Any], flight_id: str) -> int | None:
    return holds.available(conn, FLIGHTS, flight_id)
