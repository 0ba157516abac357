"""The trip service: trips, and the saga that books their flight, hotel and car.

Booking a trip inserts it ``PENDING`` and starts the ``trip`` saga in the same
transaction. The saga holds seats, rooms and a car, one after the other, then
confirms the three holds; the trip is ``CONFIRMED`` once all are confirmed.
When a hold is refused, goes unanswered, or a confirmation finds its hold
expired, the holds taken so far are released in reverse order and the trip
is ``REJECTED``. A trip stays ``PENDING`` while its saga runs: other readers
must treat it as not yet booked. Every change of a trip's status is announced
with ``NOTIFY walsaga_trip`` and a ``TripConfirmed``/``TripRejected`` event.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import orjson
import psycopg

from participants.examples.travel import car, flight, holds, hotel
from participants.handlers import publish
from participants.orchestrator import Orchestrator
from participants.runtime import Participant, set_trace
from participants.saga import GIVE_UP_AFTER_S, Command, RetryPolicy, Saga, Step
from walsaga import schema
from walsaga.errors import BusinessError
from walsaga.tracing import TraceContext

EVENTS = "trip"
NOTIFY_CHANNEL = "walsaga_trip"
#: How long the services hold seats, rooms and cars for a trip unless told otherwise.
DEFAULT_HOLD_S = 300.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS trips (
    id         text        PRIMARY KEY,
    traveller  text        NOT NULL,
    flight_id  text        NOT NULL,
    seats      int         NOT NULL CHECK (seats > 0),
    hotel_id   text        NOT NULL,
    check_in   date        NOT NULL,
    check_out  date        NOT NULL CHECK (check_out > check_in),
    rooms      int         NOT NULL CHECK (rooms > 0),
    car_class  text        NOT NULL,
    cars       int         NOT NULL CHECK (cars > 0),
    status     text        NOT NULL CHECK (status IN ('PENDING', 'CONFIRMED', 'REJECTED')),
    reason     text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class TripRequest:
    """What a traveller asks for: a flight, a hotel stay and a car."""

    traveller: str
    flight_id: str
    hotel_id: str
    check_in: date
    check_out: date
    car_class: str
    seats: int = 1
    rooms: int = 1
    cars: int = 1

    def __post_init__(self) -> None:
        if self.check_out <= self.check_in:
            raise ValueError("check_out must be after check_in")
        for name in ("seats", "rooms", "cars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass(frozen=True)
class Trip:
    """A trip as its service sees it, with the state of its saga."""

    id: str
    traveller: str
    status: str  # PENDING, CONFIRMED, REJECTED
    reason: str | None
    saga_status: str | None  # RUNNING, COMPENSATING, COMPLETED, COMPENSATED, FAILED
    created_at: datetime
    updated_at: datetime

    @property
    def settled(self) -> bool:
        """Nothing more will happen to it: booked, rejected, or (FAILED) needs a person."""
        return self.status != "PENDING" or self.saga_status == "FAILED"


# -- the saga ------------------------------------------------------------------


def _flight(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "trip_id": data["trip_id"],
        "flight_id": data["flight_id"],
        "seats": data["seats"],
        "hold_s": data["hold_s"],
    }


def _hotel(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "trip_id": data["trip_id"],
        "hotel_id": data["hotel_id"],
        "check_in": data["check_in"],
        "check_out": data["check_out"],
        "rooms": data["rooms"],
        "hold_s": data["hold_s"],
    }


def _car(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "trip_id": data["trip_id"],
        "car_class": data["car_class"],
        "cars": data["cars"],
        "hold_s": data["hold_s"],
    }


def _settle(conn: psycopg.Connection[Any], trip_id: str, status: str, reason: str | None) -> bool:
    """Move a PENDING trip to `status` and announce it; False when it was settled already."""
    row = conn.execute(
        "UPDATE trips SET status = %s, reason = %s, updated_at = now() "
        "WHERE id = %s AND status = 'PENDING' RETURNING traveller",
        (status, reason, trip_id),
    ).fetchone()
    if row is None:
        return False
    event = "TripConfirmed" if status == "CONFIRMED" else "TripRejected"
    body = {"trip_id": trip_id, "traveller": row[0], "status": status, "reason": reason}
    publish(conn, EVENTS, trip_id, event, body, {"saga_id": trip_id})
    conn.execute(
        "SELECT pg_notify(%s, %s)",
        (NOTIFY_CHANNEL, orjson.dumps({"id": trip_id, "status": status}).decode()),
    )
    return True


def _confirm_trip(conn: Any, data: dict[str, Any]) -> None:
    if not _settle(conn, data["trip_id"], "CONFIRMED", None):
        raise BusinessError(f"trip {data['trip_id']} is no longer pending")


def _reject_trip(conn: Any, data: dict[str, Any]) -> None:
    _settle(conn, data["trip_id"], "REJECTED", data.get("failure_reason") or "not booked")


@dataclass(frozen=True)
class Booking:
    """How the trip saga talks to one booking service: topics, key, message types."""

    name: str  # "flight": steps hold-flight and confirm-flight
    commands: str
    events: str
    key: str  # data field giving the commands' Kafka key
    payload: Callable[[dict[str, Any]], Any]
    hold: str
    held: str
    unavailable: tuple[str, ...]
    confirm: str
    confirmed: str
    confirmation_failed: str
    release: str
    released: str

    @classmethod
    def of(
        cls, name: str, inventory: holds.Inventory, payload: Callable[[dict[str, Any]], Any]
    ) -> Booking:
        """The booking of a Python holding service."""
        i = inventory
        return cls(
            name=name,
            commands=i.commands,
            events=i.events,
            key=i.item_field,
            payload=payload,
            hold=i.hold,
            held=i.held,
            unavailable=(i.unavailable,),
            confirm=i.confirm,
            confirmed=i.confirmed,
            confirmation_failed=i.confirmation_failed,
            release=i.release,
            released=i.released,
        )

    def hold_step(self, timeout_s: float, retry: RetryPolicy) -> Step:
        """Hold; compensated by releasing (which also cancels a confirmed booking)."""
        return Step(
            f"hold-{self.name}",
            command=Command(self.commands, self.hold, self.key, self.payload),
            reply_topic=self.events,
            success=(self.held,),
            failure=self.unavailable,
            compensation=Command(self.commands, self.release, self.key, self.payload),
            compensated=(self.released,),
            timeout_s=timeout_s,
            retry=retry,
        )

    def confirm_step(self, timeout_s: float, retry: RetryPolicy) -> Step:
        return Step(
            f"confirm-{self.name}",
            command=Command(self.commands, self.confirm, self.key, self.payload),
            reply_topic=self.events,
            success=(self.confirmed,),
            failure=(self.confirmation_failed,),
            timeout_s=timeout_s,
            retry=retry,
        )


FLIGHT = Booking.of("flight", flight.FLIGHTS, _flight)
# The hotel's names are those of its capture spec and handlers file.
HOTEL = Booking(
    name="hotel",
    commands=hotel.COMMANDS,
    events=hotel.EVENTS,
    key="hotel_id",
    payload=_hotel,
    hold=hotel.HOLD,
    held=hotel.HELD,
    unavailable=hotel.UNAVAILABLE,
    confirm=hotel.CONFIRM,
    confirmed=hotel.CONFIRMED,
    confirmation_failed=hotel.CONFIRMATION_FAILED,
    release=hotel.RELEASE,
    released=hotel.RELEASED,
)
CAR = Booking.of("car", car.CARS, _car)
BOOKINGS = (FLIGHT, HOTEL, CAR)


def trip_saga(
    *,
    timeout_s: float = 10.0,
    retry: RetryPolicy | None = None,
    give_up_after_s: float = GIVE_UP_AFTER_S,
    name: str = "trip",
) -> Saga:
    """The trip saga; `timeout_s`, `retry` and `give_up_after_s` apply to every command.

    Steps: hold seats, rooms and a car, then confirm the three, then confirm
    the trip. Only the holds have compensations (releasing them also cancels
    a confirmed booking), so a failed confirmation gives everything back.
    """
    retry = retry or RetryPolicy()
    return Saga(
        name,
        give_up_after_s=give_up_after_s,
        steps=(
            # The trip row is written by book_trip(), in the transaction that
            # starts the saga; undoing it means rejecting it.
            Step("book-trip", compensate=_reject_trip),
            *(b.hold_step(timeout_s, retry) for b in BOOKINGS),
            *(b.confirm_step(timeout_s, retry) for b in BOOKINGS),
            Step("confirm-trip", action=_confirm_trip),
        ),
    )


TRIP = trip_saga()


def trip_orchestrator(saga: Saga = TRIP) -> Orchestrator:
    """An orchestrator of the trip saga (any number may run, on any machine)."""
    return Orchestrator([saga], name="trip-service")


# -- booking and reading trips -------------------------------------------------


def book_trip(
    conn: psycopg.Connection[Any],
    request: TripRequest,
    *,
    orchestrator: Orchestrator | None = None,
    saga: Saga | None = None,
    trip_id: str | None = None,
    hold_s: float = DEFAULT_HOLD_S,
    trace: TraceContext | None = None,
) -> str:
    """Insert a PENDING trip and start its saga, in one transaction; returns the trip id.

    The transaction is the caller's when one is open on `conn` (then the trip
    exists only once the caller commits), else one of its own. `hold_s` is how
    long each service holds what it sets aside before giving it back. With
    `trace`, every event of the trip's saga carries that trace.
    """
    trip_id = trip_id or str(uuid.uuid4())
    runner = orchestrator or trip_orchestrator(saga or TRIP)
    definition = saga or next(iter(runner.definitions.values()))
    with conn.transaction():
        if trace is not None:
            set_trace(conn, trace)
        conn.execute(
            """
            INSERT INTO trips (id, traveller, flight_id, seats, hotel_id, check_in, check_out,
                               rooms, car_class, cars, status)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'PENDING')
            """,
            (
                trip_id,
                request.traveller,
                request.flight_id,
                request.seats,
                request.hotel_id,
                request.check_in,
                request.check_out,
                request.rooms,
                request.car_class,
                request.cars,
            ),
        )
        data = {
            "trip_id": trip_id,
            "traveller": request.traveller,
            "flight_id": request.flight_id,
            "seats": request.seats,
            "hotel_id": request.hotel_id,
            "check_in": request.check_in.isoformat(),
            "check_out": request.check_out.isoformat(),
            "rooms": request.rooms,
            "car_class": request.car_class,
            "cars": request.cars,
            "hold_s": hold_s,
        }
        runner.start(conn, definition, trip_id, data, trace=trace)
    return trip_id


def trip_status(conn: psycopg.Connection[Any], trip_id: str) -> Trip | None:
    """The trip and the status of its saga; None for an unknown trip."""
    row = conn.execute(
        """
        SELECT t.id, t.traveller, t.status, coalesce(t.reason, s.reason), s.status,
               t.created_at, t.updated_at
        FROM trips t LEFT JOIN walsaga.saga s ON s.id = t.id
        WHERE t.id = %s
        """,
        (trip_id,),
    ).fetchone()
    return Trip(*row) if row else None


# -- the service ---------------------------------------------------------------


def install(conn: psycopg.Connection[Any]) -> None:
    """The trip service's tables with walsaga's core and saga components, in one transaction."""
    with conn.transaction():
        schema.apply(conn, "core")
        schema.apply(conn, "saga")
        conn.execute(SCHEMA)


def participant(
    *,
    dsn: str,
    kafka: dict[str, Any],
    orchestrator: Orchestrator | None = None,
    name: str = "trip-service",
    **settings: Any,
) -> Participant:
    """The trip service's consumer: the saga's replies and deadlines."""
    service = Participant(name, dsn=dsn, kafka=kafka, **settings)
    (orchestrator or trip_orchestrator()).attach(service)
    return service
