"""External effects: calls outside a service's database, made exactly once in effect.

A step writes an effect request (:func:`request_effect`, ``ctx.request_effect``,
or ``walsaga.request_effect`` in SQL) in the same transaction as its other
writes; an :class:`EffectWorker` performs it and records the outcome, with the
outcome event, in the same database. See docs/external-effects.md.
"""

from participants.effects.decision import Decision, after_call, after_lookup
from participants.effects.http import HttpCall, HttpLookup, HttpRequest
from participants.effects.metrics import EffectMetrics
from participants.effects.model import (
    CallResult,
    Done,
    Effect,
    EffectRetry,
    InDoubt,
    NotDone,
    Refused,
    Resolution,
    Target,
)
from participants.effects.store import request as request_effect
from participants.effects.worker import EffectWorker

__all__ = [
    "CallResult",
    "Decision",
    "Done",
    "Effect",
    "EffectMetrics",
    "EffectRetry",
    "EffectWorker",
    "HttpCall",
    "HttpLookup",
    "HttpRequest",
    "InDoubt",
    "NotDone",
    "Refused",
    "Resolution",
    "Target",
    "after_call",
    "after_lookup",
    "request_effect",
]
