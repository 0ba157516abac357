"""The travel booking example running for a test: four databases, a relay with
one source per database, and the flight, hotel, car and trip services in threads."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psycopg

from participants.examples import travel
from participants.examples.travel import car, flight, hotel, trip
from participants.orchestrator import Orchestrator, saga_log
from participants.runtime import Participant
from participants.saga import Saga
from tests.support import (
    RelayProcess,
    create_topics,
    join_own_group,
    wait_all_assigned,
    wait_until,
)

TOPICS = [
    *(topic for b in trip.BOOKINGS for topic in (b.commands, b.events)),
    trip.EVENTS,
]


#: Hotel stays in the tests fall within these nights.
FIRST_NIGHT = date(2030, 6, 1)
LAST_NIGHT = date(2030, 6, 9)


def nights(check_in: date, check_out: date) -> list[date]:
    return [check_in + timedelta(days=i) for i in range((check_out - check_in).days)]


@dataclass
class Travel:
    dsns: dict[str, str]  # service -> its database
    broker: str
    relay: RelayProcess
    orchestrator: Orchestrator
    participants: dict[str, Participant] = field(default_factory=dict)
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)

    # -- services ----------------------------------------------------------

    def build(self, name: travel.ServiceName) -> Participant:
        """Service `name`'s participant, in its consumer group of this test."""
        settings: dict[str, Any] = {"orchestrator": self.orchestrator} if name == "trip" else {}
        participant = travel.service(
            name, dsn=self.dsns[name], bootstrap_servers=self.broker, **settings
        )
        join_own_group(participant, self.groups, self.broker)
        return participant

    def start(self, name: travel.ServiceName) -> Participant:
        """(Re)start one service in a thread of its own."""
        participant = self.build(name)
        thread = threading.Thread(target=participant.run, name=f"{name}-service", daemon=True)
        thread.start()
        self.participants[name] = participant
        self.threads[name] = thread
        return participant

    def stop(self, name: str) -> None:
        self.participants[name].stop()
        self.threads[name].join(30)

    def wait_ready(self) -> None:
        wait_all_assigned(self.participants, self.threads)

    def connect(self, name: str) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsns[name], autocommit=True)

    # -- trips -------------------------------------------------------------

    def book(self, request: trip.TripRequest, *, hold_s: float = 60.0) -> str:
        with psycopg.connect(self.dsns["trip"]) as conn:
            return trip.book_trip(conn, request, orchestrator=self.orchestrator, hold_s=hold_s)

    def trips(self, ids: list[str]) -> dict[str, trip.Trip]:
        with self.connect("trip") as conn:
            found = {i: trip.trip_status(conn, i) for i in ids}
        return {i: t for i, t in found.items() if t is not None}

    def wait_settled(self, ids: list[str], timeout_s: float = 60) -> dict[str, trip.Trip]:
        def settled() -> dict[str, trip.Trip] | None:
            found = self.trips(ids)
            done = len(found) == len(ids) and all(t.settled for t in found.values())
            return found if done else None

        return wait_until(settled, timeout_s=timeout_s, interval_s=0.1,  # type: ignore[no-any-return]
                          what="every trip confirmed or rejected")  # fmt: skip

    def log(self, trip_id: str) -> list[tuple[str, str | None, dict[str, Any]]]:
        with self.connect("trip") as conn:
            return saga_log(conn, trip_id)

    def commands(self, trip_id: str) -> list[str]:
        """The types of the commands the trip's saga sent, in order."""
        return [d["type"] for kind, _, d in self.log(trip_id) if kind == "COMMAND"]

    # -- the services' view ------------------------------------------------

    def bookings(self, service: str) -> dict[str, tuple[str, int, str]]:
        """trip id -> (item, quantity, status) in one booking service's database."""
        with self.connect(service) as conn:
            if service == "hotel":
                rows = conn.execute(
                    "SELECT trip_id, hotel_id, rooms, status FROM room_bookings"
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT id, resource, quantity, status FROM walsaga.reservation"
                ).fetchall()
        return {r[0]: (r[1], int(r[2]), r[3]) for r in rows}

    def availability(self) -> dict[str, int]:
        """Units left of everything the services sell: seats, cars, rooms per night."""
        left: dict[str, int] = {}
        with self.connect("flight") as conn:
            for (flight_id,) in conn.execute("SELECT id FROM flights ORDER BY id").fetchall():
                left[f"flight {flight_id}"] = flight.seats_left(conn, flight_id) or 0
        with self.connect("car") as conn:
            for (car_class,) in conn.execute("SELECT id FROM car_classes ORDER BY id").fetchall():
                left[f"car {car_class}"] = car.cars_left(conn, car_class) or 0
        with self.connect("hotel") as conn:
            for (hotel_id,) in conn.execute("SELECT id FROM hotels ORDER BY id").fetchall():
                for night in nights(FIRST_NIGHT, LAST_NIGHT + timedelta(days=1)):
                    left[f"hotel {hotel_id} {night}"] = hotel.rooms_left(conn, hotel_id, night) or 0
        return left

    def assert_consistent(self, trip_ids: list[str]) -> None:
        """The four databases agree: a confirmed trip has its three bookings
        confirmed, a rejected one holds nothing anywhere; nothing is oversold."""
        trips = self.trips(trip_ids)
        with self.connect("trip") as conn:
            asked = {
                r[0]: r[1:]
                for r in conn.execute(
                    "SELECT id, flight_id, seats, hotel_id, rooms, car_class, cars FROM trips"
                ).fetchall()
            }
        books = {s: self.bookings(s) for s in ("flight", "hotel", "car")}
        for trip_id, t in trips.items():
            flight_id, seats, hotel_id, rooms, car_class, cars = asked[trip_id]
            wanted = {
                "flight": (flight_id, seats),
                "hotel": (hotel_id, rooms),
                "car": (car_class, cars),
            }
            for service, (item, quantity) in wanted.items():
                booking = books[service].get(trip_id)
                if t.status == "CONFIRMED":
                    assert t.saga_status == "COMPLETED", t
                    assert booking == (item, quantity, "CONFIRMED"), (trip_id, service, booking)
                else:
                    assert t.status == "REJECTED" and t.saga_status == "COMPENSATED", t
                    assert booking is None or booking[2] not in ("RESERVED", "HELD", "CONFIRMED"), (
                        trip_id, service, booking)  # fmt: skip
        for service, rows in books.items():
            stray = set(rows) - set(trips)
            assert not stray, f"{service} has bookings of trips it was never asked for: {stray}"
        oversold = {k: v for k, v in self.availability().items() if v < 0}
        assert not oversold, f"oversold: {oversold}"

    def close(self) -> None:
        for participant in self.participants.values():
            participant.stop()
        for thread in self.threads.values():
            thread.join(30)
        self.relay.kill()


