"""The ASGI app: the order API's routes over one :class:`OrderService`, which the
app's lifespan starts and stops; refusals and an unreachable database are
answered as ``{"error", "message", "details"}``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import psycopg
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import PoolTimeout
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from participants.examples.order_service.api import PENDING, ApiError, parse_new_order, parse_wait
from participants.examples.order_service.service import OrderService, OrderServiceSettings
from walsaga import tracing

log = structlog.get_logger("walsaga.order_service")


def create_app(
    settings: OrderServiceSettings, *, on_fatal: Callable[[], None] | None = None
) -> Starlette:
    """The ASGI app; its lifespan starts and stops the whole service."""
    service = OrderService(settings, on_fatal=on_fatal)

    async def post_order(request: Request) -> Response:
        wait_s = parse_wait(request.query_params.get("wait"), max_wait_s=settings.max_wait_s)
        new = parse_new_order(await request.body())
        if service.notices.closing:
            raise ApiError(503, "stopping", "the service is stopping; send the order again")
        wait = service.admission.check()
        if wait is not None:
            raise ApiError(
                503,
                "overloaded",
                f"{service.admission.pending} orders are being settled already; "
                f"send this one again in {wait}s",
                headers={"Retry-After": str(wait)},
            )
        if service.directory is not None:
            known = await run_in_threadpool(service.directory.knows, new.customer_id)
            if known is False:
                raise ApiError(
                    422,
                    "unknown_customer",
                    f"no customer {new.customer_id!r}",
                    [{"field": "customer_id", "problem": "unknown customer"}],
                )
        parent = tracing.parse(
            request.headers.get(tracing.TRACEPARENT), request.headers.get(tracing.TRACESTATE)
        )
        with tracing.span("POST /orders", parent, kind="server") as trace:
            order = await service.create(new, trace=trace)
        location = {"Location": f"/orders/{order['id']}"}
        if wait_s is not None:
            order = await service.wait_settled(order["id"], wait_s) or order
        status = 202 if order["status"] == PENDING else 200
        return JSONResponse(order, status_code=status, headers=location)

    async def get_order(request: Request) -> Response:
        order_id = request.path_params["order_id"]
        order = await service.read(order_id)
        if order is None:
            raise _unknown_order(order_id)
        return JSONResponse(order)

    async def order_events(request: Request) -> Response:
        order_id = request.path_params["order_id"]
        order = await service.read(order_id)
        if order is None:
            raise _unknown_order(order_id)
        if order["status"] != PENDING and request.headers.get("last-event-id") == order["status"]:
            # A client reconnecting after the final event: 204 tells an
            # EventSource to stop reconnecting.
            return Response(status_code=204)
        return StreamingResponse(
            service.status_events(order_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def healthz(request: Request) -> Response:
        ok, report = service.health()
        return JSONResponse(report, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        body = generate_latest(service.participant.metrics.registry)
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        answer = ApiError(
            exc.status_code, error, f"{request.method} {request.url.path}: {exc.detail}"
        )
        response = answer.response()
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("database unavailable", path=request.url.path, error=str(exc))
        return ApiError(
            503, "unavailable", "the order database is unavailable; try again"
        ).response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(
        routes=[
            Route("/orders", post_order, methods=["POST"]),
            Route("/orders/{order_id}", get_order, methods=["GET"]),
            Route("/orders/{order_id}/events", order_events, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            PoolTimeout: unavailable,
            psycopg.OperationalError: unavailable,
        },
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def _unknown_order(order_id: str) -> ApiError:
    return ApiError(404, "unknown_order", f"no order {order_id!r}")
