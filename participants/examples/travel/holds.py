"""Holds: units of a service's inventory set aside for a trip for a short time,
then confirmed, released, or expired.

The flight and car services are Python participants built from this module.
Their inventory is a table with a capacity per item (seats of a flight, cars
of a class); holds are walsaga's reservations (``walsaga.reserve``,
``confirm_reservation``, ``release_reservation``, ``expire_reservations``),
one per trip, so two trips cannot take the same last seat: reserving is
serialised per item. A hold not confirmed within its ``hold_s`` is expired by a
periodic task, which publishes what expired through the outbox in the same
transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from participants.handlers import HandlerContext, Route, publish
from participants.message import Message
from participants.runtime import Participant
from walsaga.errors import BusinessError


@dataclass(frozen=True)
class Inventory:
    """What a holding service sells, where, and how it names its messages."""

    service: str  # participant name
    commands: str  # topic the saga's commands arrive on
    events: str  # aggregate type (topic) of everything the service publishes
    table: str  # inventory: ``id text primary key`` and a capacity column
    capacity_column: str
    item_field: str  # payload field naming the item: "flight_id"
    quantity_field: str  # payload field saying how many: "seats"
    # command types
    hold: str
    confirm: str
    release: str
    # event types
    held: str
    unavailable: str
    confirmed: str
    confirmation_failed: str
    released: str
    expired: str


@dataclass(frozen=True)
class Request:
    """A command's business fields."""

    trip_id: str
    item: str
    quantity: int


class HoldDesk:
    """The handlers of one holding service; each runs in the participant's transaction."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self._capacity = sql.SQL("SELECT {} FROM {} WHERE id = %s").format(
            sql.Identifier(inventory.capacity_column), sql.Identifier(inventory.table)
        )

    def routes(self) -> list[Route]:
        inv = self.inventory
        return [
            Route(inv.commands, inv.hold, self.hold, inv.unavailable, inv.events),
            Route(inv.commands, inv.confirm, self.confirm, inv.confirmation_failed, inv.events),
            # Releasing never refuses, so a compensation always gets its reply.
            Route(inv.commands, inv.release, self.release, failure_event=False),
        ]

    def request(self, message: Message) -> Request:
        inv = self.inventory
        quantity = message.field(inv.quantity_field)
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
            raise BusinessError(
                f"{inv.quantity_field} must be a positive whole number, not {quantity!r}",
                code="BAD_REQUEST",
            )
        return Request(str(message.field("trip_id")), str(message.field(inv.item_field)), quantity)

    def body(self, request: Request, **extra: Any) -> dict[str, Any]:
        inv = self.inventory
        return {
            "trip_id": request.trip_id,
            inv.item_field: request.item,
            inv.quantity_field: request.quantity,
            **extra,
        }

    def hold(self, ctx: HandlerContext, message: Message) -> None:
        inv = self.inventory
        request = self.request(message)
        hold_s = float(message.field("hold_s"))
        row = ctx.execute(self._capacity, (request.item,)).fetchone()
        if row is None:
            raise BusinessError(f"no {inv.item_field} {request.item!r}", code="UNKNOWN_ITEM")
        # The trip id names the hold: a second hold for the same trip finds the
        # first one instead of taking more.
        row = ctx.execute(
            "SELECT walsaga.reserve(%s, %s, %s, %s, %s, make_interval(secs => %s))",
            (request.trip_id, request.item, request.quantity, row[0], message.saga_id, hold_s),
        ).fetchone()
        status = row[0] if row else None
        if status is None:
            raise BusinessError(
                f"{inv.item_field} {request.item}: fewer than {request.quantity} "
                f"{inv.quantity_field} left",
                code="UNAVAILABLE",
            )
        if status not in ("RESERVED", "CONFIRMED"):
            raise BusinessError(
                f"the hold of trip {request.trip_id} is already {status}", code=f"HOLD_{status}"
            )
        expires = ctx.execute(
            "SELECT expires_at FROM walsaga.reservation WHERE id = %s", (request.trip_id,)
        ).fetchone()
        expires_at = expires[0] if expires else None
        ctx.publish(
            inv.events,
            request.item,
            inv.held,
            self.body(request, expires_at=expires_at.isoformat() if expires_at else None),
        )

    def confirm(self, ctx: HandlerContext, message: Message) -> None:
        inv = self.inventory
        request = self.request(message)
        row = ctx.execute("SELECT walsaga.confirm_reservation(%s)", (request.trip_id,)).fetchone()
        status = row[0] if row else None
        if status != "CONFIRMED":
            # Too late: the hold expired (or was released). The saga gives the
            # other holds back.
            raise BusinessError(
                f"trip {request.trip_id} holds no {inv.quantity_field} on {request.item} "
                f"({status or 'never held'})",
                code=f"HOLD_{status or 'MISSING'}",
            )
        ctx.publish(inv.events, request.item, inv.confirmed, self.body(request))

    def release(self, ctx: HandlerContext, message: Message) -> None:
        """Compensation: give the hold (or the confirmed booking) back. Idempotent,
        and answers even when nothing was ever held (the saga may compensate a
        hold whose outcome it never learnt), so it checks nothing it could refuse."""
        inv = self.inventory
        trip_id = str(message.field("trip_id"))
        row = ctx.execute("SELECT walsaga.release_reservation(%s)", (trip_id,)).fetchone()
        body = {
            "trip_id": trip_id,
            inv.item_field: message.field(inv.item_field),
            inv.quantity_field: message.payload.get(inv.quantity_field),
            "was_held": bool(row and row[0]),
        }
        ctx.publish(inv.events, message.key or "", inv.released, body)

    def expire(self, conn: psycopg.Connection[Any]) -> int:
        """Expire the holds past their time and announce each; returns how many."""
        inv = self.inventory
        rows = conn.execute(
            "SELECT id, resource, quantity, saga_id FROM walsaga.expire_reservations()"
        ).fetchall()
        for trip_id, item, quantity, saga_id in rows:
            request = Request(trip_id, item, int(quantity))
            publish(
                conn,
                inv.events,
                item,
                inv.expired,
                self.body(request),
                {"saga_id": saga_id} if saga_id else {},
            )
        return len(rows)


def participant(
    inventory: Inventory,
    *,
    dsn: str,
    kafka: dict[str, Any],
    name: str | None = None,
    expire_every_s: float = 0.5,
    **settings: Any,
) -> Participant:
    """A participant that holds, confirms and releases `inventory` for sagas."""
    desk = HoldDesk(inventory)
    service = Participant(name or inventory.service, dsn=dsn, kafka=kafka, **settings)
    for route in desk.routes():
        service.add_route(route)
    service.every(expire_every_s, desk.expire, name=f"expire {inventory.events} holds")
    return service


def available(conn: psycopg.Connection[Any], inventory: Inventory, item: str) -> int | None:
    """How many units of `item` are neither held nor confirmed; None for an unknown item."""
    row = conn.execute(
        sql.SQL(
            """
            SELECT i.{capacity} - coalesce((
                SELECT sum(r.quantity) FROM walsaga.reservation r
                WHERE r.resource = i.id
                  AND (r.status = 'CONFIRMED' OR (r.status = 'RESERVED'
                       AND (r.expires_at IS NULL OR r.expires_at > now())))
            ), 0)
            FROM {table} i WHERE i.id = %s
            """
        ).format(
            capacity=sql.Identifier(inventory.capacity_column),
            table=sql.Identifier(inventory.table),
        ),
        (item,),
    ).fetchone()
    return int(row[0]) if row else None
