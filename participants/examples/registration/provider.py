"""A small identity provider for the registration example, with faults on demand.

The kind of service an identity step calls: users created over HTTP, found
by the caller's external key, deleted by id. Users live in a SQLite file, so
the provider can be killed and started again without forgetting them.

    POST   /users                  {"email", "name", "external_key"} -> 201 user
                                   409 email already registered, 422 invalid
                                   (an Idempotency-Key header, when sent, replays
                                   the first answer to that key)
    GET    /users/external/{key}   -> 200 user, 404
    GET    /users                  -> 200 {"users": [...]}
    DELETE /users/{id}             -> 204, 404
    GET    /healthz
    GET    /_faults, PUT /_faults  the faults below, as JSON

Faults (each a rate between 0 and 1, drawn per request): ``error_rate``
answers 500 and does nothing; ``error_after_rate`` creates or deletes, then
answers 500; ``timeout_rate`` does it, then answers only after ``hang_s``;
``crash_rate`` does it, then the process exits at once (run it under a
supervisor), as does ``crash_every`` = N on every Nth create or delete it
does (not a rate: a crash a test can count on); ``delay_s`` makes every
request slow before it is handled.
The provider's promise, which lookups rely on: a request not finished
within ``max_request_s`` of its arrival is abandoned (503), never done later.
"""

from __future__ import annotations

import itertools
import os
import random
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id           TEXT PRIMARY KEY,
    email        TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL,
    external_key TEXT,
    created_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS users_external_key ON users (external_key);
CREATE TABLE IF NOT EXISTS idempotency (
    key    TEXT PRIMARY KEY,
    status INTEGER NOT NULL,
    body   TEXT NOT NULL
);
"""

#: The exit status of a provider that crashed on purpose (``crash_rate``).
CRASH_EXIT = 70


@dataclass
class Faults:
    error_rate: float = 0.0
    error_after_rate: float = 0.0
    timeout_rate: float = 0.0
    crash_rate: float = 0.0
    crash_every: float = 0.0
    delay_s: float = 0.0
    hang_s: float = 30.0
    max_request_s: float = 10.0

    def update(self, changes: dict[str, Any]) -> None:
        for name, value in changes.items():
            if name not in self.__dataclass_fields__:
                raise ValueError(f"no fault {name!r}")
            setattr(self, name, float(value))


class Users:
    """The provider's users, in SQLite (``:memory:`` or a file that survives restarts)."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def create(self, email: str, name: str, external_key: str | None) -> dict[str, Any] | None:
        """The new user; None when the address is registered already."""
        user = {"id": f"u-{uuid.uuid4().hex[:16]}", "email": email, "name": name,
                "external_key": external_key, "created_at": time.time()}  # fmt: skip
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO users (id, email, name, external_key, created_at) "
                    "VALUES (:id, :email, :name, :external_key, :created_at)",
                    user,
                )
            except sqlite3.IntegrityError:
                return None
        return user

    def by_external_key(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, email, name, external_key, created_at FROM users "
                "WHERE external_key = ? ORDER BY created_at LIMIT 1",
                (key,),
            ).fetchone()
        return _user(row) if row else None

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, email, name, external_key, created_at FROM users ORDER BY created_at"
            ).fetchall()
        return [_user(r) for r in rows]

    def delete(self, user_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM users WHERE id = ?", (user_id,))
        return cur.rowcount > 0

    def replay(self, key: str) -> tuple[int, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT status, body FROM idempotency WHERE key = ?", (key,)
            ).fetchone()
        return (int(row[0]), orjson.loads(row[1])) if row else None

    def remember(self, key: str, status: int, body: Any) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO idempotency (key, status, body) VALUES (?, ?, ?)",
                (key, status, orjson.dumps(body).decode()),
            )

    def close(self) -> None:
        self._db.close()


def _user(row: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(("id", "email", "name", "external_key", "created_at"), row, strict=True))


def create_app(users: Users, faults: Faults | None = None, *, seed: int | None = None) -> Starlette:
    """The provider's ASGI app over `users`."""
    faults = faults or Faults()
    rng = random.Random(seed)
    rng_lock = threading.Lock()
    done = itertools.count(1)

    def draw(rate: float) -> bool:
        with rng_lock:
            return rate > 0 and rng.random() < rate

    def before(received: float) -> Response | None:
        """The faults that strike before anything is done."""
        if faults.delay_s:
            time.sleep(faults.delay_s)
        if draw(faults.error_rate):
            return _error(500, "internal", "something went wrong (nothing was done)")
        if time.monotonic() - received > faults.max_request_s:
            return _error(503, "abandoned", "the request waited too long and was abandoned")
        return None

    def after(response: Response) -> Response:
        """The faults that strike once it is done, before the answer."""
        if draw(faults.crash_rate):
            os._exit(CRASH_EXIT)
        if faults.crash_every >= 1:
            with rng_lock:
                nth = next(done)
            if nth % int(faults.crash_every) == 0:
                os._exit(CRASH_EXIT)
        if draw(faults.error_after_rate):
            return _error(500, "internal", "something went wrong after the change")
        if draw(faults.timeout_rate):
            time.sleep(faults.hang_s)
        return response

    def create_user(request: Request) -> Response:
        received = time.monotonic()
        key = request.headers.get("idempotency-key")
        if key:
            replayed = users.replay(key)
            if replayed is not None:
                return JSONResponse(replayed[1], status_code=replayed[0])
        early = before(received)
        if early is not None:
            return early
        try:
            body = orjson.loads(_body(request))
        except orjson.JSONDecodeError:
            return _error(422, "invalid", "the body is not JSON")
        email = body.get("email") if isinstance(body, dict) else None
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(email, str) or "@" not in email or not isinstance(name, str):
            return _error(422, "invalid", "email and name are required")
        user = users.create(email, name, body.get("external_key"))
        if user is None:
            status, answer = 409, {"error": "email_taken",
                                   "message": f"{email} is registered already"}  # fmt: skip
        else:
            status, answer = 201, user
        if key:
            users.remember(key, status, answer)
        if user is None:
            return JSONResponse(answer, status_code=status)
        return after(JSONResponse(answer, status_code=status))

    def find_user(request: Request) -> Response:
        early = before(time.monotonic())
        if early is not None:
            return early
        user = users.by_external_key(request.path_params["key"])
        if user is None:
            return _error(404, "not_found", "no user with that external key")
        return JSONResponse(user)

    def list_users(request: Request) -> Response:
        return JSONResponse({"users": users.all()})

    def delete_user(request: Request) -> Response:
        early = before(time.monotonic())
        if early is not None:
            return early
        if not users.delete(request.path_params["user_id"]):
            return _error(404, "not_found", "no such user")
        return after(Response(status_code=204))

    async def get_faults(request: Request) -> Response:
        return JSONResponse(asdict(faults))

    async def put_faults(request: Request) -> Response:
        try:
            faults.update(orjson.loads(await request.body()))
        except (ValueError, TypeError, AttributeError) as e:
            return _error(422, "invalid", str(e))
        return JSONResponse(asdict(faults))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/users", create_user, methods=["POST"]),
            Route("/users", list_users, methods=["GET"]),
            Route("/users/external/{key:path}", find_user, methods=["GET"]),
            Route("/users/{user_id}", delete_user, methods=["DELETE"]),
            Route("/_faults", get_faults, methods=["GET"]),
            Route("/_faults", put_faults, methods=["PUT"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


def _body(request: Request) -> bytes:
    # Sync endpoints run in a thread: read the body through the event loop.
    import anyio.from_thread

    return anyio.from_thread.run(request.body)


def _error(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=status)
