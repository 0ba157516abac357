"""Sagas as operators see them: what ``walsaga sagas`` and the console show and do.

Both read the tracker's database (every saga, its timeline) and, for an
orchestrated saga, its orchestrator's (state, log), and merge the two
(:func:`participants.timeline.timeline`). Repairs go to the orchestrator's
database (:mod:`participants.repair`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from participants import orchestrated, repair, timeline, tracker_store
from participants.orchestrated import OrchestratedSaga
from participants.repair import Repaired, RepairRefusedError, SagaNotFoundError
from participants.saga import Saga
from participants.timeline import Entry, Line
from participants.tracker_config import OrchestratorConfig, TrackerConfig
from participants.tracker_store import SagaFilter, SagaSummary
from walsaga.errors import ConfigError, SetupError, WalsagaError, from_psycopg


def when(at: datetime | None) -> str:
    """A time for people: UTC, to the second."""
    if at is None:
        return "-"
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def took(seconds: float) -> str:
    """A duration for people: 0.42s, 3m07s, 2h05m."""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 3600:
        minutes, rest = divmod(int(seconds), 60)
        return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"
    hours, rest = divmod(int(seconds) // 60, 60)
    return f"{hours}h{rest:02d}m"


Connect = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]


@dataclass(frozen=True)
class SagaView:
    """Everything known of one saga."""

    id: str
    summary: SagaSummary | None
    entries: list[Entry]
    orchestrated: OrchestratedSaga | None
    lines: list[Line]
    lanes: list[str]

    @property
    def saga_type(self) -> str | None:
        if self.orchestrated is not None:
            return self.orchestrated.state.definition
        return self.summary.saga_type if self.summary else None

    @property
    def status(self) -> str:
        """The saga's status; its orchestrator's word, when it has one, goes first."""
        if self.orchestrated is not None:
            status = self.orchestrated.state.status
            stuck = self.summary is not None and self.summary.stuck
            return "STUCK" if stuck and status in ("RUNNING", "COMPENSATING") else status
        return self.summary.shown_status if self.summary else "UNKNOWN"

    @property
    def reason(self) -> str | None:
        if self.orchestrated is not None:
            return self.orchestrated.state.reason
        return self.summary.reason if self.summary else None

    @property
    def trace_id(self) -> str | None:
        if self.summary is not None and self.summary.trace_id:
            return self.summary.trace_id
        for entry in self.entries:
            if entry.trace_id:
                return entry.trace_id
        if self.orchestrated is not None:
            return timeline.trace_id({"traceparent": _traceparent(self.orchestrated)})
        return None

    @property
    def repairable(self) -> bool:
        return self.orchestrated is not None

    def actions(self) -> list[str]:
        """The repairs that apply to the saga as it is."""
        if self.orchestrated is None:
            return []
        status = self.orchestrated.state.status
        if status == "FAILED":
            return ["retry", "resolve"]
        if status == "RUNNING":
            return ["retry", "abort", "resolve"]
        if status == "COMPENSATING":
            return ["retry", "resolve"]
        return []

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.saga_type,
            "status": self.status,
            "reason": self.reason,
            "trace_id": self.trace_id,
            "summary": self.summary.to_json() if self.summary else None,
            "orchestrated": self.orchestrated.to_json() if self.orchestrated else None,
            "lanes": self.lanes,
            "timeline": [line_json(line) for line in self.lines],
        }


def _traceparent(saga: OrchestratedSaga) -> str:
    return str(getattr(saga.state, "traceparent", None) or "")


def line_json(line: Line) -> dict[str, Any]:
    found: dict[str, Any] = {
        "at": line.at.isoformat(),
        "title": line.title,
        "from": line.lane,
        "to": line.target,
        "step": line.step,
        "compensation": line.compensation,
        "outcome": line.outcome,
        "note": line.note,
    }
    if line.entry is not None:
        e = line.entry
        found["record"] = {
            "event_id": e.event_id,
            "type": e.type,
            "kind": e.kind,
            "source": e.source,
            "topic": e.topic,
            "partition": e.partition,
            "offset": e.offset,
            "key": e.key,
            "lsn": e.lsn,
            "headers": dict(e.headers),
            "payload": e.payload,
        }
    if line.log is not None:
        found["log"] = {"seq": line.log.seq, "kind": line.log.kind, "detail": dict(line.log.detail)}
    return found


@dataclass
class Operations:
    """The operators' view of the sagas of one ``tracker.toml``."""

    config: TrackerConfig
    connect: Connect
    _definitions: dict[str, dict[str, Saga]] = field(default_factory=dict)

    @classmethod
    def direct(cls, config: TrackerConfig) -> Operations:
        """Operations opening a connection to the tracker's database per call."""
        dsn = config.tracker.dsn

        def connect() -> psycopg.Connection[Any]:
            return psycopg.connect(dsn, autocommit=True, connect_timeout=10)

        return cls(config, connect)

    # -- reading -----------------------------------------------------------------

    def list_sagas(self, f: SagaFilter) -> tuple[list[SagaSummary], dict[str, int]]:
        try:
            with self.connect() as conn:
                tracker_store.check_schema(conn)
                return tracker_store.list_sagas(conn, f), tracker_store.counts(conn, f)
        except psycopg.Error as e:
            raise from_psycopg(e, "tracker database") from e

    def saga_types(self) -> list[str]:
        try:
            with self.connect() as conn:
                return tracker_store.saga_types(conn)
        except psycopg.Error as e:
            raise from_psycopg(e, "tracker database") from e

    def show(self, saga_id: str) -> SagaView | None:
        """The saga `saga_id` from the tracker and its orchestrator; None if neither has it."""
        summary, entries, untracked = None, [], None
        try:
            with self.connect() as conn:
                tracker_store.check_schema(conn)
                summary = tracker_store.summary(conn, saga_id)
                entries = tracker_store.entries(conn, saga_id)
        except SetupError as e:
            untracked = e  # no tracker yet: what the orchestrators know still helps
        except psycopg.Error as e:
            raise from_psycopg(e, "tracker database") from e
        found = self._orchestrated(saga_id, summary)
        if summary is None and found is None and not entries:
            if untracked is not None:
                raise untracked
            return None
        lane = found.orchestrator.lane if found is not None else None
        lines = timeline.timeline(entries, found.log if found else (), orchestrator_lane=lane)
        lanes = timeline.lanes_of(entries, lane)
        return SagaView(saga_id, summary, entries, found, lines, lanes)

    def _orchestrated(self, saga_id: str, summary: SagaSummary | None) -> OrchestratedSaga | None:
        if summary is not None and summary.orchestrator is not None:
            try:
                owner = self.config.orchestrator_named(summary.orchestrator)
            except ConfigError:
                return None  # tracked by an orchestrator no longer configured here
            return orchestrated.read_saga(owner, saga_id)
        # A choreography, a saga the tracker has not mirrored yet, or one it
        # never heard of: any orchestrator may own it.
        return orchestrated.find_saga(self.config.orchestrator, saga_id)

    # -- repairing ---------------------------------------------------------------

    def definitions(self, orchestrator: OrchestratorConfig) -> dict[str, Saga]:
        if orchestrator.name not in self._definitions:
            self._definitions[orchestrator.name] = orchestrator.load_definitions()
        return self._definitions[orchestrator.name]

    def owner(self, saga_id: str, named: str | None = None) -> OrchestratorConfig:
        """The orchestrator holding saga `saga_id` (`named`, or the first that has it)."""
        if named is not None:
            return self.config.orchestrator_named(named)
        if not self.config.orchestrator:
            raise RepairRefusedError(
                "no [[orchestrator]] in the configuration: repairs act on orchestrated sagas, "
                "in their orchestrator's database"
            )
        for orchestrator in self.config.orchestrator:
            if orchestrated.holds(orchestrator, saga_id):
                return orchestrator
        if self._tracked(saga_id):
            raise RepairRefusedError(
                f"saga {saga_id} is not in any orchestrator's database (a choreography: its "
                "services own its state; put it right in them)"
            )
        raise SagaNotFoundError(f"no saga {saga_id!r} in any orchestrator's database")

    def _tracked(self, saga_id: str) -> bool:
        """Whether the tracker knows saga `saga_id` (False when it cannot say)."""
        try:
            with self.connect() as conn:
                tracker_store.check_schema(conn)
                return tracker_store.summary(conn, saga_id) is not None
        except (psycopg.Error, WalsagaError):
            return False

    def repair(
        self, saga_id: str, action: str, *, by: str, note: str = "", orchestrator: str | None = None
    ) -> Repaired:
        owner = self.owner(saga_id, orchestrator)
        definitions = self.definitions(owner) if action != "resolve" else {}
        try:
            with psycopg.connect(owner.dsn, connect_timeout=10) as conn:
                return repair.perform(conn, owner, definitions, saga_id, action, by=by, note=note)
        except psycopg.Error as e:
            raise from_psycopg(e, f"orchestrator {owner.name!r}") from e
