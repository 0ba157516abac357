"""Saga definitions and the state machine that steps them. Pure: no I/O.

A saga is an ordered list of steps. A step either sends a command to a
participant and waits for a reply (any event carrying the saga's id in header
``saga_id`` whose type the step lists), or runs a local action in the
orchestrator's own transaction. Each step may have a compensation. When a
step fails for a business reason, or its command stays unanswered through
every retry, the completed steps are compensated in reverse order; a
compensation is retried until it succeeds or its policy runs out, and then the
saga ends ``FAILED`` — never reported as compensated.

:func:`start`, :func:`on_reply`, :func:`on_timeout` and :func:`on_local_result`
take a :class:`SagaState` and return it changed, with the effects the
orchestrator must apply in the same transaction (send a command, run a local
action, log).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

RUNNING = "RUNNING"
COMPENSATING = "COMPENSATING"
COMPLETED = "COMPLETED"
COMPENSATED = "COMPENSATED"
FAILED = "FAILED"
TERMINAL = frozenset({COMPLETED, COMPENSATED, FAILED})

Data = dict[str, Any]


@dataclass(frozen=True)
class RetryPolicy:
    """How many times a command is sent before the step gives up, and how the
    wait between attempts grows (the deadline of attempt n is the step's
    timeout plus ``backoff_s * 2**(n-2)``, capped)."""

    max_attempts: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0

    def backoff(self, attempt: int) -> float:
        """Extra wait before attempt `attempt` (1-based; the first has none)."""
        if attempt <= 1:
            return 0.0
        return float(min(self.backoff_s * 2 ** (attempt - 2), self.backoff_max_s))


@dataclass(frozen=True)
class Command:
    """A message to a participant, written to the orchestrator's outbox.

    ``topic`` is the outbox aggregate type (the Kafka topic under the relay's
    default template); ``key`` names a data field, or is a function of the
    data, giving the aggregate id (the Kafka key); ``payload`` builds the body
    from the data (default: the whole data).
    """

    topic: str
    type: str
    key: str | Callable[[Data], str]
    payload: Callable[[Data], Any] | None = None

    def aggregate_id(self, data: Data) -> str:
        if callable(self.key):
            return str(self.key(data))
        return str(data[self.key])

    def body(self, data: Data) -> Any:
        return self.payload(data) if self.payload is not None else data


LocalAction = Callable[[Any, Data], "Data | None"]


@dataclass(frozen=True)
class Step:
    """One step: a remote command or a local action, and its compensation."""

    name: str
    command: Command | None = None
    #: Local action run in the orchestrator's transaction: ``action(conn, data)``,
    #: may return fields to merge into the data; raise BusinessError to fail.
    action: LocalAction | None = None
    #: Topic the replies of this step's command (and compensation) arrive on.
    reply_topic: str | None = None
    success: tuple[str, ...] = ()
    failure: tuple[str, ...] = ()
    compensation: Command | None = None
    compensate: LocalAction | None = None
    #: Reply types confirming the compensation (or refusing it, to retry).
    compensated: tuple[str, ...] = ()
    compensation_failed: tuple[str, ...] = ()
    timeout_s: float = 10.0
    retry: RetryPolicy = RetryPolicy()
    compensation_retry: RetryPolicy = RetryPolicy(max_attempts=8)
    #: Merges a success reply into the data; default: data[step name] = payload.
    on_reply: Callable[[Data, Mapping[str, Any]], Data] | None = None

    def __post_init__(self) -> None:
        if (self.command is None) == (self.action is None):
            raise ValueError(f"step {self.name!r}: give exactly one of command and action")
        if self.command is not None and not self.success:
            raise ValueError(f"step {self.name!r}: a command step needs its success reply types")
        if self.command is not None and self.reply_topic is None:
            raise ValueError(f"step {self.name!r}: a command step needs its reply_topic")
        if self.compensation is not None and self.compensate is not None:
            raise ValueError(f"step {self.name!r}: give at most one of compensation and compensate")
        if self.compensation is not None and not self.compensated:
            raise ValueError(f"step {self.name!r}: a compensation command needs `compensated`")

    @property
    def compensable(self) -> bool:
        return self.compensation is not None or self.compensate is not None


@dataclass(frozen=True)
class Saga:
    name: str
    steps: tuple[Step, ...]
    version: int = 1

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"saga {self.name!r}: step names must be unique")
        if not self.steps:
            raise ValueError(f"saga {self.name!r} has no steps")

    @property
    def reply_topics(self) -> list[str]:
        return sorted({s.reply_topic for s in self.steps if s.reply_topic})


@dataclass(frozen=True)
class SagaState:
    id: str
    definition: str
    version: int
    status: str
    step: int
    completed: int
    attempt: int
    data: Data
    deadline: float | None = None  # epoch seconds
    reason: str | None = None
    #: Explicit refusals of the current compensation: each retry after one is
    #: a new request (a new idempotency key), unlike a resend after silence.
    refusals: int = 0


# -- effects -------------------------------------------------------------------


@dataclass(frozen=True)
class SendCommand:
    step: str
    command: Command
    aggregate_id: str
    payload: Any
    headers: dict[str, str]


@dataclass(frozen=True)
class RunLocal:
    step: str
    action: LocalAction
    compensation: bool


@dataclass(frozen=True)
class Log:
    kind: str
    step: str | None
    detail: dict[str, Any] = field(default_factory=dict)


Effect = SendCommand | RunLocal | Log


@dataclass(frozen=True)
class Reply:
    type: str
    payload: Mapping[str, Any]
    headers: Mapping[str, str]
    message_id: str


# -- transitions ---------------------------------------------------------------


def idempotency_key(
    saga_id: str, step: str, *, compensation: bool = False, refusals: int = 0
) -> str:
    key = f"{saga_id}/{step}/{'compensate' if compensation else 'do'}"
    return f"{key}/{refusals}" if refusals else key


def start(definition: Saga, saga_id: str, data: Data, now: float) -> tuple[SagaState, list[Effect]]:
    state = SagaState(saga_id, definition.name, definition.version, RUNNING, 0, 0, 0, dict(data))
    effects: list[Effect] = [Log("STARTED", None, {"data": data})]
    state = _enter_step(definition, state, 0, now, effects)
    return state, effects


def on_reply(
    definition: Saga, state: SagaState, reply: Reply, now: float
) -> tuple[SagaState, list[Effect]]:
    effects: list[Effect] = []
    detail = {"type": reply.type, "message_id": reply.message_id}
    if state.status in TERMINAL or state.step >= len(definition.steps):
        return state, [Log("IGNORED", None, {**detail, "why": f"saga is {state.status}"})]
    step = definition.steps[state.step]
    if state.status == RUNNING and step.command is not None:
        if reply.type in step.success:
            merged = (
                step.on_reply(state.data, reply.payload)
                if step.on_reply is not None
                else {**state.data, step.name: dict(reply.payload)}
            )
            effects.append(Log("REPLY", step.name, {**detail, "outcome": "success"}))
            state = dataclasses.replace(state, data=merged, completed=state.step + 1)
            return _enter_step(definition, state, state.step + 1, now, effects), effects
        if reply.type in step.failure:
            reason = str(reply.payload.get("reason") or reply.type)
            effects.append(
                Log("REPLY", step.name, {**detail, "outcome": "failure", "reason": reason})
            )
            return _begin_compensation(
                definition, state, now, effects, reason, include_current=False
            ), effects
    if state.status == COMPENSATING and step.compensation is not None:
        if reply.type in step.compensated:
            effects.append(Log("REPLY", step.name, {**detail, "outcome": "compensated"}))
            return _next_compensation(definition, state, state.step - 1, now, effects), effects
        if reply.type in step.compensation_failed:
            effects.append(Log("REPLY", step.name, {**detail, "outcome": "compensation refused"}))
            # Try again after the backoff: the deadline is the retry timer.
            policy = step.compensation_retry
            wait = max(policy.backoff(state.attempt + 1), policy.backoff_s)
            state = dataclasses.replace(state, deadline=now + wait, refusals=state.refusals + 1)
            return state, effects
    effects.append(Log("IGNORED", step.name, {**detail, "why": "not expected by this step"}))
    return state, effects


def on_timeout(definition: Saga, state: SagaState, now: float) -> tuple[SagaState, list[Effect]]:
    """The deadline passed: resend the command, or give the step up."""
    effects: list[Effect] = []
    if state.status in TERMINAL or state.deadline is None:
        return state, effects
    step = definition.steps[state.step]
    compensating = state.status == COMPENSATING
    policy = step.compensation_retry if compensating else step.retry
    if state.attempt < policy.max_attempts:
        attempt = state.attempt + 1
        effects.append(Log("RETRY", step.name, {"attempt": attempt, "compensation": compensating}))
        state = dataclasses.replace(state, attempt=attempt)
        if compensating:
            return _send_compensation(definition, state, now, effects), effects
        return _send_command(definition, state, now, effects), effects
    if compensating:
        reason = f"compensation of {step.name!r} did not succeed after {state.attempt} attempts"
        effects.append(Log("FAILED", step.name, {"reason": reason}))
        return dataclasses.replace(state, status=FAILED, deadline=None, reason=reason), effects
    reason = f"step {step.name!r} had no answer after {state.attempt} attempts"
    effects.append(Log("TIMEOUT", step.name, {"attempts": state.attempt}))
    # The command's outcome is unknown: compensate this step too (the
    # compensation seals the command, so a late copy is never performed).
    return _begin_compensation(
        definition, state, now, effects, reason, include_current=True
    ), effects


def on_local_result(
    definition: Saga,
    state: SagaState,
    result: Data | None,
    error: str | None,
    now: float,
) -> tuple[SagaState, list[Effect]]:
    """The outcome of the :class:`RunLocal` the last transition asked for."""
    effects: list[Effect] = []
    step = definition.steps[state.step]
    if state.status == RUNNING:
        if error is None:
            effects.append(Log("LOCAL", step.name, {"outcome": "success"}))
            data = {**state.data, **(result or {})}
            state = dataclasses.replace(state, data=data, completed=state.step + 1)
            return _enter_step(definition, state, state.step + 1, now, effects), effects
        effects.append(Log("LOCAL", step.name, {"outcome": "failure", "reason": error}))
        return _begin_compensation(
            definition, state, now, effects, error, include_current=False
        ), effects
    if state.status == COMPENSATING:
        if error is None:
            effects.append(Log("COMPENSATED_STEP", step.name, {}))
            return _next_compensation(definition, state, state.step - 1, now, effects), effects
        attempt = state.attempt
        policy = step.compensation_retry
        if attempt >= policy.max_attempts:
            reason = f"compensation of {step.name!r} failed {attempt} times: {error}"
            effects.append(Log("FAILED", step.name, {"reason": reason}))
            return dataclasses.replace(state, status=FAILED, deadline=None, reason=reason), effects
        effects.append(Log("COMPENSATION_ERROR", step.name, {"error": error, "attempt": attempt}))
        wait = max(policy.backoff(attempt + 1), policy.backoff_s)
        return dataclasses.replace(state, deadline=now + wait), effects
    return state, effects


def _enter_step(
    definition: Saga, state: SagaState, index: int, now: float, effects: list[Effect]
) -> SagaState:
    if index >= len(definition.steps):
        effects.append(Log(COMPLETED, None, {}))
        return dataclasses.replace(state, status=COMPLETED, step=index, deadline=None, attempt=0)
    step = definition.steps[index]
    state = dataclasses.replace(state, step=index, attempt=1, refusals=0)
    if step.action is not None:
        effects.append(RunLocal(step.name, step.action, compensation=False))
        return dataclasses.replace(state, deadline=None)
    return _send_command(definition, state, now, effects)


def _send_command(
    definition: Saga, state: SagaState, now: float, effects: list[Effect]
) -> SagaState:
    step = definition.steps[state.step]
    assert step.command is not None
    effects.append(_command(definition, state, step, step.command, compensation=False))
    deadline = now + step.timeout_s + step.retry.backoff(state.attempt)
    return dataclasses.replace(state, deadline=deadline)


def _send_compensation(
    definition: Saga, state: SagaState, now: float, effects: list[Effect]
) -> SagaState:
    step = definition.steps[state.step]
    if step.compensate is not None:
        effects.append(RunLocal(step.name, step.compensate, compensation=True))
        return dataclasses.replace(state, deadline=None)
    assert step.compensation is not None
    effects.append(_command(definition, state, step, step.compensation, compensation=True))
    deadline = now + step.timeout_s + step.compensation_retry.backoff(state.attempt)
    return dataclasses.replace(state, deadline=deadline)


def _command(
    definition: Saga,
    state: SagaState,
    step: Step,
    command: Command,
    *,
    compensation: bool,
) -> SendCommand:
    headers = {
        "saga_id": state.id,
        "saga_type": definition.name,
        "saga_step": step.name,
        "idempotency_key": idempotency_key(
            state.id, step.name, compensation=compensation, refusals=state.refusals
        ),
    }
    if compensation:
        headers["compensates"] = idempotency_key(state.id, step.name)
    return SendCommand(
        step.name, command, command.aggregate_id(state.data), command.body(state.data), headers
    )


def _begin_compensation(
    definition: Saga,
    state: SagaState,
    now: float,
    effects: list[Effect],
    reason: str,
    *,
    include_current: bool,
) -> SagaState:
    effects.append(Log("COMPENSATING", definition.steps[state.step].name, {"reason": reason}))
    # Compensating actions see why in the data.
    data = {**state.data, "failure_reason": reason}
    state = dataclasses.replace(state, status=COMPENSATING, reason=reason, data=data)
    start_at = state.step if include_current else state.step - 1
    return _next_compensation(definition, state, start_at, now, effects)


def _next_compensation(
    definition: Saga, state: SagaState, index: int, now: float, effects: list[Effect]
) -> SagaState:
    while index >= 0 and not definition.steps[index].compensable:
        index -= 1
    if index < 0:
        effects.append(Log(COMPENSATED, None, {"reason": state.reason}))
        return dataclasses.replace(state, status=COMPENSATED, step=0, deadline=None, attempt=0)
    state = dataclasses.replace(state, step=index, attempt=1, refusals=0)
    return _send_compensation(definition, state, now, effects)
