"""The console's web application: server-rendered pages over the tracker's and the
orchestrators' databases, and the relay's sources.

Pages: the saga list (filters, counts per status, stuck and FAILED first),
a saga (its sequence diagram, timeline, data, and for an orchestrated saga
its log and the repair buttons), the relay (slots, rates, dead letters).
No script runs in the browser; the only state is the operator's session
cookie. Repairs are POSTs checked by :class:`~participants.console.security.OperatorAuth`
and carried out like ``walsaga sagas``: in the orchestrator's database,
through its outbox, logged with who did them.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from participants.console.diagram import sequence_diagram
from participants.console.relay_status import RelayWatch
from participants.console.security import SESSION_COOKIE, SESSION_S, OperatorAuth, RefusedError
from participants.operations import Operations, took, when
from participants.repair import ACTIONS, RepairRefusedError, SagaNotFoundError
from participants.timeline import as_json
from participants.tracker_config import TrackerConfig
from participants.tracker_store import STATUS_FILTERS, SagaFilter, parse_age
from walsaga.errors import WalsagaError

HERE = Path(__file__).resolve().parent

#: Sent with every page: nothing but the console's own styles, no scripts, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

DONE = {"retry": "retried", "abort": "aborted", "resolve": "resolved"}


class Console:
    """The pages and actions of one console process."""

    def __init__(self, config: TrackerConfig, *, pool: ConnectionPool[Any]) -> None:
        self.config = config
        self.pool = pool
        self.operations = Operations(config, pool.connection)
        self.auth = OperatorAuth(config.console.operator_token)
        self.relay = RelayWatch(config.relay_source)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.globals.update(
            when=when, took=took, size=size, quote=lambda s: urllib.parse.quote(str(s), safe="")
        )

    # -- helpers -------------------------------------------------------------------

    def _session(self, request: Request) -> str | None:
        cookie = request.cookies.get(SESSION_COOKIE)
        return cookie if self.auth.session_ok(cookie) else None

    def page(
        self, request: Request, name: str, context: dict[str, Any], status: int = 200
    ) -> Response:
        session = self._session(request)
        base = {
            "read_only": self.auth.read_only,
            "operator": session is not None,
            "csrf": self.auth.csrf_token(session) if session else "",
            "path": request.url.path,
        }
        response = self.templates.TemplateResponse(request, name, {**base, **context},
                                                   status_code=status)  # fmt: skip
        response.headers.update(SECURITY_HEADERS)
        return response

    def error(self, request: Request, status: int, title: str, message: str) -> Response:
        return self.page(request, "error.html", {"title": title, "message": message}, status)

    # -- pages -----------------------------------------------------------------------

    def home(self, request: Request) -> Response:
        return RedirectResponse("/sagas", status_code=303)

    def sagas(self, request: Request) -> Response:
        q = request.query_params
        status = q.get("status") or None
        saga_type = q.get("type") or None
        since = q.get("since") or None
        try:
            limit = int(q.get("limit") or self.config.console.page_size)
            f = SagaFilter(status=status, saga_type=saga_type,
                           since=parse_age(since) if since else None, limit=limit)  # fmt: skip
        except ValueError as e:
            return self.error(request, 400, "Bad filter", str(e))
        try:
            found, counts = self.operations.list_sagas(f)
            types = self.operations.saga_types()
        except WalsagaError as e:
            return self.error(request, 503, "Cannot read the sagas", str(e))
        return self.page(request, "sagas.html", {
            "sagas": found, "counts": counts, "statuses": STATUS_FILTERS, "types": types,
            "status": status, "saga_type": saga_type, "since": since or "", "limit": limit,
            "now": datetime.now(UTC),
        })  # fmt: skip

    def saga(self, request: Request) -> Response:
        saga_id = request.path_params["saga_id"]
        try:
            view = self.operations.show(saga_id)
        except WalsagaError as e:
            return self.error(request, 503, "Cannot read the saga", str(e))
        if view is None:
            return self.error(request, 404, "No such saga",
                              f"no saga {saga_id!r}: neither the tracker nor any orchestrator "
                              "knows it")  # fmt: skip
        start = view.lines[0].at if view.lines else None
        owned = view.orchestrated
        return self.page(request, "saga.html", {
            "view": view,
            "diagram": sequence_diagram(view.lanes, view.lines, start=start),
            "start": start,
            "data": as_json(owned.state.data) if owned else None,
            "actions": view.actions(),
            "done": request.query_params.get("done"),
            "now": datetime.now(UTC),
        })  # fmt: skip

    def relay_page(self, request: Request) -> Response:
        return self.page(request, "relay.html", {"sources": self.relay.report()})

    # -- the operator ---------------------------------------------------------------------

    def login_page(self, request: Request) -> Response:
        return self.page(request, "login.html", {"message": None})

    async def login(self, request: Request) -> Response:
        form = await _form(request)
        try:
            cookie = self.auth.login(form.get("token", ""))
        except RefusedError as e:
            return self.page(request, "login.html", {"message": str(e)}, status=403)
        target = form.get("next") or "/sagas"
        if not target.startswith("/") or target.startswith("//"):
            target = "/sagas"  # only ever back into the console
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, cookie, max_age=SESSION_S, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")  # fmt: skip
        return response

    async def logout(self, request: Request) -> Response:
        form = await _form(request)
        try:
            self.auth.check_action(request.cookies.get(SESSION_COOKIE), form.get("csrf"))
        except RefusedError as e:
            return self.error(request, 403, "Not allowed", str(e))
        response = RedirectResponse("/sagas", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    async def act(self, request: Request) -> Response:
        saga_id = request.path_params["saga_id"]
        action = request.path_params["action"]
        if action not in ACTIONS:
            return self.error(request, 404, "No such action", f"no action {action!r}")
        form = await _form(request)
        try:
            self.auth.check_action(request.cookies.get(SESSION_COOKIE), form.get("csrf"))
        except RefusedError as e:
            return self.error(request, 403, "Not allowed", str(e))
        client = request.client.host if request.client else "unknown"
        by = f"{(form.get('by') or 'operator').strip()[:80]} (console, {client})"
        try:
            await run_in_threadpool(
                self.operations.repair, saga_id, action, by=by, note=form.get("note", "").strip()
            )
        except SagaNotFoundError as e:
            return self.error(request, 404, "No such saga", str(e))
        except RepairRefusedError as e:
            return self.error(request, 409, f"Cannot {action}", str(e))
        except WalsagaError as e:
            return self.error(request, 503, f"Could not {action}", str(e))
        target = f"/sagas/{urllib.parse.quote(saga_id, safe='')}?done={DONE[action]}"
        return RedirectResponse(target, status_code=303)

    def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "read_only": self.auth.read_only})


def size(n: int | None) -> str:
    """Bytes for people: 0 B, 12.5 KiB, 3.1 GiB."""
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


async def _form(request: Request) -> dict[str, str]:
    """An url-encoded form body (the console's forms are nothing else)."""
    body = (await request.body())[:65536].decode("utf-8", "replace")
    return {k: v[0] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}


def create_app(config: TrackerConfig) -> Starlette:
    """The console of `config`: its pages, over a small pool of connections to the tracker."""
    pool: ConnectionPool[Any] = ConnectionPool(
        config.tracker.dsn, min_size=1, max_size=4, open=False,
        kwargs={"autocommit": True, "connect_timeout": 10}, name="console",
    )  # fmt: skip
    console = Console(config, pool=pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool.open(wait=False)
        try:
            yield
        finally:
            pool.close()

    routes = [
        Route("/", console.home),
        Route("/sagas", console.sagas),
        Route("/sagas/{saga_id}", console.saga),
        Route("/sagas/{saga_id}/{action}", console.act, methods=["POST"]),
        Route("/relay", console.relay_page),
        Route("/login", console.login_page, methods=["GET"]),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Route("/healthz", console.healthz),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.console = console
    return app
