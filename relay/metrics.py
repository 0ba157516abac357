"""The relay's Prometheus instruments, labelled by source, and its latency window.

Served with the health report by :func:`walsaga.http.serve_http`.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from walsaga.http import LATENCY_BUCKETS, new_registry


class RelayMetrics:
    """The relay's instruments, labelled by source."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        r = self.registry
        self.events = Counter(
            "walsaga_relay_events_published", "Events acknowledged by Kafka", ["source"], registry=r
        )
        self.bytes = Counter(
            "walsaga_relay_bytes_published",
            "Key and value bytes of acknowledged events",
            ["source"],
            registry=r,
        )
        self.errors = Counter(
            "walsaga_relay_errors", "Errors, by kind", ["source", "kind"], registry=r
        )
        self.in_flight = Gauge(
            "walsaga_relay_in_flight", "Events sent to Kafka and not yet acknowledged",
            ["source"], registry=r,
        )  # fmt: skip
        self.slot_lag = Gauge(
            "walsaga_relay_slot_lag_bytes",
            "WAL retained for the slot: server WAL end minus confirmed position",
            ["source"],
            registry=r,
        )
        self.confirmed = Gauge(
            "walsaga_relay_confirmed_lsn", "Position confirmed to the slot", ["source"], registry=r
        )
        self.streaming = Gauge(
            "walsaga_relay_streaming", "1 while this instance streams the source", ["source"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "walsaga_relay_commit_to_ack_seconds",
            "From the Postgres commit to Kafka's acknowledgement, of the first event of each "
            "group of events acknowledged together",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.restarts = Counter(
            "walsaga_relay_stream_restarts", "Streaming sessions restarted after an error",
            ["source"], registry=r,
        )  # fmt: skip
        self.refused = Counter(
            "walsaga_relay_events_refused",
            "Events Kafka refused for good, by reason and what was done (dead-lettered, halted)",
            ["source", "reason", "action"],
            registry=r,
        )
        self.halted = Gauge(
            "walsaga_relay_halted",
            "1 while the source is stopped at an event Kafka refuses (or a blocked topic)",
            ["source"],
            registry=r,
        )


class LatencyWindow:
    """The most recent latencies of one kind, for exact percentiles in /healthz."""

    def __init__(self, size: int = 20000) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, seconds: float, count: int = 1) -> None:
        for _ in range(min(count, 64)):
            self._samples.append(seconds)

    def percentiles(self, *qs: float) -> list[float | None]:
        samples = sorted(self._samples)
        if not samples:
            return [None for _ in qs]
        return [samples[min(len(samples) - 1, int(q * len(samples)))] for q in qs]


class SourceMetrics:
    """The instruments of one source, bound to its label once."""

    def __init__(self, metrics: RelayMetrics, source: str) -> None:
        self.source = source
        self.events = metrics.events.labels(source)
        self.bytes = metrics.bytes.labels(source)
        self.in_flight = metrics.in_flight.labels(source)
        self.slot_lag = metrics.slot_lag.labels(source)
        self.confirmed = metrics.confirmed.labels(source)
        self.streaming = metrics.streaming.labels(source)
        self.latency = metrics.latency.labels(source)
        self.restarts = metrics.restarts.labels(source)
        self.halted = metrics.halted.labels(source)
        self._errors = metrics.errors
        self._refused = metrics.refused

    def error(self, kind: str) -> None:
        self._errors.labels(self.source, kind).inc()

    def refused(self, reason: str, action: str) -> None:
        self._refused.labels(self.source, reason, action).inc()


class HopStages:
    """Where an event's time goes between its commit and Kafka's acknowledgement,
    measured on the first event of each group: the walsender decoding and sending
    it, the relay reading it, producing and the broker acknowledging it."""

    STAGES = ("commit_to_sent", "sent_to_read", "read_to_ack", "commit_to_ack")

    def __init__(self) -> None:
        self.windows = {stage: LatencyWindow(5000) for stage in self.STAGES}

    def add(self, commit: float, sent: float, read: float, acked: float) -> None:
        windows = self.windows
        windows["commit_to_sent"].add(sent - commit)
        windows["sent_to_read"].add(read - sent)
        windows["read_to_ack"].add(acked - read)
        windows["commit_to_ack"].add(acked - commit)

    def report(self) -> dict[str, dict[str, float | None]]:
        """p50 and p99 of each stage, in milliseconds."""
        found = {}
        for stage, window in self.windows.items():
            p50, p99 = window.percentiles(0.5, 0.99)
            found[stage] = {
                "p50": None if p50 is None else round(p50 * 1000, 3),
                "p99": None if p99 is None else round(p99 * 1000, 3),
            }
        return found
