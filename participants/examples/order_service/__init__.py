"""The order service as a process: its public HTTP API and the consumer that settles orders.

One process serves the API (Starlette on uvicorn) and runs the order service's
participant in a thread (with the ``create-order`` orchestrator attached in the
orchestration variant). A client learns how its order ended in one of three
ways: it waits (``POST /orders?wait=SECONDS``), polls (``GET /orders/{id}``), or
is told — server-sent events (``GET /orders/{id}/events``) or a webhook URL
given at creation.

Unknown customers: the order service does not own customers, the customer
service does, and it refuses a reservation for a customer it does not know.
So an order for an unknown customer is accepted and ends ``REJECTED`` with
the reason (``unknown customer ...``). When the service is given a customer
directory (``customers_dsn``, read-only), ``POST /orders`` also answers 422 at
once for a customer missing there; the saga stays the authority (a customer
can appear or vanish between the check and the reservation), so a directory
that cannot be reached lets the order through rather than failing it.

The parts: :mod:`.api` (requests and answers, pure), :mod:`.app` (the
routes), :mod:`.service` (the process's settings and lifecycle),
:mod:`.notices` (waiting on an order), :mod:`.webhooks`, :mod:`.directory`
(the customer look-up), :mod:`.connections`, and :mod:`.server` (install and
run).
"""

from participants.examples.order_service.api import (
    PENDING,
    ApiError,
    NewOrder,
    parse_new_order,
    parse_wait,
    pending_order,
    sse_event,
)
from participants.examples.order_service.app import create_app
from participants.examples.order_service.directory import CustomerDirectory
from participants.examples.order_service.notices import OrderNotices
from participants.examples.order_service.server import ensure_installed, serve
from participants.examples.order_service.service import OrderService, OrderServiceSettings
from participants.examples.order_service.webhooks import Delivery, WebhookPolicy, WebhookSender

__all__ = [
    "PENDING",
    "ApiError",
    "CustomerDirectory",
    "Delivery",
    "NewOrder",
    "OrderNotices",
    "OrderService",
    "OrderServiceSettings",
    "WebhookPolicy",
    "WebhookSender",
    "create_app",
    "ensure_installed",
    "parse_new_order",
    "parse_wait",
    "pending_order",
    "serve",
    "sse_event",
]