@contextmanager
def running_travel(
    tmp_path: Path,
    make_database: Any,
    broker: str,
    *,
    flights: Mapping[str, int],
    hotels: Mapping[str, int],
    car_classes: Mapping[str, int],
    saga: Saga | None = None,
    services: tuple[travel.ServiceName, ...] = travel.SERVICES,
) -> Iterator[Travel]:
    """The example with this inventory; `services` are started (the others can be later)."""
    dsns = {name: make_database(name) for name in travel.SERVICES}
    with psycopg.connect(dsns["trip"]) as conn:
        trip.install(conn)
    with psycopg.connect(dsns["flight"]) as conn:
        flight.install(conn, flights)
    with psycopg.connect(dsns["hotel"]) as conn:
        hotel.install(conn, hotels)
    with psycopg.connect(dsns["car"]) as conn:
        car.install(conn, car_classes)
    create_topics(broker, TOPICS, partitions=4)
    relay = RelayProcess.start(
        tmp_path, bootstrap=broker, sources=dsns, name=f"relay-{uuid.uuid4().hex[:6]}"
    )
    site = Travel(dsns, broker, relay, trip.trip_orchestrator(saga or trip.TRIP))
    try:
        for name in travel.SERVICES:
            relay.wait_streaming(name)
            # Every service's group starts here, before the first trip: one
            # started later reads the commands sent to it meanwhile.
            site.build(name)
        for name in services:
            site.start(name)
        site.wait_ready()
        time.sleep(0.2)
        yield site
    finally:
        site.close()
