"""The order service: orders that need the customer's credit, in two variants.

- choreography: creating an order publishes ``OrderCreated``; the customer
  service holds credit (``CreditReserved``) or refuses; on a hold this
  service publishes ``OrderAccepted``, the customer service makes the hold
  permanent (``CreditConfirmed``, or ``CreditConfirmationFailed`` when it
  expired first), and the order is approved, or rejected on any refusal;
- orchestration: creating an order starts the ``create-order`` saga, which
  sends ``ReserveCredit`` and ``ConfirmCredit`` to the customer service and
  approves the order, or rejects it and releases the credit on failure.

An order is ``PENDING`` until its saga ends: that state is the semantic lock
other readers respect (a pending order's credit is not yet settled).
Every change of an order's status is announced with ``NOTIFY walsaga_order``;
an order created with a webhook URL gets its call queued in
``webhook_deliveries`` by the same transaction that settles it (the order
service process, :mod:`participants.examples.order_service`, sends it).
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any, Literal

import orjson
import psycopg
from psycopg.types.json import Jsonb

from participants.handlers import HandlerContext, publish
from participants.message import Message
from participants.orchestrator import Orchestrator
from participants.runtime import Participant, set_trace
from participants.saga import GIVE_UP_AFTER_S, Command, RetryPolicy, Saga, Step
from walsaga.errors import BusinessError
from walsaga.tracing import TraceContext

Mode = Literal["choreography", "orchestration"]
NOTIFY_CHANNEL = "walsaga_order"

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id          text          PRIMARY KEY,
    customer_id text          NOT NULL,
    total       numeric(12,2) NOT NULL CHECK (total > 0),
    status      text          NOT NULL CHECK (status IN ('PENDING', 'APPROVED', 'REJECTED')),
    reason      text,
    webhook_url text,
    created_at  timestamptz   NOT NULL DEFAULT now(),
    updated_at  timestamptz   NOT NULL DEFAULT now()
);

-- Webhook calls of settled orders, queued by the transaction that settles the
-- order so that none is lost, and sent (at least once) by the order service.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id        text        NOT NULL REFERENCES orders (id),
    url             text        NOT NULL,
    payload         jsonb       NOT NULL,
    status          text        NOT NULL DEFAULT 'PENDING'
                                CHECK (status IN ('PENDING', 'DELIVERED', 'FAILED')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'PENDING';
-- The orders whose saga is under way: the order service counts them to shed load.
CREATE INDEX IF NOT EXISTS orders_pending ON orders (created_at) WHERE status = 'PENDING';
"""

ORDER_TOPIC = "order"
CUSTOMER_TOPIC = "customer"
CUSTOMER_COMMANDS = "customer-commands"

REFUSALS = (
    "CreditLimitExceeded",
    "CreditReservationFailed",
    "CreditReservationExpired",
    "CreditConfirmationFailed",
)


def order_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "customer_id": row["customer_id"],
        "total": float(row["total"]),
        "status": row["status"],
        "reason": row["reason"],
    }


def _notify(
    conn: psycopg.Connection[Any], order_id: str, status: str, *, webhook: bool = False
) -> None:
    notice: dict[str, Any] = {"id": order_id, "status": status}
    if webhook:  # the webhook sender wakes only for these
        notice["webhook"] = True
    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, orjson.dumps(notice).decode()))


def create_order(
    conn: psycopg.Connection[Any],
    customer_id: str,
    total: Decimal | float,
    *,
    mode: Mode,
    orchestrator: Orchestrator | None = None,
    webhook_url: str | None = None,
    order_id: str | None = None,
    trace: TraceContext | None = None,
) -> str:
    """Insert a PENDING order and start its saga, in the caller's transaction.

    With `trace` (the request's trace context, a span of the order service's
    own), every event of the saga carries that trace.
    """
    order_id = order_id or str(uuid.uuid4())
    if trace is not None:
        set_trace(conn, trace)
    conn.execute(
        "INSERT INTO orders (id, customer_id, total, status, webhook_url) "
        "VALUES (%s, %s, %s, 'PENDING', %s)",
        (order_id, customer_id, total, webhook_url),
    )
    data = {"order_id": order_id, "customer_id": customer_id, "total": float(total)}
    if mode == "choreography":
        publish(conn, ORDER_TOPIC, order_id, "OrderCreated", data, {"saga_id": order_id})
    else:
        assert orchestrator is not None, "the orchestration variant needs its orchestrator"
        orchestrator.start(conn, "create-order", order_id, data, trace=trace)
    return order_id


def _settle(
    conn: psycopg.Connection[Any], order_id: str, status: str, reason: str | None = None
) -> bool:
    """Move a PENDING order to `status`; False when it was settled already."""
    row = conn.execute(
        "UPDATE orders SET status = %s, reason = %s, updated_at = now() "
        "WHERE id = %s AND status = 'PENDING' "
        "RETURNING id, customer_id, total, status, reason, webhook_url",
        (status, reason, order_id),
    ).fetchone()
    if row is None:
        return False
    columns = ("id", "customer_id", "total", "status", "reason", "webhook_url")
    settled = dict(zip(columns, row, strict=True))
    webhook = settled["webhook_url"] is not None
    if webhook:
        conn.execute(
            "INSERT INTO webhook_deliveries (order_id, url, payload) VALUES (%s, %s, %s)",
            (order_id, settled["webhook_url"], Jsonb(order_json(settled))),
        )
    _notify(conn, order_id, status, webhook=webhook)
    return True


