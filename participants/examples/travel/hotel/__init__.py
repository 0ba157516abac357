"""The hotel service: a legacy service plugged into the trip saga with no code of its own.

Everything it is lives in three files next to this one: ``schema.sql`` (its
tables and procedures, as a legacy service would have them), ``capture.toml``
(which of its writes are events) and ``handlers.toml`` (which commands call
which procedure, and the schedule that expires holds). This module only
installs them and names what the trip saga needs to know.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Any

import psycopg

from participants.declarative import ParticipantConfig, build, load_participant_config
from participants.examples.capture import deploy_capture
from participants.runtime import Participant

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "schema.sql"
CAPTURE = HERE / "capture.toml"
HANDLERS = HERE / "handlers.toml"

# The names the files above use, for the trip saga.
COMMANDS = "hotel-commands"
EVENTS = "hotel"
HOLD, CONFIRM, RELEASE = "HoldRooms", "ConfirmRooms", "ReleaseRooms"
HELD = "RoomsHeld"
UNAVAILABLE = ("RoomsUnavailable", "RoomHoldFailed")
CONFIRMED = "RoomsConfirmed"
CONFIRMATION_FAILED = "RoomConfirmationFailed"
RELEASED = "RoomsReleased"
EXPIRED = "RoomHoldExpired"


def install(conn: psycopg.Connection[Any], hotels: Mapping[str, int] | None = None) -> None:
    """Create the legacy schema and `hotels` (id -> rooms a night) when given,
    then deploy walsaga with the capture spec (as ``walsaga deploy`` would)."""
    with conn.transaction():
        exists = conn.execute("SELECT to_regclass('public.hotels') IS NOT NULL").fetchone()
        if not (exists and exists[0]):
            conn.execute(SCHEMA.read_text())
        for hotel_id, rooms in (hotels or {}).items():
            conn.execute(
                "INSERT INTO hotels (id, name, rooms) VALUES (%s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET rooms = EXCLUDED.rooms",
                (hotel_id, f"Hotel {hotel_id}", rooms),
            )
    conn.commit()
    deploy_capture(conn, CAPTURE)


def config(dsn: str, kafka: Mapping[str, Any], **participant: Any) -> ParticipantConfig:
    """handlers.toml with this machine's database and broker."""
    base = load_participant_config(HANDLERS)
    return base.model_copy(
        update={
            "participant": base.participant.model_copy(update={"dsn": dsn, **participant}),
            "kafka": {**base.kafka, **kafka},
        }
    )


def participant(*, dsn: str, kafka: dict[str, Any], **settings: Any) -> Participant:
    """The hotel service's consumer: handlers.toml, run by the declarative runtime."""
    return build(config(dsn, kafka, **settings))


def rooms_left(conn: psycopg.Connection[Any], hotel_id: str, night: date) -> int | None:
    """Rooms of `hotel_id` neither held nor booked on `night`; None for an unknown hotel."""
    row = conn.execute(
        "SELECT rooms - rooms_taken(id, %s) FROM hotels WHERE id = %s", (night, hotel_id)
    ).fetchone()
    return int(row[0]) if row else None
