"""The travel booking example: a trip saga over flight, hotel and car services,
each with its own database, over real Postgres, relay and broker."""

from __future__ import annotations

import concurrent.futures
import random
import re
import subprocess
import tomllib
import urllib.request
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from participants.examples.embedded import free_port
from participants.examples.travel import car, flight, holds, hotel, trip
from participants.handlers import HandlerContext
from participants.message import Message
from tests.support import WALSAGA
from tests.travel_support import FIRST_NIGHT, running_travel, wait_until
from walsaga.errors import BusinessError

D = FIRST_NIGHT


def request(
    flight_id: str = "TP100",
    hotel_id: str = "H1",
    car_class: str = "LIS-compact",
    *,
    check_in: date = D,
    nights: int = 2,
    seats: int = 1,
    rooms: int = 1,
    cars: int = 1,
) -> trip.TripRequest:
    return trip.TripRequest(
        traveller="Ada",
        flight_id=flight_id,
        hotel_id=hotel_id,
        check_in=check_in,
        check_out=check_in + timedelta(days=nights),
        car_class=car_class,
        seats=seats,
        rooms=rooms,
        cars=cars,
    )


# -- the pieces, without Kafka ---------------------------------------------------


def test_the_hotel_files_use_the_names_the_trip_saga_expects() -> None:
    handlers = tomllib.loads(hotel.HANDLERS.read_text())
    commands = {(h["topic"], h["type"]) for h in handlers["handler"]}
    assert commands == {
        (hotel.COMMANDS, t) for t in (trip.HOTEL.hold, trip.HOTEL.confirm, trip.HOTEL.release)
    }
    failures = {h["failure_type"] for h in handlers["handler"]}
    events = {c["event"] for c in tomllib.loads(hotel.CAPTURE.read_text())["capture"]}
    assert {c["aggregate_type"] for c in tomllib.loads(hotel.CAPTURE.read_text())["capture"]} == {
        trip.HOTEL.events
    }
    replies = {
        trip.HOTEL.held, *trip.HOTEL.unavailable, trip.HOTEL.confirmed,
        trip.HOTEL.confirmation_failed, trip.HOTEL.released,
    }  # fmt: skip
    assert replies <= events | failures
    assert [s.name for s in trip.TRIP.steps] == [
        "book-trip", "hold-flight", "hold-hotel", "hold-car",
        "confirm-flight", "confirm-hotel", "confirm-car", "confirm-trip",
    ]  # fmt: skip


def test_hotel_holds_rooms_night_by_night_and_lets_them_expire(make_database: Any) -> None:
    dsn = make_database("hotel")
    with psycopg.connect(dsn, autocommit=True) as conn:
        hotel.install(conn, {"H1": 1})

        def hold(trip_id: str, check_in: date, nights: int, hold_s: float = 60) -> str:
            conn.execute(
                "CALL hold_rooms(%s, 'H1', %s, %s, 1, %s::numeric)",
                (trip_id, check_in, check_in + timedelta(days=nights), hold_s),
            )
            row = conn.execute(
                "SELECT status FROM room_bookings WHERE trip_id = %s", (trip_id,)
            ).fetchone()
            return str(row[0]) if row else "none"

        assert hold("a", D, 3) == "HELD"  # nights D, D+1, D+2
        assert hold("b", D + timedelta(days=2), 2) == "REFUSED"  # D+2 is taken
        assert hold("c", D + timedelta(days=3), 1) == "HELD"  # a's check-out day is free
        assert hold("a", D + timedelta(days=5), 1) == "HELD", "a repeated hold changes nothing"
        assert hotel.rooms_left(conn, "H1", D + timedelta(days=1)) == 0

        assert hold("short", D + timedelta(days=6), 1, hold_s=0.2) == "HELD"
        conn.execute("SELECT pg_sleep(0.3)")
        with pytest.raises(psycopg.Error, match="hold ran out") as refused:
            conn.execute("CALL confirm_rooms('short')")
        assert refused.value.sqlstate == "WS102"
        conn.execute("CALL expire_room_holds()")
        assert hotel.rooms_left(conn, "H1", D + timedelta(days=6)) == 1

        conn.execute("CALL confirm_rooms('a')")
        conn.execute("CALL cancel_rooms('c', 'H1')")
        conn.execute("CALL cancel_rooms('never-held', 'H1')")
        with pytest.raises(psycopg.Error) as unknown:
            conn.execute("CALL hold_rooms('d', 'nowhere', %s, %s, 1)", (D, D + timedelta(days=1)))
        assert unknown.value.sqlstate == "WS101"

        events = conn.execute(
            "SELECT type, headers->>'saga_id' FROM walsaga.outbox ORDER BY created_at, id"
        ).fetchall()
    assert events == [
        ("RoomsHeld", "a"),
        ("RoomsUnavailable", "b"),
        ("RoomsHeld", "c"),
        ("RoomsHeld", "short"),
        ("RoomHoldExpired", "short"),
        ("RoomsConfirmed", "a"),
        ("RoomsReleased", "c"),
        ("RoomsReleased", "never-held"),
    ]


