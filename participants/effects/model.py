"""What an effect is, what a call of one can come back with, and how a target is
declared. Pure data: no I/O.

A call of a target ends one of four ways, and the difference decides what
may happen next:

- :class:`Done`: the provider did it (its answer is kept as the result);
- :class:`Refused`: the provider refused for a business reason (an address
  already registered, a mailbox that does not exist): a failure event, no retry;
- :class:`NotDone`: it certainly did not happen (nothing could be sent, or
  the provider answered that it did nothing): safe to try again;
- :class:`InDoubt`: it may have happened (the call timed out, the connection
  broke after the request left, a server error): the outcome is resolved
  before any new attempt, by the target's :class:`Resolution`.

A lookup answers with the same types: :class:`Done` (found, with what was
found), :class:`NotDone` (certainly absent) or :class:`InDoubt` (could not tell).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg

from walsaga.retry import BackoffPolicy

PENDING = "PENDING"
SENT = "SENT"
IN_DOUBT = "IN_DOUBT"
DONE = "DONE"
REFUSED = "REFUSED"
FAILED = "FAILED"
LIVE = frozenset({PENDING, SENT, IN_DOUBT})
ENDED = frozenset({DONE, REFUSED, FAILED})


@dataclass(frozen=True)
class Effect:
    """One effect request, as a worker leased it."""

    id: str
    target: str
    key: str  # the idempotency key, derived from the saga and the step
    payload: dict[str, Any]
    headers: dict[str, str]
    aggregate_id: str
    status: str
    attempts: int
    created_at: datetime
    sent_at: datetime | None = None

    def field(self, path: str) -> Any:
        """A payload field by name (``a.b`` walks into objects); KeyError if absent."""
        node: Any = self.payload
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise KeyError(f"effect {self.key!r}: payload has no field {path!r}")
            node = node[part]
        return node


@dataclass(frozen=True)
class Done:
    result: Any = None


@dataclass(frozen=True)
class Refused:
    reason: str
    code: str = "REFUSED"


@dataclass(frozen=True)
class NotDone:
    error: str
    #: When the provider said when to come back (HTTP Retry-After).
    retry_after_s: float | None = None
    #: The provider answered (it looked at the request and did nothing), as
    #: opposed to nothing reaching it: with an idempotency key, an answer
    #: also settles any earlier attempt that was in doubt.
    answered: bool = False


@dataclass(frozen=True)
class InDoubt:
    error: str
    #: The provider answered (a server error): it has finished with the
    #: request, so a lookup can be trusted at once. Otherwise (a timeout, a
    #: broken connection) it may still be working on it: wait ``settle_s``.
    answered: bool = False


CallResult = Done | Refused | NotDone | InDoubt


class Resolution(StrEnum):
    """How a target's unknown outcomes are resolved before any new attempt."""

    #: The provider deduplicates by the idempotency key (or the call is
    #: idempotent by nature, as a DELETE): calling again is the resolution.
    KEY = "key"
    #: A declared lookup says whether the earlier attempt took effect.
    LOOKUP = "lookup"
    #: No way to tell: send again (at least once; a duplicate is accepted).
    RESEND = "resend"
    #: No way to tell: fail (at most once; a lost call is accepted).
    FAIL = "fail"


@dataclass(frozen=True)
class EffectRetry:
    """Forgiving retries: waits grow from ``min_s`` to ``max_s`` (with jitter), and
    the effect fails only once ``give_up_after_s`` have passed since it was
    requested (and its outcome is known: an effect in doubt is resolved first)."""

    min_s: float = 1.0
    max_s: float = 60.0
    give_up_after_s: float = 900.0
    multiplier: float = 2.0

    @property
    def backoff(self) -> BackoffPolicy:
        return BackoffPolicy(min_s=self.min_s, max_s=self.max_s, multiplier=self.multiplier)


#: ``call(effect, timeout_s)`` and ``lookup(effect, timeout_s)``.
Call = Callable[[Effect, float], CallResult]
#: ``on_done(conn, effect, result)``, in the transaction that records the outcome.
DoneHook = Callable[[psycopg.Connection[Any], Effect, Any], None]
#: ``on_failed(conn, effect, refusal)``, in the transaction that records the failure.
FailedHook = Callable[[psycopg.Connection[Any], Effect, Refused], None]


@dataclass(frozen=True)
class Target:
    """Something outside the database an effect can call, and what follows its outcome.

    ``topic``, ``done_event`` and ``failed_event`` name the outcome events the
    worker writes to the outbox (correlated with the request's headers);
    leave them out to write your own from ``on_done`` / ``on_failed``.
    """

    name: str
    call: Call
    resolution: Resolution
    lookup: Call | None = None
    timeout_s: float = 10.0
    #: How long after a call that got no answer the provider is sure to be
    #: done with it (its own request timeout); a lookup waits that long.
    settle_s: float | None = None
    retry: EffectRetry = field(default_factory=EffectRetry)
    topic: str | None = None
    done_event: str | None = None
    failed_event: str | None = None
    on_done: DoneHook | None = None
    on_failed: FailedHook | None = None

    def __post_init__(self) -> None:
        if self.resolution is Resolution.LOOKUP and self.lookup is None:
            raise ValueError(f"target {self.name!r}: resolution by lookup needs a lookup")
        if self.timeout_s <= 0:
            raise ValueError(f"target {self.name!r}: timeout_s must be positive")
        if (self.done_event or self.failed_event) and not self.topic:
            raise ValueError(f"target {self.name!r}: outcome events need a topic")

    @property
    def settle(self) -> float:
        return self.timeout_s if self.settle_s is None else self.settle_s
