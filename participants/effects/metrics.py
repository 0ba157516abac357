"""The effect worker's instruments: calls by target and outcome, their latency,
the queue's depth and the age of its oldest live request."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from walsaga.http import new_registry


@dataclass
class EffectMetrics:
    registry: CollectorRegistry = field(default_factory=new_registry)

    def __post_init__(self) -> None:
        self._gauged: set[tuple[str, str]] = set()
        r = self.registry
        self.calls = Counter(
            "walsaga_effect_calls",
            "Calls and lookups of effect targets, by outcome (done, refused, not_done, "
            "in_doubt, lookup_found, lookup_absent, lookup_failed)",
            ["target", "outcome"],
            registry=r,
        )
        self.seconds = Histogram(
            "walsaga_effect_call_seconds",
            "Time one call or lookup of a target took",
            ["target"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.ended = Counter(
            "walsaga_effects_ended",
            "Effects that reached an end: DONE, REFUSED (business), FAILED (gave up)",
            ["target", "status"],
            registry=r,
        )
        self.queued = Gauge(
            "walsaga_effects_queued",
            "Live effect requests in the database, by target and status (PENDING, SENT, IN_DOUBT)",
            ["target", "status"],
            registry=r,
        )
        self.oldest = Gauge(
            "walsaga_effect_oldest_pending_seconds",
            "Age of the oldest live effect request, by target",
            ["target"],
            registry=r,
        )

    def refresh(self, rows: Iterable[tuple[str, str, int, float]], targets: Iterable[str]) -> None:
        """The queue gauges from (target, status, count, oldest age) rows; a
        status no longer seen drops to 0."""
        seen: set[tuple[str, str]] = set()
        oldest: dict[str, float] = {}
        for target, status, count, age in rows:
            self.queued.labels(target, status).set(count)
            seen.add((target, status))
            oldest[target] = max(oldest.get(target, 0.0), age)
        for target, status in self._gauged - seen:
            self.queued.labels(target, status).set(0)
        self._gauged |= seen
        for name in targets:
            self.oldest.labels(name).set(oldest.get(name, 0.0))
