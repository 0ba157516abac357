"""Orchestrator databases as operations read them: the sagas that changed (the tracker
mirrors them), and one saga's state and log (``walsaga sagas show``, the console).

Read-only. Changed sagas are read by ``updated_at`` with a few seconds of
overlap: ``updated_at`` is the writing transaction's start, so a transaction
that commits late can carry a time just before the last one read; reading
the overlap again is harmless, the tracker skips rows it already has.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from participants.orchestrator import saga_status
from participants.saga import Saga, SagaState
from participants.timeline import LogEntry
from participants.tracker_config import OrchestratorConfig
from participants.tracker_store import Cursor, OrchestratedRow
from walsaga.errors import from_psycopg

#: How far before the last change read the next read starts again.
OVERLAP = timedelta(seconds=5)
#: Rows read per page.
PAGE = 2000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def step_name(definition: Saga | None, index: int, status: str) -> str | None:
    """The name of step `index` of a saga, when its definition is known."""
    if status in ("COMPLETED", "COMPENSATED") and (
        definition is None or index >= len(definition.steps)
    ):
        return None
    if definition is not None and 0 <= index < len(definition.steps):
        return definition.steps[index].name
    return f"#{index}"


def changed_sagas(
    conn: psycopg.Connection[Any],
    after: tuple[datetime, str],
    definitions: dict[str, Saga],
    *,
    limit: int = PAGE,
) -> list[OrchestratedRow]:
    """Sagas of an orchestrator changed after `after` (updated_at, id), oldest first."""
    rows = conn.execute(
        """
        SELECT id, definition, status, reason, step, waiting_on, created_at, updated_at, ended_at
        FROM walsaga.saga WHERE (updated_at, id) > (%s, %s)
        ORDER BY updated_at, id LIMIT %s
        """,
        (after[0], after[1], limit),
    ).fetchall()
    return [
        OrchestratedRow(
            id=saga_id,
            definition=definition,
            status=status,
            reason=reason,
            step=step_name(definitions.get(definition), step, status),
            waiting_on=waiting_on,
            created_at=created_at,
            updated_at=updated_at,
            ended_at=ended_at,
        )
        for saga_id, definition, status, reason, step, waiting_on, created_at, updated_at, ended_at
        in rows
    ]  # fmt: skip


def read_from(cursor: Cursor | None) -> tuple[datetime, str]:
    """Where a read of changes starts, given where the last one ended: a little
    before it when that read had caught up, right after it otherwise."""
    if cursor is None:
        return (_EPOCH, "")
    if cursor.caught_up:
        return (cursor.updated_at - OVERLAP, "")
    return (cursor.updated_at, cursor.id)


@dataclass(frozen=True)
class OrchestratedSaga:
    """One saga in its orchestrator's database: its row and its log."""

    orchestrator: OrchestratorConfig
    state: SagaState
    log: list[LogEntry]
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        s = self.state
        return {
            "orchestrator": self.orchestrator.name,
            "definition": s.definition,
            "version": s.version,
            "status": s.status,
            "step": s.step,
            "completed": s.completed,
            "attempt": s.attempt,
            "refusals": s.refusals,
            "reason": s.reason,
            "waiting_on": s.waiting_on,
            "deadline": _iso(s.deadline),
            "data": s.data,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "log": [
                {"seq": e.seq, "at": e.at.isoformat(), "kind": e.kind, "step": e.step,
                 "detail": dict(e.detail)}
                for e in self.log
            ],
        }  # fmt: skip


def _iso(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch, UTC).isoformat() if epoch is not None else None


def read_saga(orchestrator: OrchestratorConfig, saga_id: str) -> OrchestratedSaga | None:
    """Saga `saga_id` in `orchestrator`'s database, with its whole log; None if not there."""
    try:
        with psycopg.connect(orchestrator.dsn, autocommit=True, connect_timeout=10) as conn:
            state = saga_status(conn, saga_id)
            if state is None:
                return None
            times = conn.execute(
                "SELECT created_at, updated_at, ended_at FROM walsaga.saga WHERE id = %s",
                (saga_id,),
            ).fetchone()
            log = [
                LogEntry(seq, at, kind, step, detail)
                for seq, at, kind, step, detail in conn.execute(
                    "SELECT seq, at, kind, step, detail FROM walsaga.saga_log "
                    "WHERE saga_id = %s ORDER BY seq",
                    (saga_id,),
                )
            ]
    except psycopg.Error as e:
        raise from_psycopg(e, f"orchestrator {orchestrator.name!r}") from e
    assert times is not None
    return OrchestratedSaga(orchestrator, state, log, *times)


def holds(orchestrator: OrchestratorConfig, saga_id: str) -> bool:
    """Whether `orchestrator`'s database has saga `saga_id`."""
    try:
        with psycopg.connect(orchestrator.dsn, autocommit=True, connect_timeout=10) as conn:
            found = conn.execute("SELECT 1 FROM walsaga.saga WHERE id = %s", (saga_id,))
            return found.fetchone() is not None
    except psycopg.Error as e:
        raise from_psycopg(e, f"orchestrator {orchestrator.name!r}") from e


def find_saga(
    orchestrators: list[OrchestratorConfig], saga_id: str, *, named: str | None = None
) -> OrchestratedSaga | None:
    """Saga `saga_id` in the orchestrator `named`, or in the first one that has it."""
    for orchestrator in orchestrators:
        if named is not None and orchestrator.name != named:
            continue
        found = read_saga(orchestrator, saga_id)
        if found is not None:
            return found
    return None
