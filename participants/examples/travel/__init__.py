"""Travel booking, the classic saga example: a trip needs a flight, a hotel and a car.

Four services, each owning its own database: ``flight`` and ``car`` are
Python participants (:mod:`.flight`, :mod:`.car`, built on :mod:`.holds`);
``hotel`` is a legacy service in plain SQL, plugged in with a capture spec and
declarative handlers only (:mod:`.hotel`); ``trip`` holds trips and runs the
``trip`` saga (:mod:`.trip`). See docs/travel.md.
"""

from participants.examples.travel import car, flight, holds, hotel, trip
from participants.examples.travel.services import SERVICES, ServiceName, install, service
from participants.examples.travel.trip import (
    TRIP,
    Trip,
    TripRequest,
    book_trip,
    trip_orchestrator,
    trip_saga,
    trip_status,
)

__all__ = [
    "SERVICES",
    "TRIP",
    "ServiceName",
    "Trip",
    "TripRequest",
    "book_trip",
    "car",
    "flight",
    "holds",
    "hotel",
    "install",
    "service",
    "trip",
    "trip_orchestrator",
    "trip_saga",
    "trip_status",
]
