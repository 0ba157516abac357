"""What the runtime does with a record whose handler failed. Pure: no I/O.

One decision per failed record, from the error and how often the record has
failed already:

- a business refusal (:class:`~walsaga.errors.BusinessError`, or a SQLSTATE of
  class ``WS`` or one the participant lists) becomes a failure event;
- a transient error (lost connection, serialization failure, deadlock, a
  :class:`~walsaga.errors.TransientError`) rolls the batch back to be retried
  after a backoff, however often: it is never dead-lettered;
- a record that cannot be handled at all (not JSON, a field missing, any
  other permanent error) goes to the dead-letter topic;
- anything else is retried, and dead-lettered once it has failed
  ``max_attempts`` times.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import psycopg

from walsaga.errors import (
    BusinessError,
    ErrorKind,
    PermanentError,
    TransientError,
    classify,
    classify_sqlstate,
)


class Outcome(StrEnum):
    """What became of a record (also the ``outcome`` label of the handled metric)."""

    HANDLED = "handled"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    BUSINESS_FAILURE = "business_failure"
    DEAD_LETTER = "dead_letter"
    RETRY = "retry"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str
    #: The failure code of a business failure (the SQLSTATE, or BusinessError.code).
    code: str = ""


def classify_failure(
    error: BaseException,
    *,
    attempts: int,
    max_attempts: int,
    business_sqlstates: frozenset[str] = frozenset(),
) -> Verdict:
    """The verdict on a record whose handler raised `error`, on its `attempts`-th failure."""
    if isinstance(error, BusinessError):
        return Verdict(Outcome.BUSINESS_FAILURE, error.reason, error.code)
    if isinstance(error, TransientError):
        return Verdict(Outcome.RETRY, f"{type(error).__name__}: {error}")
    if isinstance(error, PermanentError):
        return Verdict(Outcome.DEAD_LETTER, str(error))
    if isinstance(error, psycopg.Error):
        sqlstate = error.sqlstate or ""
        # The one classifier: by SQLSTATE when there is one (with the
        # participant's own business codes), else by what libpq said.
        kind = (
            classify_sqlstate(sqlstate, business=business_sqlstates)
            if sqlstate
            else classify(error)
        )
        if kind is ErrorKind.BUSINESS:
            reason = error.diag.message_primary or str(error)
            return Verdict(Outcome.BUSINESS_FAILURE, reason, sqlstate)
        if kind is ErrorKind.TRANSIENT:
            return Verdict(Outcome.RETRY, f"{type(error).__name__}: {error}")
    reason = f"{type(error).__name__}: {error}"
    if attempts >= max_attempts:
        return Verdict(Outcome.DEAD_LETTER, f"failed {attempts} times: {reason}")
    return Verdict(Outcome.RETRY, reason)
