"""The order API's requests and answers, without I/O: a request body and the
``wait`` parameter parsed, a refusal as its JSON answer, an order as just
created and as a server-sent event."""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any

import orjson
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.responses import JSONResponse

from participants.examples import orders

PENDING = "PENDING"


class ApiError(Exception):
    """A request the API refuses: answered as ``{"error", "message", "details"}``."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.details = details
        self.headers = headers

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return JSONResponse(body, status_code=self.status, headers=self.headers)


CustomerId = Annotated[
    str, StringConstraints(strict=True, strip_whitespace=True, min_length=1, max_length=200)
]
# numeric(12,2) in the orders table.
Total = Annotated[Decimal, Field(gt=0, max_digits=12, decimal_places=2, allow_inf_nan=False)]


class NewOrder(BaseModel):
    """The body of ``POST /orders``. ``total`` is a JSON number or a decimal
    string (money without binary rounding), at most two decimal places."""

    model_config = ConfigDict(extra="forbid", strict=True)

    customer_id: CustomerId
    total: Total
    webhook_url: AnyHttpUrl | None = None


def parse_new_order(body: bytes) -> NewOrder:
    """The order in a request body, or the ApiError saying what is wrong with it."""
    try:
        return NewOrder.model_validate_json(body)
    except ValidationError as e:
        problems = e.errors(include_url=False, include_input=False)
        if any(p["type"] == "json_invalid" for p in problems):
            raise ApiError(400, "malformed_json", "the request body is not valid JSON") from None
        details = [
            {"field": ".".join(str(part) for part in p["loc"]) or "body", "problem": p["msg"]}
            for p in problems
        ]
        summary = "; ".join(f"{d['field']}: {d['problem']}" for d in details)
        raise ApiError(422, "invalid_order", f"invalid order: {summary}", details) from None


def parse_wait(raw: str | None, *, max_wait_s: float) -> float | None:
    """The ``wait`` query parameter in seconds (None: do not wait), cut to `max_wait_s`."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ApiError(
            400, "invalid_wait", f"wait must be a number of seconds, 0 or more (got {raw!r})"
        )
    return min(value, max_wait_s)


def sse_event(order: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying the order. Its id is the status, so a
    client that reconnects after the final event is told there is no more."""
    return b"event: status\nid: %s\ndata: %s\n\n" % (
        str(order["status"]).encode(),
        orjson.dumps(order),
    )


def pending_order(order_id: str, new: NewOrder) -> dict[str, Any]:
    """The order as just created (what ``GET /orders/{id}`` answers until it settles)."""
    return orders.order_json(
        {
            "id": order_id,
            "customer_id": new.customer_id,
            "total": new.total,
            "status": PENDING,
            "reason": None,
        }
    )
