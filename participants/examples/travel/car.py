"""The car service: cars of a class at a rental station, held for trips (Python handlers).

A car class (``'LIS-compact'``) has a number of cars; a trip holds some of
them. Commands on ``car-commands``: ``HoldCar``, ``ConfirmCar``,
``ReleaseCar`` with ``{"trip_id", "car_class", "cars"}`` (and ``hold_s`` for a
hold). Events on ``car``: ``CarHeld``, ``CarUnavailable``, ``CarConfirmed``,
``CarConfirmationFailed``, ``CarReleased``, ``CarHoldExpired``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg

from participants.examples.travel import holds
from participants.runtime import Participant
from walsaga import schema

COMMANDS = "car-commands"
EVENTS = "car"

CARS = holds.Inventory(
    service="car-service",
    commands=COMMANDS,
    events=EVENTS,
    table="car_classes",
    capacity_column="cars",
    item_field="car_class",
    quantity_field="cars",
    hold="HoldCar",
    confirm="ConfirmCar",
    release="ReleaseCar",
    held="CarHeld",
    unavailable="CarUnavailable",
    confirmed="CarConfirmed",
    confirmation_failed="CarConfirmationFailed",
    released="CarReleased",
    expired="CarHoldExpired",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS car_classes (
    id      text PRIMARY KEY,   -- station and class: 'LIS-compact'
    station text,
    cars    int  NOT NULL CHECK (cars >= 0)
);
"""


def install(conn: psycopg.Connection[Any], car_classes: Mapping[str, int] | None = None) -> None:
    """The car service's tables and walsaga (core and saga components), and
    `car_classes` (id -> cars) when given, in one transaction."""
    with conn.transaction():
        schema.apply(conn, "core")
        schema.apply(conn, "saga")
        conn.execute(SCHEMA)
        for car_class, cars in (car_classes or {}).items():
            conn.execute(
                "INSERT INTO car_classes (id, station, cars) "
                "VALUES (%(id)s, split_part(%(id)s, '-', 1), %(cars)s) "
                "ON CONFLICT (id) DO UPDATE SET cars = EXCLUDED.cars",
                {"id": car_class, "cars": cars},
            )


def participant(
    *, dsn: str, kafka: dict[str, Any], name: str = CARS.service, **settings: Any
) -> Participant:
    """The car service's consumer."""
    return holds.participant(CARS, dsn=dsn, kafka=kafka, name=name, **settings)


def cars_left(conn: psycopg.Connection[Any], car_class: str) -> int | None:
    return holds.available(conn, CARS, car_class)
