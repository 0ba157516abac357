"""The intake service: cleans and checks a submitted registration, and starts its saga.

Nothing of the submission is kept as a business record. Its outcome is an
event written by intake's own transaction: ``RegistrationRefused`` with the
reasons, or ``RegistrationAccepted`` together with the start of the
``registration`` saga, which intake orchestrates (its database holds the
saga's state: ``walsaga.saga`` and ``saga_log``).

HTTP: ``POST /registrations`` with ``{"email", "name", "locale"?,
"accept_terms"}`` answers 202 ``{"id", "status": "PENDING"}`` or 422
``{"id", "status": "REFUSED", "reasons": [...]}``; ``?wait=SECONDS`` answers
once the saga has ended. ``GET /registrations/{id}`` answers the status:
``PENDING``, ``REGISTERED``, ``REFUSED`` (with the reason) or ``FAILED``.
"""

from __future__ import annotations

import asyncio
import re
import time
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from participants.examples.registration import saga
from participants.handlers import publish
from participants.orchestrator import Orchestrator, saga_status
from participants.runtime import Participant, set_trace
from walsaga import schema, tracing
from walsaga.tracing import TraceContext

LOCALES = ("en", "pt", "de")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$")


@dataclass(frozen=True)
class Verdict:
    """What intake makes of a submission: the cleaned registration, or the reasons not."""

    registration: dict[str, Any] | None
    reasons: list[dict[str, str]]

    @property
    def accepted(self) -> bool:
        return self.registration is not None


def check(submission: Any) -> Verdict:
    """Clean and check a submission. Pure."""
    if not isinstance(submission, Mapping):
        return Verdict(None, [{"field": "", "problem": "send a JSON object"}])
    reasons: list[dict[str, str]] = []
    raw_email = submission.get("email")
    email = (
        unicodedata.normalize("NFKC", raw_email).strip().lower()
        if isinstance(raw_email, str)
        else ""
    )
    if not email:
        reasons.append({"field": "email", "problem": "required"})
    elif len(email) > 254 or not _EMAIL.match(email):
        reasons.append({"field": "email", "problem": "not an e-mail address"})
    raw_name = submission.get("name")
    name = " ".join(raw_name.split()) if isinstance(raw_name, str) else ""
    if not name:
        reasons.append({"field": "name", "problem": "required"})
    elif len(name) > 100:
        reasons.append({"field": "name", "problem": "longer than 100 characters"})
    locale = submission.get("locale", "en")
    if locale not in LOCALES:
        reasons.append({"field": "locale", "problem": f"one of {', '.join(LOCALES)}"})
    if submission.get("accept_terms") is not True:
        reasons.append({"field": "accept_terms", "problem": "the terms must be accepted"})
    if reasons:
        return Verdict(None, reasons)
    return Verdict({"email": email, "name": name, "locale": locale}, [])


def submit(
    conn: psycopg.Connection[Any],
    submission: Any,
    *,
    orchestrator: Orchestrator,
    registration_id: str | None = None,
    trace: TraceContext | None = None,
) -> tuple[str, Verdict]:
    """Check `submission` and write its outcome, in one transaction of its own.

    With `trace` (the request's trace context), every event of the saga carries
    that trace.
    """
    registration_id = registration_id or str(uuid.uuid4())
    verdict = check(submission)
    headers = {"saga_id": registration_id, "saga_type": saga.NAME}
    with conn.transaction():
        if trace is not None:
            set_trace(conn, trace)
        if verdict.registration is None:
            body = {"registration_id": registration_id, "status": "REFUSED",
                    "reasons": verdict.reasons}  # fmt: skip
            publish(conn, saga.EVENTS, registration_id, "RegistrationRefused", body, headers)
        else:
            data = {"registration_id": registration_id, **verdict.registration}
            publish(conn, saga.EVENTS, registration_id, "RegistrationAccepted", data, headers)
            definition = next(iter(orchestrator.definitions))
            orchestrator.start(conn, definition, registration_id, data, trace=trace)
    return registration_id, verdict


