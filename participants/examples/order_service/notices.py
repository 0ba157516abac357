"""How a waiting request learns that its order may have settled: the process's
one ``LISTEN`` on the orders' notification channel, fanned out to the
requests waiting on those orders."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

import orjson
import psycopg
import structlog
from psycopg import sql

from participants.examples import orders
from participants.examples.order_service.connections import KEEPALIVES
from walsaga.retry import BackoffPolicy

log = structlog.get_logger("walsaga.order_service")


class OrderNotices:
    """The listening end of ``NOTIFY walsaga_order``: one connection per process,
    its notifications fanned out to the requests waiting on those orders.

    A notification only means "look again": waiters read the row, and every
    waiter is woken after each (re)connection, so a notification lost while
    the connection was down costs nothing.
    """

    def __init__(self, dsn: str, *, retry_max_s: float = 5.0) -> None:
        self.dsn = dsn
        self.retry_max_s = retry_max_s
        self.listening = asyncio.Event()
        self.closing = False
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._watchers: set[asyncio.Event] = set()
        self._webhook_watchers: set[asyncio.Event] = set()
        #: Called for every notification (an order settled), in the event loop.
        self.listeners: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def subscribe(self, order_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever `order_id` may have changed (read the order after subscribing)."""
        event = asyncio.Event()
        if self.closing:
            event.set()
        waiters = self._waiters.setdefault(order_id, set())
        waiters.add(event)
        try:
            yield event
        finally:
            waiters.discard(event)
            if not waiters and self._waiters.get(order_id) is waiters:
                del self._waiters[order_id]

    def watch(self, *, webhooks_only: bool = False) -> asyncio.Event:
        """An event set by every notification, whichever the order (`webhooks_only`:
        by those of orders that queued a webhook call)."""
        event = asyncio.Event()
        (self._webhook_watchers if webhooks_only else self._watchers).add(event)
        return event

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def close(self) -> None:
        """Wake every waiter for good: the process is stopping."""
        self.closing = True
        self._wake_all()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()
        for event in self._watchers | self._webhook_watchers:
            event.set()

    def _dispatch(self, payload: str) -> None:
        try:
            notice = orjson.loads(payload)
            order_id = notice["id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("unreadable order notification", payload=payload[:200])
            return
        if notice.get("webhook"):
            for event in self._webhook_watchers:
                event.set()
        for listener in self.listeners:
            listener()
        for event in self._waiters.get(str(order_id), ()):
            event.set()
        for event in self._watchers:
            event.set()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with backoff."""
        backoff = BackoffPolicy(min_s=0.1, max_s=max(0.1, self.retry_max_s)).backoff()
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(orders.NOTIFY_CHANNEL))
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, **KEEPALIVES
                )
                async with conn:
                    await conn.execute(listen)
                    self.listening.set()
                    backoff.reset()
                    self._wake_all()  # whatever settled while nobody listened
                    async for notify in conn.notifies():
                        self._dispatch(notify.payload)
            except psycopg.Error as e:
                delay = backoff.next_delay()
                log.warning(
                    "order notifications interrupted", error=str(e), retry_in_s=round(delay, 2)
                )
            except Exception as e:
                delay = backoff.next_delay()
                log.error("order notifications failed", error=repr(e), retry_in_s=round(delay, 2))
            else:  # the server ended the stream without an error
                delay = backoff.next_delay()
            finally:
                self.listening.clear()
            await asyncio.sleep(delay)
