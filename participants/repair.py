"""Operators' repairs of orchestrated sagas: retry, abort, resolve.

Each is a transition of the saga like a reply or a deadline: a pure function
of the definition and the state returning the new state and its effects
(:func:`retry`, :func:`abort`), carried out by the orchestrator's own code
in one transaction of its database (:class:`Repairer`): the saga row, its
log (with who did it), the commands in the outbox. :func:`perform`
adds to that transaction an event announcing the repair (through the same
outbox), so the tracker and anyone else following the saga see it.

Where a repair does not apply it is refused with :class:`RepairRefusedError`,
saying why and what does apply.

- ``retry``: a FAILED saga tries its unfinished compensation once more (a
  new request where the last one was refused: its participant must answer it
  within the step's timeout, or the saga is FAILED again); a RUNNING or
  COMPENSATING saga sends the command it waits on again now, with a fresh
  give-up clock (same idempotency key: performed at most once).
- ``abort``: a RUNNING saga starts compensating now, the step under way
  included (its command's outcome is unknown; the compensation seals it).
- ``resolve``: a person put things right by hand; the saga ends RESOLVED,
  the note in its log. Needs no definition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from participants import saga as machine
from participants.handlers import publish
from participants.orchestrator import NOTIFY_CHANNEL, Orchestrator, saga_status

# The machine's own transitions (sending a command or a compensation,
# beginning to compensate), so that a repaired saga goes on exactly as one
# that got there by itself.
from participants.saga import (
    Effect,
    Log,
    Saga,
    SagaState,
    _begin_compensation,
    _send_command,
    _send_compensation,
)
from participants.tracker_config import OrchestratorConfig
from walsaga.errors import PermanentError, from_psycopg

RESOLVED = "RESOLVED"
#: What a saga that a person resolved says it is; the machine knows nothing of it.
ENDED = frozenset({*machine.TERMINAL, RESOLVED})

ACTIONS = ("retry", "abort", "resolve")
#: The event announcing each repair.
EVENT_TYPES = {"retry": "SagaRetried", "abort": "SagaAborted", "resolve": "SagaResolved"}


class RepairRefusedError(PermanentError):
    """The repair does not apply to the saga as it is; the message says why."""


class SagaNotFoundError(PermanentError):
    """No such saga where it was looked for."""


def retry(
    definition: Saga, state: SagaState, now: float, *, by: str, note: str = ""
) -> tuple[SagaState, list[Effect]]:
    """Try the saga's unfinished work again (see the module docstring)."""
    if state.status in ENDED and state.status != machine.FAILED:
        raise RepairRefusedError(
            f"saga {state.id} is {state.status}: there is nothing to retry"
            + ("" if state.status == RESOLVED else " (it ended by itself)")
        )
    if state.step >= len(definition.steps):
        raise RepairRefusedError(f"saga {state.id} has no step in progress to retry")
    step = definition.steps[state.step]
    effects: list[Effect] = [
        Log(
            "RETRIED",
            step.name,
            {"by": by, "note": note, "was": state.status, "reason": state.reason},
        )
    ]
    fresh = dataclasses.replace(state, step_started=None, deadline=None, waiting_on=None)
    if state.status == machine.FAILED:
        if not step.compensable:
            raise RepairRefusedError(
                f"saga {state.id} is FAILED at step {step.name!r}, "
                "which has no compensation to retry"
            )
        fresh = dataclasses.replace(fresh, status=machine.COMPENSATING)
        return _send_compensation(definition, fresh, now, effects), effects
    fresh = dataclasses.replace(fresh, attempt=state.attempt + 1)
    if state.status == machine.COMPENSATING:
        return _send_compensation(definition, fresh, now, effects), effects
    if step.command is None:
        raise RepairRefusedError(
            f"saga {state.id} runs the local step {step.name!r}: nothing waits"
        )
    return _send_command(definition, fresh, now, effects), effects


def abort(
    definition: Saga, state: SagaState, now: float, *, by: str, note: str = ""
) -> tuple[SagaState, list[Effect]]:
    """Start compensating a RUNNING saga now, its current step included."""
    if state.status != machine.RUNNING:
        hint = {
            machine.COMPENSATING: "it is compensating already",
            machine.FAILED: "its compensation could not finish: retry or resolve it",
        }.get(state.status, "it has ended")
        raise RepairRefusedError(f"saga {state.id} is {state.status}: cannot abort ({hint})")
    if state.step >= len(definition.steps):
        raise RepairRefusedError(f"saga {state.id} has no step in progress to abort")
    reason = f"aborted by {by}" + (f": {note}" if note else "")
    effects: list[Effect] = [
        Log("ABORTED", definition.steps[state.step].name, {"by": by, "note": note})
    ]
    return _begin_compensation(
        definition, state, now, effects, reason, include_current=True
    ), effects