_STATUS = {"RUNNING": "PENDING", "COMPENSATING": "PENDING", "COMPLETED": "REGISTERED",
           "COMPENSATED": "REFUSED", "FAILED": "FAILED", "RESOLVED": "REFUSED"}  # fmt: skip


def status(conn: psycopg.Connection[Any], registration_id: str) -> dict[str, Any] | None:
    """Where a registration stands (None: unknown, or refused by intake itself)."""
    state = saga_status(conn, registration_id)
    if state is None:
        return None
    answer: dict[str, Any] = {"id": registration_id, "status": _STATUS[state.status],
                              "saga": state.status}  # fmt: skip
    if state.reason:
        answer["reason"] = state.reason
    user = saga.provider_user_id(state.data)
    if user and state.status == "COMPLETED":
        answer["provider_user_id"] = user
    return answer


def install(conn: psycopg.Connection[Any]) -> None:
    """walsaga's core and saga components (intake keeps no tables of its own)."""
    with conn.transaction():
        schema.apply(conn, "core")
        schema.apply(conn, "saga")


def orchestrator() -> Orchestrator:
    return Orchestrator([saga.REGISTRATION], name="intake")


def participant(
    *,
    dsn: str,
    kafka: dict[str, Any],
    orchestrator: Orchestrator,
    name: str = "intake",
    **settings: Any,
) -> Participant:
    """Intake's consumer: the saga's replies and deadlines."""
    service = Participant(name, dsn=dsn, kafka=kafka, **settings)
    orchestrator.attach(service)
    return service


# -- HTTP ------------------------------------------------------------------------


def create_app(dsn: str, runner: Orchestrator, *, max_wait_s: float = 60.0) -> Any:
    """The intake API (Starlette), over a small connection pool."""
    from psycopg_pool import ConnectionPool
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    pool = ConnectionPool(dsn, min_size=1, max_size=8, open=False)

    def _submit(body: Any, trace: TraceContext) -> tuple[str, Verdict]:
        with pool.connection() as conn:
            return submit(conn, body, orchestrator=runner, trace=trace)

    def _status(registration_id: str) -> dict[str, Any] | None:
        with pool.connection() as conn:
            return status(conn, registration_id)

    async def post(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        parent = tracing.parse(
            request.headers.get(tracing.TRACEPARENT), request.headers.get(tracing.TRACESTATE)
        )
        with tracing.span("POST /registrations", parent, kind="server") as trace:
            registration_id, verdict = await run_in_threadpool(_submit, body, trace)
        if not verdict.accepted:
            answer = {"id": registration_id, "status": "REFUSED", "reasons": verdict.reasons}
            return JSONResponse(answer, status_code=422)
        current: dict[str, Any] = {"id": registration_id, "status": "PENDING"}
        wait = request.query_params.get("wait")
        if wait:
            deadline = time.monotonic() + min(max_wait_s, max(0.0, float(wait)))
            while current["status"] == "PENDING" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                found = await run_in_threadpool(_status, registration_id)
                if found is not None:
                    current = found
        return JSONResponse(current, status_code=202 if current["status"] == "PENDING" else 200,
                            headers={"Location": f"/registrations/{registration_id}"})  # fmt: skip

    async def get(request: Request) -> Response:
        found = await run_in_threadpool(_status, request.path_params["registration_id"])
        if found is None:
            return JSONResponse({"error": "not_found", "message": "no such registration"}, 404)
        return JSONResponse(found)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def lifespan(app: Any) -> Any:
        pool.open()
        try:
            yield
        finally:
            pool.close()

    import contextlib

    return Starlette(
        routes=[
            Route("/registrations", post, methods=["POST"]),
            Route("/registrations/{registration_id}", get, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=contextlib.asynccontextmanager(lifespan),
    )
