"""The orchestrator: saga state in its own database, advanced by replies and deadlines.

Every change happens in one transaction of the orchestrator's database: the
saga row (read ``FOR UPDATE``), its log entries, the commands written to the
outbox, and the inbox row of the reply that caused it. No state is kept in
memory between messages, so any number of orchestrator instances can run;
deadlines are stored with the saga and fired by whichever instance claims
them first (``FOR UPDATE SKIP LOCKED``). Ended sagas are announced with
``NOTIFY walsaga_saga`` (payload: id, definition, status) for waiting clients.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import structlog
from prometheus_client import Counter
from psycopg.types.json import Jsonb

from participants import commit
from participants import saga as machine
from participants.availability import Availability
from participants.handlers import HandlerContext, Route
from participants.message import Message
from participants.runtime import Participant, set_trace
from participants.saga import Effect, Log, Reply, RunLocal, Saga, SagaState, SendCommand
from walsaga import tracing
from walsaga.errors import BusinessError, SetupError
from walsaga.tracing import TraceContext

log = structlog.get_logger("walsaga.orchestrator")

NOTIFY_CHANNEL = "walsaga_saga"

_LOG_INSERT = "INSERT INTO walsaga.saga_log (saga_id, kind, step, detail) VALUES (%s, %s, %s, %s)"
# Several entries travel as one JSON array of [saga_id, kind, step, detail]:
# one string to send instead of four arrays, whose adaptation took the order
# service about a tenth of its CPU (bench/saga_bench.py, profiled).
_LOG_INSERT_MANY = (
    "INSERT INTO walsaga.saga_log (saga_id, kind, step, detail) "
    "SELECT e ->> 0, e ->> 1, e ->> 2, e -> 3 "
    "FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS entries (e, n) ORDER BY n"
)


class _Writes:
    """Statements of one saga transition, sent together in a pipeline."""

    def __init__(self) -> None:
        self.logs: list[tuple[str, str, str | None, Any]] = []  # detail: JSON-able
        self.commands: list[tuple[Any, ...]] = []
        self.statements: list[tuple[str, tuple[Any, ...]]] = []

    def flush(self, conn: psycopg.Connection[Any]) -> None:
        with conn.pipeline(), conn.cursor() as cur:
            if len(self.logs) == 1:
                saga_id, kind, step, detail = self.logs[0]
                cur.execute(_LOG_INSERT, (saga_id, kind, step, Jsonb(detail)))
            elif self.logs:  # one statement, however many entries
                cur.execute(_LOG_INSERT_MANY, (json.dumps(self.logs),))
            if self.commands:
                cur.executemany(_PUBLISH, self.commands)
            for statement, params in self.statements:
                cur.execute(statement, params)


_PUBLISH = "SELECT walsaga.publish(%s, %s, %s, %s, %s)"

_COLUMNS = (
    "id, definition, version, status, step, completed, attempt, data, deadline, reason, refusals, "
    "step_started_at, waiting_on, traceparent, tracestate"
)
_VALUES = ", ".join(["%s"] * 15)


def _epoch(ts: datetime | None) -> float | None:
    return ts.timestamp() if ts is not None else None


def _ts(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch is not None else None


def _state(row: tuple[Any, ...]) -> SagaState:
    return SagaState(
        id=row[0],
        definition=row[1],
        version=row[2],
        status=row[3],
        step=row[4],
        completed=row[5],
        attempt=row[6],
        data=row[7],
        deadline=_epoch(row[8]),
        reason=row[9],
        refusals=row[10],
        step_started=_epoch(row[11]),
        waiting_on=row[12],
        traceparent=row[13],
        tracestate=row[14],
    )


class Orchestrator:
    """Runs the sagas of some definitions; replies arrive through a :class:`Participant`."""

    def __init__(
        self,
        definitions: Iterable[Saga],
        *,
        name: str = "orchestrator",
        down_after_waiting: int = 5,
        down_after_silence_s: float = 15.0,
    ) -> None:
        self.definitions = {d.name: d for d in definitions}
        self.name = name
        #: A participant is known down once this many sagas have waited on it
        #: longer than `down_after_silence_s`, with no answer from it in that time.
        self.down_after_waiting = down_after_waiting
        self.down_after_silence_s = down_after_silence_s
        self.availability = Availability(
            min_waiting=down_after_waiting, silence_s=down_after_silence_s
        )
        self._m_ended: Any = None
        self._m_started: Any = None
        self._m_resent: Any = None

    # -- wiring --------------------------------------------------------------

    def attach(self, participant: Participant, *, deadline_interval_s: float = 0.1) -> None:
        """Handle this orchestrator's replies and deadlines in `participant`'s loop."""
        registry = participant.metrics.registry
        self._m_started = Counter(
            "walsaga_sagas_started", "Sagas started", ["definition"], registry=registry
        )
        self._m_ended = Counter(
            "walsaga_sagas_ended",
            "Sagas that reached a terminal status (FAILED needs a human)",
            ["definition", "status"],
            registry=registry,
        )
        self._m_resent = Counter(
            "walsaga_saga_commands_resent",
            "Commands sent again because no answer had come, by participant",
            ["participant"],
            registry=registry,
        )
        self.availability = Availability(
            min_waiting=self.down_after_waiting,
            silence_s=self.down_after_silence_s,
            registry=registry,
        )
        topics = sorted({t for d in self.definitions.values() for t in d.reply_topics})
        for topic in topics:
            participant.add_route(
                Route(topic, None, self._on_reply, failure_event=False, savepoint=False)
            )
        participant.every(deadline_interval_s, self.fire_deadlines, name="saga deadlines")
        participant.every(self.availability.refresh_s, self.watch, name="saga waiting metrics")

    # -- starting ------------------------------------------------------------

    def start(
        self,
        conn: psycopg.Connection[Any],
        definition: str | Saga,
        saga_id: str,
        data: dict[str, Any],
        *,
        trace: TraceContext | None = None,
    ) -> SagaState:
        """Start a saga in the caller's transaction (commit it together with the
        business change that needs the saga).

        `trace` is the caller's trace context (from its request, say): the
        transaction should carry it too (``participants.runtime.set_trace``),
        so the commands written now carry it; resends continue it.
        """
        defn = self._definition(definition if isinstance(definition, str) else definition.name)
        now = time.time()
        state, effects = machine.start(defn, saga_id, data, now)
        if trace is not None:
            state = dataclasses.replace(
                state, traceparent=trace.traceparent, tracestate=trace.state
            )
        state, writes = self._apply(conn, defn, state, effects, now)
        writes.statements.append((f"INSERT INTO walsaga.saga ({_COLUMNS}) VALUES ({_VALUES})",
                                  self._row(state)))  # fmt: skip
        self._after(conn, writes, state, None, in_runtime=False)
        writes.flush(conn)
        # Counted when written: start() runs in the caller's transaction,
        # whose commit the orchestrator does not see.
        if self._m_started is not None:
            self._m_started.labels(defn.name).inc()
        return state

    # -- advancing -----------------------------------------------------------

    def _on_reply(self, ctx: HandlerContext, message: Message) -> None:
        saga_id = message.saga_id
        if not saga_id or message.headers.get("saga_type") not in (None, *self.definitions):
            return
        row = ctx.conn.execute(
            f"SELECT {_COLUMNS} FROM walsaga.saga WHERE id = %s FOR UPDATE", (saga_id,)
        ).fetchone()
        if row is None:
            return  # not one of ours (or a reply to a command that was never ours)
        state = _state(row)
        defn = self.definitions.get(state.definition)
        if defn is None:
            return
        payload = message.payload if isinstance(message.payload, dict) else {}
        reply = Reply(message.type or "", payload, message.headers, message.id)
        if ctx.trace is not None:  # the reply's hop is the saga's latest
            state = dataclasses.replace(
                state, traceparent=ctx.trace.traceparent, tracestate=ctx.trace.state
            )
        new = self._advance(ctx.conn, defn, state, machine.on_reply, reply, cause=message.id)
        if state.waiting_on is not None and new != state:
            self.availability.answered(ctx.conn, state.waiting_on)

    def fire_deadlines(self, conn: psycopg.Connection[Any], limit: int = 200) -> int:
        """Time out sagas whose deadline passed; returns how many. Safe to run
        from many instances at once."""
        rows = conn.execute(
            f"""
            SELECT {_COLUMNS} FROM walsaga.saga
            WHERE status IN ('RUNNING', 'COMPENSATING') AND deadline <= now()
            ORDER BY deadline LIMIT %s FOR UPDATE SKIP LOCKED
            """,
            (limit,),
        ).fetchall()
        down = self.availability.refresh(conn) if rows else self.availability.down
        busy = self.availability.busy
        traced = False
        for row in rows:
            state = _state(row)
            defn = self.definitions.get(state.definition)
            if defn is None:
                continue
            conditions = {"unavailable": state.waiting_on in down,
                          "busy": state.waiting_on in busy}  # fmt: skip
            parent = tracing.parse(state.traceparent, state.tracestate)
            if parent is None:
                if traced:
                    set_trace(conn, None)
                    traced = False
                self._advance(conn, defn, state, machine.on_timeout, **conditions)
                continue
            # A resend is a hop of the saga's trace: a span of its own.
            with tracing.span(f"{self.name} {state.definition} deadline", parent,
                              kind="internal") as hop:  # fmt: skip
                set_trace(conn, hop)
                traced = True
                state = dataclasses.replace(state, traceparent=hop.traceparent)
                self._advance(conn, defn, state, machine.on_timeout, **conditions)
        if traced:
            set_trace(conn, None)
        return len(rows)

    def watch(self, conn: psycopg.Connection[Any]) -> None:
        """Refresh who waits on whom (the waiting metrics), even while no deadline is due."""
        self.availability.refresh(conn)

    def _advance(
        self,
        conn: psycopg.Connection[Any],
        defn: Saga,
        state: SagaState,
        transition: Any,
        *args: Any,
        **kwargs: Any,
    ) -> SagaState:
        now = time.time()
        cause = kwargs.pop("cause", None)
        new, effects = transition(defn, state, *args, now, **kwargs)
        new, writes = self._apply(conn, defn, new, effects, now, cause)
        if new != state:
            writes.statements.append(
                (
                    """
                    UPDATE walsaga.saga
                    SET status = %s, step = %s, completed = %s, attempt = %s, data = %s,
                        deadline = %s, reason = %s, refusals = %s, step_started_at = %s,
                        waiting_on = %s, traceparent = %s, tracestate = %s, updated_at = now(),
                        ended_at = CASE WHEN %s THEN now() END
                    WHERE id = %s
                    """,
                    (new.status, new.step, new.completed, new.attempt, Jsonb(new.data),
                     _ts(new.deadline), new.reason, new.refusals, _ts(new.step_started),
                     new.waiting_on, new.traceparent, new.tracestate,
                     new.status in machine.TERMINAL, new.id),
                )
            )  # fmt: skip
            self._after(conn, writes, new, state)
            resent = [e for e in effects if isinstance(e, Log) and e.kind == "RETRY"]
            if resent and self._m_resent is not None and state.waiting_on is not None:
                counter = self._m_resent.labels(state.waiting_on)
                commit.after_commit(conn, lambda: counter.inc(len(resent)))
        writes.flush(conn)
        return new

    def _apply(
        self,
        conn: psycopg.Connection[Any],
        defn: Saga,
        state: SagaState,
        effects: list[Effect],
        now: float,
        cause: str | None = None,
    ) -> tuple[SagaState, _Writes]:
        """Carry out effects. Local actions run at once and feed their outcome
        back into the machine; log rows and commands are collected and written
        together (one round trip) by the caller. Commands carry `cause`, the
        id of the reply that led to them, as ``causation_id``."""
        writes = _Writes()
        pending = list(effects)
        while pending:
            effect = pending.pop(0)
            if isinstance(effect, Log):
                writes.logs.append((state.id, effect.kind, effect.step, effect.detail))
            elif isinstance(effect, SendCommand):
                command = effect.command
                headers = (
                    effect.headers if cause is None else {**effect.headers, "causation_id": cause}
                )
                writes.commands.append((command.topic, effect.aggregate_id, command.type,
                                        Jsonb(effect.payload), Jsonb(headers)))  # fmt: skip
                detail = {"type": command.type, "topic": command.topic, "attempt": state.attempt,
                          "key": effect.headers["idempotency_key"]}  # fmt: skip
                writes.logs.append((state.id, "COMMAND", effect.step, detail))
            elif isinstance(effect, RunLocal):
                result, error = self._run_local(conn, effect, state)
                state, more = machine.on_local_result(defn, state, result, error, now)
                pending = list(more) + pending
        return state, writes

    def _run_local(
        self, conn: psycopg.Connection[Any], effect: RunLocal, state: SagaState
    ) -> tuple[dict[str, Any] | None, str | None]:
        try:
            with conn.transaction():
                result = effect.action(conn, dict(state.data))
            return (dict(result) if result else None), None
        except BusinessError as e:
            return None, e.reason
        except psycopg.Error as e:
            if conn.broken:
                raise
            if not effect.compensation:
                raise
            return None, f"{type(e).__name__}: {e}"

    def _row(self, s: SagaState) -> tuple[Any, ...]:
        return (
            s.id,
            s.definition,
            s.version,
            s.status,
            s.step,
            s.completed,
            s.attempt,
            Jsonb(s.data),
            _ts(s.deadline),
            s.reason,
            s.refusals,
            _ts(s.step_started),
            s.waiting_on,
            s.traceparent,
            s.tracestate,
        )

    def _after(
        self,
        conn: psycopg.Connection[Any],
        writes: _Writes,
        new: SagaState,
        old: SagaState | None,
        *,
        in_runtime: bool = True,
    ) -> None:
        if new.status in machine.TERMINAL and (old is None or old.status != new.status):
            notice = {"id": new.id, "definition": new.definition, "status": new.status}
            writes.statements.append(
                ("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, orjson.dumps(notice).decode()))
            )
            # Counted and logged once the runtime has committed the transition:
            # a batch that rolls back and is retried must not count it twice.
            # (A saga that ends within start() runs in the caller's
            # transaction, which the runtime does not see: counted at once.)
            if in_runtime:
                commit.after_commit(conn, lambda: self._ended(new))
            else:
                self._ended(new)

    def _ended(self, new: SagaState) -> None:
        if self._m_ended is not None:
            self._m_ended.labels(new.definition, new.status).inc()
        if new.status == machine.FAILED:
            log.error("saga FAILED: compensation could not finish", saga=new.id,
                      definition=new.definition, reason=new.reason)  # fmt: skip

    def _definition(self, name: str) -> Saga:
        try:
            return self.definitions[name]
        except KeyError:
            raise SetupError(f"no saga definition named {name!r}") from None


def saga_status(conn: psycopg.Connection[Any], saga_id: str) -> SagaState | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM walsaga.saga WHERE id = %s", (saga_id,)).fetchone()
    return _state(row) if row else None


def saga_log(
    conn: psycopg.Connection[Any], saga_id: str
) -> list[tuple[str, str | None, dict[str, Any]]]:
    return [
        (kind, step, detail)
        for kind, step, detail in conn.execute(
            "SELECT kind, step, detail FROM walsaga.saga_log WHERE saga_id = %s ORDER BY seq",
            (saga_id,),
        )
    ]
