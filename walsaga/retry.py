"""The one backoff policy every walsaga loop uses: exponential, capped, with jitter.

Loops that retry (a relay session, a participant's batch or connection, a
listener that reconnects) keep a :class:`Backoff` and ask it how long to wait
before the next attempt; after a success they :meth:`~Backoff.reset` it.
Jitter is "equal jitter": each wait lies between half of the exponential step
and the whole of it, so many processes that failed together (a database
restart) come back spread out, yet none retries much sooner than the policy
says. Pure apart from the random source, which tests may replace.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackoffPolicy:
    """How waits grow: ``min_s * multiplier**n``, capped at ``max_s``, with jitter."""

    min_s: float = 0.2
    max_s: float = 10.0
    multiplier: float = 2.0
    #: Fraction of each step drawn at random (0: none, 0.5: equal jitter).
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.min_s <= self.max_s:
            raise ValueError("need 0 < min_s <= max_s")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter is a fraction between 0 and 1")

    def step(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (1-based), before jitter."""
        exponent = max(0, failures - 1)
        # min() before the power would overflow for long outages.
        if exponent > 64:
            return self.max_s
        return float(min(self.max_s, self.min_s * self.multiplier**exponent))

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """The wait after `failures` consecutive failures, with jitter."""
        step = self.step(failures)
        if not self.jitter:
            return step
        draw = (rng or random).random()
        return step * (1 - self.jitter) + step * self.jitter * draw

    def backoff(self, rng: random.Random | None = None) -> Backoff:
        return Backoff(self, rng)


@dataclass
class Backoff:
    """The state of one retry loop: how many failures in a row so far."""

    policy: BackoffPolicy
    rng: random.Random | None = None
    failures: int = field(default=0)

    def next_delay(self) -> float:
        """Count a failure; return how long to wait before trying again."""
        self.failures += 1
        return self.policy.delay(self.failures, self.rng)

    def reset(self) -> None:
        """A success: the next failure starts from the shortest wait again."""
        self.failures = 0
