"""Running the travel services: each one's install and its configured participant, by name."""

from __future__ import annotations

from typing import Any, Literal, get_args

import psycopg

from participants.examples.travel import car, flight, hotel, trip
from participants.runtime import Participant

ServiceName = Literal["flight", "hotel", "car", "trip"]
SERVICES: tuple[ServiceName, ...] = get_args(ServiceName)


def install(name: ServiceName, conn: psycopg.Connection[Any]) -> None:
    """Create service `name`'s tables and walsaga objects in its database (no inventory)."""
    installers = {
        "flight": flight.install,
        "hotel": hotel.install,
        "car": car.install,
        "trip": trip.install,
    }
    installers[name](conn)


def service(
    name: ServiceName, /, *, dsn: str, bootstrap_servers: str, **settings: Any
) -> Participant:
    """Service `name`'s participant, ready to :meth:`~Participant.run`.

    `settings` go to the participant (its ``name``, ``batch_size``, the
    ``orchestrator`` of the trip service...); librdkafka settings beyond the
    bootstrap servers can be given as ``kafka``.
    """
    kafka = {"bootstrap.servers": bootstrap_servers, **settings.pop("kafka", {})}
    if name == "flight":
        return flight.participant(dsn=dsn, kafka=kafka, **settings)
    if name == "hotel":
        return hotel.participant(dsn=dsn, kafka=kafka, **settings)
    if name == "car":
        return car.participant(dsn=dsn, kafka=kafka, **settings)
    if name == "trip":
        return trip.participant(dsn=dsn, kafka=kafka, **settings)
    raise ValueError(f"no travel service {name!r} (expected one of {', '.join(SERVICES)})")