def _command(type: str, saga_id: str, **payload: Any) -> Message:
    import orjson

    return Message(
        "flight-commands", 0, 0, "TP100", orjson.dumps(payload), {"type": type, "saga_id": saga_id}
    )


def test_seat_holds_never_oversell_and_expire_unless_confirmed(make_database: Any) -> None:
    dsn = make_database("flight")
    desk = holds.HoldDesk(flight.FLIGHTS)
    with psycopg.connect(dsn, autocommit=True) as conn:
        flight.install(conn, {"TP100": 3})

        def handle(
            type: str, trip_id: str, seats: int, hold_s: float = 60, flight_id: str = "TP100"
        ) -> None:
            fields = {"trip_id": trip_id, "flight_id": flight_id, "seats": seats, "hold_s": hold_s}
            message = _command(type, trip_id, **fields)
            handler = {"HoldSeats": desk.hold, "ConfirmSeats": desk.confirm,
                       "ReleaseSeats": desk.release}[type]  # fmt: skip
            with conn.transaction():
                handler(HandlerContext(conn, message, "flight-service"), message)

        handle("HoldSeats", "a", 2)
        with pytest.raises(BusinessError, match="fewer than 2 seats left") as sold_out:
            handle("HoldSeats", "b", 2)
        assert sold_out.value.code == "UNAVAILABLE"
        handle("HoldSeats", "c", 1, hold_s=0.2)
        assert flight.seats_left(conn, "TP100") == 0
        conn.execute("SELECT pg_sleep(0.3)")
        assert flight.seats_left(conn, "TP100") == 1, "an expired hold no longer counts"
        with pytest.raises(BusinessError, match="EXPIRED"):
            handle("ConfirmSeats", "c", 1)
        with conn.transaction():
            assert desk.expire(conn) == 1
        handle("ConfirmSeats", "a", 2)
        handle("ReleaseSeats", "never-held", 1)
        with pytest.raises(BusinessError) as unknown:
            handle("HoldSeats", "d", 1, flight_id="XX1")
        assert unknown.value.code == "UNKNOWN_ITEM"
        events = conn.execute(
            "SELECT type, headers->>'saga_id', payload->>'trip_id' FROM walsaga.outbox "
            "ORDER BY created_at, id"
        ).fetchall()
    assert events == [
        ("SeatsHeld", "a", "a"),
        ("SeatsHeld", "c", "c"),
        ("SeatHoldExpired", "c", "c"),
        ("SeatsConfirmed", "a", "a"),
        ("SeatsReleased", "never-held", "never-held"),
    ]


# -- the whole example -----------------------------------------------------------

INVENTORY: dict[str, Any] = {
    "flights": {"TP100": 10},
    "hotels": {"H1": 5, "H-small": 1},
    "car_classes": {"LIS-compact": 4, "LIS-van": 0},
}