def resolved(state: SagaState, *, by: str, note: str) -> tuple[SagaState, Log]:
    """A saga a person put right by hand: RESOLVED, and the log entry saying so."""
    if state.status in ENDED and state.status != machine.FAILED:
        raise RepairRefusedError(
            f"saga {state.id} is {state.status}: it has ended, nothing to resolve"
        )
    if not note.strip():
        raise RepairRefusedError("resolve needs a note: what was done by hand")
    new = dataclasses.replace(
        state, status=RESOLVED, deadline=None, waiting_on=None, reason=f"resolved by {by}: {note}"
    )
    return new, Log(RESOLVED, None, {"by": by, "note": note, "was": state.status})


Transition = Callable[..., tuple[SagaState, list[Effect]]]
_TRANSITIONS: dict[str, Transition] = {"retry": retry, "abort": abort}


@dataclasses.dataclass(frozen=True)
class Repaired:
    """A repair done: the saga before and after."""

    action: str
    before: SagaState
    after: SagaState
    by: str

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "saga_id": self.after.id,
            "by": self.by,
            "before": self.before.status,
            "after": self.after.status,
            "reason": self.after.reason,
        }


def perform(
    conn: psycopg.Connection[Any],
    orchestrator: OrchestratorConfig,
    definitions: dict[str, Saga],
    saga_id: str,
    action: str,
    *,
    by: str,
    note: str = "",
) -> Repaired:
    """Carry out `action` on saga `saga_id` in one transaction of the orchestrator's
    database (`conn`); :class:`RepairRefusedError` or :class:`SagaNotFoundError` change nothing."""
    if action not in ACTIONS:
        raise ValueError(f"unknown repair {action!r}")
    try:
        with conn.transaction():
            if action == "resolve":
                before, after = _resolve(conn, saga_id, by=by, note=note)
            else:
                before, after = _step(conn, orchestrator, definitions, saga_id, action, by, note)
            publish(
                conn,
                orchestrator.operator_events,
                saga_id,
                EVENT_TYPES[action],
                {
                    "saga_id": saga_id,
                    "action": action,
                    "by": by,
                    "note": note,
                    "before": before.status,
                    "after": after.status,
                },
                {"saga_id": saga_id, "saga_type": after.definition, "walsaga.operator": by},
            )
    except psycopg.Error as e:
        raise from_psycopg(e, f"orchestrator {orchestrator.name!r}: {action} {saga_id}") from e
    return Repaired(action, before, after, by)


def _step(
    conn: psycopg.Connection[Any],
    orchestrator: OrchestratorConfig,
    definitions: dict[str, Saga],
    saga_id: str,
    action: str,
    by: str,
    note: str,
) -> tuple[SagaState, SagaState]:
    row = conn.execute("SELECT definition FROM walsaga.saga WHERE id = %s", (saga_id,)).fetchone()
    if row is None:
        raise SagaNotFoundError(f"no saga {saga_id!r} in orchestrator {orchestrator.name!r}")
    if row[0] not in definitions:
        raise RepairRefusedError(
            f"{action} needs the definition of saga type {row[0]!r} to send its commands: "
            f"list it in the definitions of [[orchestrator]] {orchestrator.name!r}"
        )
    runner = Repairer(definitions.values(), name=orchestrator.name)
    done = runner.repair(conn, saga_id, _TRANSITIONS[action], by=by, note=note)
    if done is None:
        raise SagaNotFoundError(f"no saga {saga_id!r} in orchestrator {orchestrator.name!r}")
    return done


class Repairer(Orchestrator):
    """An orchestrator that steps a saga by an operator's transition instead of a reply."""

    def repair(
        self, conn: psycopg.Connection[Any], saga_id: str, transition: Transition, **kwargs: Any
    ) -> tuple[SagaState, SagaState] | None:
        """Step saga `saga_id` with `transition` in the caller's transaction, with the
        writes a reply or a deadline would make; its state before and after (None:
        no such saga)."""
        locked = conn.execute("SELECT 1 FROM walsaga.saga WHERE id = %s FOR UPDATE", (saga_id,))
        if locked.fetchone() is None:
            return None
        state = saga_status(conn, saga_id)
        assert state is not None
        definition = self.definitions[state.definition]
        return state, self._advance(conn, definition, state, transition, **kwargs)


def _resolve(
    conn: psycopg.Connection[Any], saga_id: str, *, by: str, note: str
) -> tuple[SagaState, SagaState]:
    row = conn.execute("SELECT 1 FROM walsaga.saga WHERE id = %s FOR UPDATE", (saga_id,))
    if row.fetchone() is None:
        raise SagaNotFoundError(f"no saga {saga_id!r} here")
    before = saga_status(conn, saga_id)
    assert before is not None
    after, log = resolved(before, by=by, note=note)
    conn.execute(
        """
        UPDATE walsaga.saga SET status = %s, reason = %s, deadline = NULL, waiting_on = NULL,
                                updated_at = now(), ended_at = now()
        WHERE id = %s
        """,
        (after.status, after.reason, saga_id),
    )
    conn.execute(
        "INSERT INTO walsaga.saga_log (saga_id, kind, step, detail) VALUES (%s, %s, %s, %s)",
        (saga_id, log.kind, log.step, Jsonb(log.detail)),
    )
    # Clients waiting for the saga's end hear of it as of any other.
    notice = {"id": saga_id, "definition": after.definition, "status": after.status}
    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, orjson.dumps(notice).decode()))
    return before, after