def approve(conn: psycopg.Connection[Any], order_id: str) -> bool:
    return _settle(conn, order_id, "APPROVED")


def reject(conn: psycopg.Connection[Any], order_id: str, reason: str) -> bool:
    return _settle(conn, order_id, "REJECTED", reason)


# -- orchestration -------------------------------------------------------------


def _credit_request(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "order_id": data["order_id"],
        "customer_id": data["customer_id"],
        "total": data["total"],
    }


def _reject_order(conn: Any, data: dict[str, Any]) -> None:
    reject(conn, data["order_id"], data.get("failure_reason") or "credit not granted")


def _approve_order(conn: Any, data: dict[str, Any]) -> None:
    if not approve(conn, data["order_id"]):
        raise BusinessError(f"order {data['order_id']} is no longer pending")


def create_order_saga(
    *,
    timeout_s: float = 10.0,
    retry: RetryPolicy | None = None,
    give_up_after_s: float = GIVE_UP_AFTER_S,
) -> Saga:
    """The create-order saga.

    A command unanswered for `timeout_s` is resent, with waits growing per
    `retry`; the saga gives up on it (and rejects the order) only after
    `give_up_after_s` (ten minutes by default), never while the customer
    service is known to be down.
    """
    retry = retry or RetryPolicy()
    return Saga(
        "create-order",
        give_up_after_s=give_up_after_s,
        steps=(
            # The order row itself is written by create_order(), in the
            # transaction that starts the saga; undoing it means rejecting it.
            Step("create-order", compensate=_reject_order),
            Step(
                "reserve-credit",
                command=Command(CUSTOMER_COMMANDS, "ReserveCredit", "customer_id", _credit_request),
                reply_topic=CUSTOMER_TOPIC,
                success=("CreditReserved",),
                failure=("CreditLimitExceeded", "CreditReservationFailed"),
                compensation=Command(
                    CUSTOMER_COMMANDS, "ReleaseCredit", "customer_id", _credit_request
                ),
                compensated=("CreditReleased",),
                compensation_failed=("CreditReleaseFailed",),
                timeout_s=timeout_s,
                retry=retry,
            ),
            Step(
                "confirm-credit",
                command=Command(CUSTOMER_COMMANDS, "ConfirmCredit", "customer_id", _credit_request),
                reply_topic=CUSTOMER_TOPIC,
                success=("CreditConfirmed",),
                failure=("CreditConfirmationFailed",),
                timeout_s=timeout_s,
                retry=retry,
            ),
            Step("approve-order", action=_approve_order),
        ),
    )


CREATE_ORDER = create_order_saga()


def orchestrator(definition: Saga = CREATE_ORDER) -> Orchestrator:
    return Orchestrator([definition], name="order-service")


def install(conn: psycopg.Connection[Any]) -> None:
    """The order service's tables, with walsaga's core and saga components."""
    from walsaga import schema

    schema.apply(conn, "core")
    schema.apply(conn, "saga")
    conn.execute(SCHEMA)


# -- the participant -----------------------------------------------------------


def participant(
    *,
    dsn: str,
    kafka: dict[str, Any],
    mode: Mode,
    orchestrator: Orchestrator | None = None,
    name: str = "order-service",
    **settings: Any,
) -> Participant:
    """The order service's consumer for the chosen variant."""
    service = Participant(name, dsn=dsn, kafka=kafka, **settings)
    if mode == "orchestration":
        assert orchestrator is not None
        orchestrator.attach(service)
        return service

    # A reservation is only a hold: ask for it to be made permanent, and
    # approve the order once it is (a hold that expired meanwhile refuses).
    @service.on(CUSTOMER_TOPIC, "CreditReserved")
    def credit_reserved(ctx: HandlerContext, message: Message) -> None:
        order_id = message.field("order_id")
        row = ctx.execute(
            "SELECT customer_id, total FROM orders WHERE id = %s AND status = 'PENDING'",
            (order_id,),
        ).fetchone()
        if row is not None:
            ctx.publish(
                ORDER_TOPIC,
                order_id,
                "OrderAccepted",
                {"order_id": order_id, "customer_id": row[0], "total": float(row[1])},
            )

    @service.on(CUSTOMER_TOPIC, "CreditConfirmed")
    def credit_confirmed(ctx: HandlerContext, message: Message) -> None:
        order_id = message.field("order_id")
        if approve(ctx.conn, order_id):
            ctx.publish(ORDER_TOPIC, order_id, "OrderApproved", {"order_id": order_id})

    for refusal in REFUSALS:

        @service.on(CUSTOMER_TOPIC, refusal)
        def credit_refused(ctx: HandlerContext, message: Message) -> None:
            order_id = message.field("order_id")
            reason = str(message.payload.get("reason") or message.type)
            if reject(ctx.conn, order_id, reason):
                ctx.publish(
                    ORDER_TOPIC, order_id, "OrderRejected", {"order_id": order_id, "reason": reason}
                )

    return service
