"""The outcome of an effect, written in the transaction that records it: the
target's own writes (``on_done`` / ``on_failed``) and the outcome event.

Both go with the row's new status in one transaction, so the event is
announced exactly when the outcome is recorded: once.
"""

from __future__ import annotations

from typing import Any

import psycopg

from participants.effects.decision import Decision
from participants.effects.model import DONE, FAILED, Effect, Refused, Target
from participants.handlers import publish
from participants.runtime import set_trace
from walsaga import tracing


def write_outcome(
    conn: psycopg.Connection[Any], effect: Effect, decision: Decision, target: Target
) -> None:
    """The target's writes and the outcome event of an effect that ended."""
    headers = {**effect.headers, "effect_key": effect.key}
    hop = tracing.from_headers(effect.headers)
    if hop is not None:  # the target's own writes (capture triggers) carry it too
        set_trace(conn, hop, cause=effect.headers.get("causation_id"))
    if decision.status == DONE:
        if target.on_done is not None:
            target.on_done(conn, effect, decision.result)
        if target.done_event and target.topic:
            body = {**effect.payload, "result": decision.result}
            publish(conn, target.topic, effect.aggregate_id, target.done_event, body, headers)
        return
    refusal = Refused(decision.reason or decision.status, decision.code or decision.status)
    if target.on_failed is not None:
        target.on_failed(conn, effect, refusal)
    if target.failed_event and target.topic:
        body = {
            **effect.payload,
            "reason": refusal.reason,
            "code": refusal.code,
            # A business refusal, as opposed to giving up (or an unknown outcome).
            "refused": decision.status != FAILED,
            "attempts": effect.attempts,
        }
        publish(conn, target.topic, effect.aggregate_id, target.failed_event, body, headers)
