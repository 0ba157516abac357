"""What an effect worker does with the outcome of a call or a lookup. Pure: no I/O.

One decision per outcome, from what came back, how long ago the effect was
requested and how its target resolves unknown outcomes:

- done → ``DONE``; a business refusal → ``REFUSED`` (a failure event, no retry);
- certainly not done → tried again after a backoff, or ``FAILED`` once the
  retry policy's ``give_up_after_s`` has passed (the outcome is known: nothing
  happened at the provider, so the failure event may start compensation);
- in doubt → ``IN_DOUBT``, resolved before any new attempt: by calling again
  (the provider deduplicates by the key), by the lookup (after ``settle_s``
  when the provider gave no answer), by resending (at least once) or by
  failing (at most once). An effect in doubt never fails merely because time
  ran out while a way to resolve it exists: a failure event would start a
  compensation that does not know what to undo.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from participants.effects.model import (
    DONE,
    FAILED,
    IN_DOUBT,
    PENDING,
    REFUSED,
    CallResult,
    Done,
    InDoubt,
    NotDone,
    Refused,
    Resolution,
    Target,
)


@dataclass(frozen=True)
class Decision:
    """The effect's next status, and when it is due again (live statuses only)."""

    status: str
    #: The ``outcome`` label of the calls metric.
    outcome: str
    delay_s: float = 0.0
    result: object = None
    reason: str | None = None
    code: str | None = None
    #: The latest attempt's error, kept on the row for operators.
    error: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in (DONE, REFUSED, FAILED)


#: A lookup found nothing: call now (its own decision follows the call).
CALL_NOW = Decision(PENDING, "lookup_absent")


def after_call(
    result: CallResult,
    target: Target,
    *,
    attempts: int,
    age_s: float,
    was_in_doubt: bool = False,
    rng: random.Random | None = None,
) -> Decision:
    """The decision after attempt number `attempts` of an effect requested `age_s` ago
    (`was_in_doubt`: an earlier attempt's outcome was still unknown)."""
    if isinstance(result, Done):
        return Decision(DONE, "done", result=result.result)
    if isinstance(result, Refused):
        return Decision(REFUSED, "refused", reason=result.reason, code=result.code)
    delay = target.retry.backoff.delay(attempts, rng)
    if isinstance(result, NotDone):
        if result.retry_after_s is not None:
            delay = max(delay, result.retry_after_s)
        if was_in_doubt and target.resolution is Resolution.KEY and not result.answered:
            # Nothing reached the provider this time; the earlier attempt is
            # still unknown, and only the provider's answer can settle it.
            return Decision(IN_DOUBT, "not_done", delay_s=delay, error=result.error)
        if age_s + delay > target.retry.give_up_after_s:
            return _gave_up(attempts, age_s, result.error, "not_done")
        return Decision(PENDING, "not_done", delay_s=delay, error=result.error)
    assert isinstance(result, InDoubt)
    if target.resolution is Resolution.FAIL:
        reason = f"outcome unknown after attempt {attempts} (not sent again): {result.error}"
        return Decision(FAILED, "in_doubt", reason=reason, code="UNKNOWN", error=result.error)
    if target.resolution is Resolution.RESEND and age_s + delay > target.retry.give_up_after_s:
        return _gave_up(attempts, age_s, f"outcome unknown: {result.error}", "in_doubt")
    if target.resolution is Resolution.LOOKUP and not result.answered:
        delay = max(delay, target.settle)
    return Decision(IN_DOUBT, "in_doubt", delay_s=delay, error=result.error)


def after_lookup(
    result: CallResult,
    target: Target,
    *,
    attempts: int,
    age_s: float,
    rng: random.Random | None = None,
) -> Decision:
    """The decision after looking up an effect in doubt: found, absent, or still unknown."""
    if isinstance(result, Done):
        return Decision(DONE, "lookup_found", result=result.result)
    if isinstance(result, NotDone):
        if age_s > target.retry.give_up_after_s:
            # Now known not to have happened: the failure is safe to announce.
            return _gave_up(attempts, age_s, "the provider has no trace of it", "lookup_absent")
        return CALL_NOW
    if isinstance(result, Refused):  # a lookup that refuses: it cannot tell
        result = InDoubt(f"lookup refused: {result.reason}", answered=True)
    assert isinstance(result, InDoubt)
    delay = target.retry.backoff.delay(max(1, attempts), rng)
    return Decision(IN_DOUBT, "lookup_failed", delay_s=delay, error=f"lookup: {result.error}")


def on_takeover(target: Target) -> Decision | None:
    """An attempt was sent by a worker that died before recording its outcome.

    None: resolve it the target's way (lookup, or call again). A target that
    fails unknown outcomes fails it here.
    """
    if target.resolution is Resolution.FAIL:
        reason = "outcome unknown: the worker stopped after sending (not sent again)"
        return Decision(FAILED, "in_doubt", reason=reason, code="UNKNOWN")
    return None


def _gave_up(attempts: int, age_s: float, error: str, outcome: str) -> Decision:
    noun = "attempt" if attempts == 1 else "attempts"
    reason = f"gave up after {attempts} {noun} over {age_s:.0f}s: {error}"
    return Decision(FAILED, outcome, reason=reason, code="GAVE_UP", error=error)
