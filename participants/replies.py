"""What a participant writes when a record fails: a failure event or a dead letter.

Both leave through the outbox, in the same transaction as the inbox row of
the record, so a failure is announced exactly once however often the record
arrives.
"""

from __future__ import annotations

from typing import Any

import psycopg
import structlog

from participants.handlers import Route, failure_payload, publish
from participants.message import Message

log = structlog.get_logger("walsaga.participant")


def failure_event(
    conn: psycopg.Connection[Any],
    participant: str,
    route: Route,
    message: Message,
    reason: str,
    code: str,
) -> None:
    """Publish the failure event of `route` for `message` (correlated, so a saga sees it)."""
    log.info("business failure", participant=participant, record=message.describe(), reason=reason)
    if not route.failure_event:
        return
    failure_type = route.failure_type or f"{message.type or 'Message'}Failed"
    publish(
        conn,
        route.failure_topic or participant,
        message.key or "",
        failure_type,
        failure_payload(route, message, reason, code),
        message.correlation(),
    )


def dead_letter(
    conn: psycopg.Connection[Any], participant: str, topic: str, message: Message, reason: str
) -> None:
    """Publish `message` to the dead-letter `topic`, with where it came from and why."""
    log.error("dead-lettered", participant=participant, record=message.describe(), reason=reason)
    headers = {
        **message.correlation(),
        "walsaga.deadletter.reason": reason[:1000],
        "walsaga.deadletter.consumer": participant,
        "walsaga.deadletter.topic": message.topic,
        "walsaga.deadletter.partition": str(message.partition),
        "walsaga.deadletter.offset": str(message.offset),
        "walsaga.deadletter.id": message.id,
    }
    payload = {"headers": message.headers, **message.value_for_dead_letter()}
    publish(conn, topic, message.key or "", message.type or "Unknown", payload, headers)
