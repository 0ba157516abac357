"""The saga tracker and the console for the example services (what ``walsaga demo``
runs beside them): one ``tracker.toml`` that follows the order, trip and registration
sagas, mirrors their orchestrators, and shows the relay of every example database."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from participants.examples import orders
from participants.examples.registration import saga as registration
from participants.examples.travel import trip
from walsaga.config import write_toml

#: The order saga as a choreography: what starts and ends it (orchestrated, it is
#: the create-order saga and its orchestrator says how it ended).
ORDER_CHOREOGRAPHY: dict[str, Any] = {
    "type": "order",
    "started_by": ["OrderCreated"],
    "completed_by": ["OrderApproved"],
    "compensated_by": ["OrderRejected"],
    "compensations": ["CreditReleased", "CreditReservationExpired"],
    "deadline_s": 120,
}

#: The registration saga's own events. Orchestrated, it takes its status from intake's
#: database; a submission intake refuses starts no saga, and its RegistrationRefused,
#: the only record it has, ends it at once (else it would turn stuck at its deadline).
REGISTRATION: dict[str, Any] = {
    "type": registration.NAME,
    "completed_by": ["RegistrationCompleted"],
    "compensated_by": ["RegistrationRefused"],
    "deadline_s": 300,
}

OPERATOR_EVENTS = "walsaga.operator"


def topics() -> list[str]:
    """Every topic the example sagas use, and the repairs' announcements."""
    found = [orders.ORDER_TOPIC, orders.CUSTOMER_TOPIC, orders.CUSTOMER_COMMANDS, trip.EVENTS]
    for booking in trip.BOOKINGS:
        found += [booking.commands, booking.events]
    found += registration.TOPICS
    return [*dict.fromkeys(found), OPERATOR_EVENTS]


def tracker_config(
    path: str | Path,
    *,
    tracker_dsn: str,
    dsns: Mapping[str, str],
    bootstrap_servers: str,
    relay_urls: list[str] | None = None,
    http_port: int | None = None,
    console_port: int = 8090,
) -> Path:
    """Write the ``tracker.toml`` of the examples: `dsns` maps each example service
    (orders, customers, flight, hotel, car, trip, intake, identity, notifier) to its
    database, named as the relay names its sources; `relay_urls` are the relay's
    ``/healthz`` addresses."""
    definitions = {
        "orders": "participants.examples.orders:CREATE_ORDER",
        "trip": "participants.examples.travel:TRIP",
        "intake": "participants.examples.registration:REGISTRATION",
    }
    orchestrators = [
        {"name": name, "dsn": dsns[name], "source": name, "definitions": [reference]}
        for name, reference in definitions.items()
        if name in dsns
    ]
    tracker: dict[str, Any] = {"name": "saga-tracker", "dsn": tracker_dsn, "topics": topics()}
    if http_port is not None:
        tracker.update(http_port=http_port, http_host="127.0.0.1")
    return write_toml(
        path,
        {
            "tracker": tracker,
            "kafka": {"bootstrap.servers": bootstrap_servers},
            "saga": [
                ORDER_CHOREOGRAPHY,
                {"type": "create-order", "deadline_s": 120},
                {"type": "trip", "deadline_s": 300},
                REGISTRATION,
            ],
            "orchestrator": orchestrators,
            "relay_source": [
                {"name": name, "dsn": dsn, "relay_urls": list(relay_urls or [])}
                for name, dsn in dsns.items()
            ],
            "console": {"host": "127.0.0.1", "port": console_port},
        },
    )