def test_a_trip_holds_flight_hotel_and_car_then_confirms_them(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    with running_travel(tmp_path, make_database, broker, **INVENTORY) as site:
        before = site.availability()
        trip_id = site.book(request(seats=2, nights=3, rooms=2))
        settled = site.wait_settled([trip_id])[trip_id]
        assert (settled.status, settled.saga_status, settled.reason) == (
            "CONFIRMED", "COMPLETED", None)  # fmt: skip
        assert site.bookings("flight")[trip_id] == ("TP100", 2, "CONFIRMED")
        assert site.bookings("hotel")[trip_id] == ("H1", 2, "CONFIRMED")
        assert site.bookings("car")[trip_id] == ("LIS-compact", 1, "CONFIRMED")
        after = site.availability()
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        assert changed == {
            "flight TP100": (10, 8),
            "car LIS-compact": (4, 3),
            f"hotel H1 {D}": (5, 3),
            f"hotel H1 {D + timedelta(days=1)}": (5, 3),
            f"hotel H1 {D + timedelta(days=2)}": (5, 3),
        }
        assert site.commands(trip_id) == [
            "HoldSeats", "HoldRooms", "HoldCar", "ConfirmSeats", "ConfirmRooms", "ConfirmCar",
        ]  # fmt: skip
        site.assert_consistent([trip_id])


def test_when_a_booking_fails_the_holds_taken_are_released(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    with running_travel(tmp_path, make_database, broker, **INVENTORY) as site:
        first = site.book(request(hotel_id="H-small"))
        assert site.wait_settled([first])[first].status == "CONFIRMED"
        before = site.availability()

        hotel_full = site.book(request(hotel_id="H-small", check_in=D + timedelta(days=1)))
        no_car = site.book(request(car_class="LIS-van"))
        no_flight = site.book(request(flight_id="XX999"))
        trips = site.wait_settled([hotel_full, no_car, no_flight])

        for t in trips.values():
            assert (t.status, t.saga_status) == ("REJECTED", "COMPENSATED"), t
        assert "no 1 room(s) free" in (trips[hotel_full].reason or "")
        assert "fewer than 1 cars left" in (trips[no_car].reason or "")
        assert "no flight_id 'XX999'" in (trips[no_flight].reason or "")
        # Compensation runs backwards over what was held.
        assert site.commands(hotel_full) == ["HoldSeats", "HoldRooms", "ReleaseSeats"]
        assert site.commands(no_car) == [
            "HoldSeats", "HoldRooms", "HoldCar", "ReleaseRooms", "ReleaseSeats",
        ]  # fmt: skip
        assert site.commands(no_flight) == ["HoldSeats"]
        assert site.bookings("flight")[hotel_full][2] == "RELEASED"
        assert site.bookings("hotel")[hotel_full][2] == "REFUSED"
        assert site.bookings("hotel")[no_car][2] == "CANCELLED"
        assert site.availability() == before
        site.assert_consistent([first, hotel_full, no_car, no_flight])


@pytest.mark.slow
def test_holds_expire_unless_confirmed_and_a_late_confirmation_rejects_the_trip(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    # The car service is down: the trip holds a seat and a room for 2 s, then
    # waits for the car while the holds run out.
    with running_travel(
        tmp_path, make_database, broker, services=("flight", "hotel", "trip"), **INVENTORY
    ) as site:
        before = site.availability()
        trip_id = site.book(request(), hold_s=2.0)

        def expired() -> bool:
            return (
                site.bookings("flight").get(trip_id, ("", 0, ""))[2] == "EXPIRED"
                and site.bookings("hotel").get(trip_id, ("", 0, ""))[2] == "EXPIRED"
            )

        wait_until(expired, timeout_s=30, what="the seat and room holds expired")
        assert site.availability() == before, "expired holds give their inventory back"
        assert site.trips([trip_id])[trip_id].status == "PENDING"

        def heard(kind: str) -> bool:
            # The expiry events reach the trip saga (which keeps waiting for the car).
            return any(d.get("type") == kind for _, _, d in site.log(trip_id))

        wait_until(lambda: heard("SeatHoldExpired") and heard("RoomHoldExpired"), timeout_s=30,
                   what="expiry events in the saga log")  # fmt: skip

        site.start("car")
        settled = site.wait_settled([trip_id])[trip_id]
        assert (settled.status, settled.saga_status) == ("REJECTED", "COMPENSATED")
        assert "EXPIRED" in (settled.reason or "")
        assert site.commands(trip_id) == [
            "HoldSeats", "HoldRooms", "HoldCar", "ConfirmSeats",
            "ReleaseCar", "ReleaseRooms", "ReleaseSeats",
        ]  # fmt: skip
        assert site.bookings("car")[trip_id][2] == "RELEASED"
        assert site.availability() == before
        site.assert_consistent([trip_id])


@pytest.mark.slow
@pytest.mark.parametrize("hold_s", [60.0, 0.5], ids=["holds-last", "holds-run-out"])
def test_many_trips_at_once_on_scarce_inventory_never_overbook(
    tmp_path: Path, make_database: Any, broker: str, hold_s: float
) -> None:
    # Every kind of inventory runs out: some trips fail at the flight, more at
    # the hotel (after holding seats), some at the car (after seats and rooms).
    inventory = {
        "flights": {"TP100": 24, "TP200": 18},
        "hotels": {"H1": 4, "H2": 3},
        "car_classes": {"LIS-compact": 7, "LIS-van": 5},
    }
    rng = random.Random(7)
    requests = [
        request(
            rng.choice(["TP100", "TP200"]),
            rng.choice(["H1", "H2"]),
            rng.choice(["LIS-compact", "LIS-van"]),
            check_in=D + timedelta(days=rng.randrange(4)),
            nights=rng.randint(1, 3),
            seats=rng.choice([1, 1, 2]),
        )
        for _ in range(100)
    ]
    with running_travel(tmp_path, make_database, broker, **inventory) as site:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda r: site.book(r, hold_s=hold_s), requests))
        trips = site.wait_settled(ids, timeout_s=180)
        statuses = [t.status for t in trips.values()]
        assert set(statuses) <= {"CONFIRMED", "REJECTED"}
        site.assert_consistent(ids)
        seat_holds = [status for _, _, status in site.bookings("flight").values()]
        if hold_s > 10:
            assert 0 < statuses.count("CONFIRMED") < len(ids), "some fit, some do not"
            assert "RELEASED" in seat_holds, "some trips gave back the seats they held"
        else:
            ran_out = [t for t in trips.values() if "EXPIRED" in (t.reason or "")
                       or "hold ran out" in (t.reason or "")]  # fmt: skip
            assert ran_out, "some holds ran out before their confirmation"
        # What is left adds up with the trips confirmed.
        left = site.availability()
        confirmed = [
            r for r, i in zip(requests, ids, strict=True) if trips[i].status == "CONFIRMED"
        ]
        for flight_id, seats in inventory["flights"].items():
            taken = sum(r.seats for r in confirmed if r.flight_id == flight_id)
            assert left[f"flight {flight_id}"] == seats - taken
        for car_class, cars in inventory["car_classes"].items():
            taken = sum(r.cars for r in confirmed if r.car_class == car_class)
            assert left[f"car {car_class}"] == cars - taken


def test_the_booking_example_in_the_docs_runs(
    tmp_path: Path, make_database: Any, broker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "travel.md").read_text()
    inventory = re.findall(r'^psql (\w+)\s+-c "(INSERT .*)"$', docs, re.MULTILINE)
    snippet = re.search(r"```python\n(.*?)```", docs, re.DOTALL)
    assert len(inventory) == 3 and snippet
    empty: dict[str, int] = {}
    with running_travel(
        tmp_path, make_database, broker, flights=empty, hotels=empty, car_classes=empty
    ) as site:
        for database, statement in inventory:
            with site.connect(database) as conn:
                conn.execute(statement)
        exec(snippet.group(1), {"TRIP_DSN": site.dsns["trip"]})
    assert "CONFIRMED COMPLETED None" in capsys.readouterr().out.splitlines()


def test_the_cli_runs_a_travel_service(tmp_path: Path, make_database: Any, broker: str) -> None:
    dsn = make_database("car")
    port = free_port()
    log = tmp_path / "car-service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [WALSAGA, "travel-service", "--service", "car", "--dsn", dsn,
             "--bootstrap-servers", broker, "--install", "--http-port", str(port),
             # A group of its own: the test's services are not disturbed.
             "--name", f"car-service-{uuid.uuid4().hex[:6]}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def consuming() -> bool:
        if proc.poll() is not None:
            return True
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        # Stopped only once it has its partitions: a consumer that leaves a
        # group in the middle of joining can hold the group up on some brokers.
        wait_until(consuming, timeout_s=60, what="the car service consuming")
        assert proc.poll() is None, log.read_text()
        with psycopg.connect(dsn) as conn:
            assert car.cars_left(conn, "none") is None, "its tables are installed"
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, log.read_text()
