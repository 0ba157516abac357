"""What a handler is given and how it answers: the open transaction, the message,
and ``publish`` (events leave only through the outbox).

A handler is ``handler(ctx, message)``. It runs inside the participant's
database transaction (under a savepoint of its own unless its route says
otherwise, :class:`Route`); raising
:class:`~walsaga.errors.BusinessError` turns the message into a failure event,
anything the runtime cannot classify is retried and finally dead-lettered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from participants import commit
from participants.message import Message
from walsaga.tracing import TraceContext


class HandlerContext:
    """The participant's open transaction while one message is handled."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        message: Message,
        participant: str,
        *,
        trace: TraceContext | None = None,
    ) -> None:
        self.conn = conn
        self.message = message
        self.participant = participant
        #: This hop's trace context (the message's trace, a span of its own), if
        #: the message carried one: every event this transaction writes carries it.
        self.trace = trace

    def execute(self, query: Any, params: Any = None) -> psycopg.Cursor[Any]:
        return self.conn.execute(query, params)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once this transaction has committed (never if it rolls back)."""
        commit.after_commit(self.conn, callback)

    def publish(
        self,
        aggregatetype: str,
        aggregateid: str,
        type: str,
        payload: Any,
        headers: Mapping[str, Any] | None = None,
        *,
        correlate: bool = True,
    ) -> str:
        """Write an event to the outbox, in this transaction; returns its id.

        With ``correlate`` (the default) the message's saga headers (``saga_id``,
        ``saga_type``) and ``causation_id`` travel with it, so an orchestrator
        recognises the event as a reply.
        """
        merged: dict[str, Any] = dict(self.message.correlation()) if correlate else {}
        if headers:
            merged.update(headers)
        return publish(self.conn, aggregatetype, aggregateid, type, payload, merged)

    def request_effect(
        self,
        target: str,
        payload: Mapping[str, Any],
        *,
        key: str | None = None,
        aggregate_id: str | None = None,
    ) -> str:
        """Ask an effect worker to call `target` with `payload`, in this transaction.

        Returns the idempotency key: by default the message's own (a saga
        command's ``<saga>/<step>/do``, derived from the saga and the step; an
        event's id otherwise) followed by ``/<target>``. A repeat with the same
        key changes nothing. The outcome event carries this message's saga
        headers, with `aggregate_id` (default: the message's key) as its key.
        See docs/external-effects.md.
        """
        from participants.effects.store import request

        key = key or f"{self.message.dedupe_key}/{target}"
        request(self.conn, target, key, payload, headers=self.message.correlation(),
                aggregate_id=aggregate_id or self.message.key or self.message.saga_id)  # fmt: skip
        return key


def publish(
    conn: psycopg.Connection[Any],
    aggregatetype: str,
    aggregateid: str,
    type: str,
    payload: Any,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """``walsaga.publish`` in the connection's current transaction."""
    row = conn.execute(
        "SELECT walsaga.publish(%s, %s, %s, %s, %s)::text",
        (aggregatetype, aggregateid, type, Jsonb(payload), Jsonb(dict(headers or {}))),
    ).fetchone()
    assert row is not None
    return str(row[0])


class Handler(Protocol):
    def __call__(self, ctx: HandlerContext, message: Message, /) -> None: ...


@dataclass(frozen=True)
class Route:
    """Which records a handler takes, and what a business failure publishes."""

    topic: str
    type: str | None  # None: every type on the topic
    handler: Handler
    #: Event type published when the handler raises BusinessError
    #: (default: the message type + "Failed"); None with failure_event=False: nothing.
    failure_type: str | None = None
    #: Aggregate type (the topic, with the default template) of that event;
    #: default: the participant's name.
    failure_topic: str | None = None
    failure_event: bool = True
    #: Extra payload fields of the failure event, from the message.
    failure_fields: Callable[[Message], dict[str, Any]] | None = None
    #: Run the handler under a savepoint of its own (two round trips), so a
    #: business failure undoes only its writes. Handlers that never fail for
    #: business reasons may skip it.
    savepoint: bool = True
    #: The handler's only effects are its statements in the transaction (a
    #: declared SQL handler's are): running it, rolling back and running it
    #: again leaves no trace. In a batch of several records it then runs
    #: without its savepoint; should a record fail, the batch is rolled back
    #: and handled again with a savepoint for each record, and the next
    #: batches take them from the start for a while. A Python handler that
    #: does anything outside the transaction (calls, counters) must keep False:
    #: then it runs once per delivery, failing or not.
    transactional: bool = False

    def matches(self, message: Message) -> bool:
        return message.topic == self.topic and (self.type is None or self.type == message.type)


def failure_payload(route: Route, message: Message, reason: str, code: str) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "reason": reason,
        "code": code,
        "failed_type": message.type,
        "message_id": message.id,
    }
    if route.failure_fields is not None:
        payload.update(route.failure_fields(message))
    else:
        try:
            original = message.payload
        except Exception:
            original = None
        if isinstance(original, dict):
            # Echo the request so the failure can be matched without a lookup.
            payload = {**original, **payload}
    return payload
