"""Saga definitions and the state machine that steps them. Pure: no I/O.

A saga is an ordered list of steps. A step either sends a command to a
participant and waits for a reply (any event carrying the saga's id in header
``saga_id`` whose type the step lists), or runs a local action in the
orchestrator's own transaction. Each step may have a compensation. When a
step fails for a business reason, the completed steps are compensated in
reverse order; a compensation is retried until it succeeds or its policy runs
out, and then the saga ends ``FAILED`` — never reported as compensated.

A step that is not answered has two clocks. The *resend* clock sends the same
command again (same idempotency key: it is performed once) after
``timeout_s``, then after waits that double up to ``retry.backoff_max_s``,
with jitter. The *give-up* clock is far longer (``give_up_after_s``, ten
minutes unless the saga says otherwise): "no answer yet" is not a business
failure, since a participant being restarted or a consumer group rebalancing
takes seconds and the command waits in Kafka. Only when it runs out does the
saga give up on the step and compensate, with a reason that says "gave up
waiting" — and not even then while the participant is known to be down
(:func:`on_timeout`'s ``unavailable``): those sagas keep waiting, resending
at the longest interval, and resume when its answers come back.

:func:`start`, :func:`on_reply`, :func:`on_timeout` and :func:`on_local_result`
take a :class:`SagaState` and return it changed, with the effects the
orchestrator must apply in the same transaction (send a command, run a local
action, log).
"""

from __future__ import annotations

import dataclasses
import hashlib
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
    """How often a step's command is sent again, and when that stops.

    While a command is unanswered it is resent after the step's ``timeout_s``,
    then after waits that grow by ``multiplier`` up to ``backoff_max_s``, each
    with up to ``jitter`` of it taken off (spread per saga, so sagas that
    waited together do not resend together). ``max_attempts`` bounds the
    sends (None: only the give-up time does). For a compensation, it bounds
    the explicit refusals tried again, ``backoff_s`` apart at first.
    """

    max_attempts: int | None = None
    backoff_s: float = 0.5
    backoff_max_s: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def backoff(self, attempt: int) -> float:
        """Extra wait before retry `attempt` (1-based; the first has none), without jitter."""
        if attempt <= 1:
            return 0.0
        return float(min(self.backoff_s * self.multiplier ** (attempt - 2), self.backoff_max_s))

    def resend_after(self, timeout_s: float, sends: int, spread: float) -> float:
        """The wait after send number `sends` (1-based) of an unanswered command.

        The first wait is `timeout_s` itself; `spread` in [0, 1) picks where in
        the jitter range this saga's later waits fall.
        """
        if sends <= 1:
            return timeout_s
        step = min(
            timeout_s * self.multiplier ** max(0, sends - 1), max(timeout_s, self.backoff_max_s)
        )
        return float(step * (1 - self.jitter * spread))


def _spread(*parts: object) -> float:
    """A number in [0, 1) that is the same for the same parts (deterministic jitter)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


#: How long a step waits for an answer before the saga gives up on it, unless
#: the step or the saga says otherwise.
GIVE_UP_AFTER_S = 600.0
#: The same for a compensation's answer; then the saga ends FAILED.
COMPENSATION_GIVE_UP_AFTER_S = 3600.0


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
    """One step: a remote command or a local action, and its compensation.

    A step with neither is the change that started the saga (the order row
    written in the transaction that calls ``Orchestrator.start``): done
    before the saga's first transition, so nothing runs for it going
    forward, and its compensation undoes it. Such steps come first.
    """

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
    #: How long to wait for an answer before the first resend.
    timeout_s: float = 10.0
    retry: RetryPolicy = RetryPolicy()
    compensation_retry: RetryPolicy = RetryPolicy(max_attempts=8)
    #: Give up waiting for an answer after this long (None: the saga's
    #: ``give_up_after_s``); ``math.inf`` never gives up.
    give_up_after_s: float | None = None
    #: Merges a success reply into the data; default: data[step name] = payload.
    on_reply: Callable[[Data, Mapping[str, Any]], Data] | None = None

    def __post_init__(self) -> None:
        if self.command is not None and self.action is not None:
            raise ValueError(f"step {self.name!r}: give at most one of command and action")
        if self.done_at_start and not self.compensable:
            raise ValueError(
                f"step {self.name!r}: give a command or an action (or, for the change "
                "that started the saga, its compensation)"
            )
        if self.command is not None and not self.success:
            raise ValueError(f"step {self.name!r}: a command step needs its success reply types")
        if (self.command or self.compensation) is not None and self.reply_topic is None:
            raise ValueError(f"step {self.name!r}: a command step needs its reply_topic")
        if self.compensation is not None and self.compensate is not None:
            raise ValueError(f"step {self.name!r}: give at most one of compensation and compensate")
        if self.compensation is not None and not self.compensated:
            raise ValueError(f"step {self.name!r}: a compensation command needs `compensated`")

    @property
    def compensable(self) -> bool:
        return self.compensation is not None or self.compensate is not None

    @property
    def done_at_start(self) -> bool:
        """The change that started the saga: nothing to run, only to undo."""
        return self.command is None and self.action is None


@dataclass(frozen=True)
class Saga:
    name: str
    steps: tuple[Step, ...]
    version: int = 1
    #: How long a step's command may stay unanswered before the saga gives up
    #: on the step and compensates (steps may say otherwise).
    give_up_after_s: float = GIVE_UP_AFTER_S
    #: How long a compensation may stay unanswered before the saga ends FAILED.
    compensation_give_up_after_s: float = COMPENSATION_GIVE_UP_AFTER_S

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"saga {self.name!r}: step names must be unique")
        if not self.steps:
            raise ValueError(f"saga {self.name!r} has no steps")
        first = next((i for i, s in enumerate(self.steps) if not s.done_at_start), None)
        if first is None:
            raise ValueError(f"saga {self.name!r}: no step has a command or an action")
        late = [s.name for s in self.steps[first:] if s.done_at_start]
        if late:
            raise ValueError(
                f"saga {self.name!r}: steps done at start (neither command nor action) come "
                f"first; {', '.join(map(repr, late))} follow a step that runs"
            )

    @property
    def reply_topics(self) -> list[str]:
        return sorted({s.reply_topic for s in self.steps if s.reply_topic})

    def give_up_after(self, step: Step, *, compensating: bool) -> float:
        if compensating:
            return self.compensation_give_up_after_s
        return step.give_up_after_s if step.give_up_after_s is not None else self.give_up_after_s


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
    #: When the current step's command (or compensation) was first sent: the
    #: give-up clock starts there (epoch seconds; None while nothing waits).
    step_started: float | None = None
    #: The topic the saga waits on an answer from (the participant), if any.
    waiting_on: str | None = None
    #: The trace context of the saga's latest hop (W3C), continued by resends.
    traceparent: str | None = None
    tracestate: str | None = None


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


def on_timeout(
    definition: Saga,
    state: SagaState,
    now: float,
    *,
    unavailable: bool = False,
    busy: bool = False,
) -> tuple[SagaState, list[Effect]]:
    """The deadline passed: resend the command, or give up waiting for it.

    `unavailable` says the participant the saga waits on is known to be down
    (many sagas' commands to it unanswered, nothing heard from it for a
    while): the saga then never gives up, and resends at the longest interval.
    `busy` says it answers, but has a backlog of this orchestrator's commands:
    the command is in that backlog, so it is not resent (a copy would only
    add to it); the saga waits the longest interval before looking again.
    """
    effects: list[Effect] = []
    if state.status in TERMINAL or state.deadline is None:
        return state, effects
    step = definition.steps[state.step]
    compensating = state.status == COMPENSATING
    if compensating and step.compensation is None:
        # A local compensation that failed: the deadline is its retry timer.
        effects.append(
            Log("RETRY", step.name, {"attempt": state.attempt + 1, "compensation": True})
        )
        state = dataclasses.replace(state, attempt=state.attempt + 1)
        return _send_compensation(definition, state, now, effects), effects
    policy = step.compensation_retry if compensating else step.retry
    if compensating and policy.max_attempts is not None and state.refusals >= policy.max_attempts:
        reason = f"compensation of {step.name!r} did not succeed after {state.attempt} attempts"
        effects.append(Log("FAILED", step.name, {"reason": reason}))
        state = dataclasses.replace(state, status=FAILED, deadline=None, reason=reason,
                                    waiting_on=None)  # fmt: skip
        return state, effects
    started = state.step_started if state.step_started is not None else now
    waited = now - started
    give_up_after = definition.give_up_after(step, compensating=compensating)
    out_of_sends = (
        not compensating
        and policy.max_attempts is not None
        and (state.attempt >= policy.max_attempts)
    )
    if busy and not unavailable and waited < give_up_after and not out_of_sends:
        effects.append(Log("WAITING", step.name, {"participant_busy": True,
                                                  "waited_s": round(waited, 3)}))  # fmt: skip
        longest = policy.resend_after(step.timeout_s, 1_000, _spread(state.id, step.name, now))
        return dataclasses.replace(state, deadline=now + longest), effects
    if (waited < give_up_after and not out_of_sends) or unavailable:
        attempt = state.attempt + 1
        detail: dict[str, Any] = {"attempt": attempt, "compensation": compensating,
                                  "waited_s": round(waited, 3)}  # fmt: skip
        if unavailable:
            detail["participant_unavailable"] = True
        effects.append(Log("RETRY", step.name, detail))
        state = dataclasses.replace(state, attempt=attempt)
        if compensating:
            state = _send_compensation(definition, state, now, effects, slow=unavailable)
        else:
            state = _send_command(definition, state, now, effects, slow=unavailable)
        return state, effects
    command = step.compensation if compensating else step.command
    assert command is not None
    what = f"{command.type} on {command.topic!r}"
    why = f"after {state.attempt} sends" if out_of_sends else f"after {waited:.0f}s"
    if compensating:
        reason = f"gave up waiting for compensation {what} of step {step.name!r} ({why})"
        effects.append(Log("FAILED", step.name, {"reason": reason}))
        state = dataclasses.replace(state, status=FAILED, deadline=None, reason=reason,
                                    waiting_on=None)  # fmt: skip
        return state, effects
    reason = f"gave up waiting for {what} of step {step.name!r} ({why}, {state.attempt} sends)"
    effects.append(Log("GAVE_UP", step.name, {"attempts": state.attempt, "reason": reason,
                                              "waited_s": round(waited, 3)}))  # fmt: skip
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
    if state.status in TERMINAL or state.step >= len(definition.steps):
        return state, effects  # nothing ran for a saga that has ended
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
        if policy.max_attempts is not None and attempt >= policy.max_attempts:
            reason = f"compensation of {step.name!r} failed {attempt} times: {error}"
            effects.append(Log("FAILED", step.name, {"reason": reason}))
            state = dataclasses.replace(state, status=FAILED, deadline=None, reason=reason,
                                        waiting_on=None)  # fmt: skip
            return state, effects
        effects.append(Log("COMPENSATION_ERROR", step.name, {"error": error, "attempt": attempt}))
        wait = max(policy.backoff(attempt + 1), policy.backoff_s)
        return dataclasses.replace(state, deadline=now + wait), effects
    return state, effects


def _enter_step(
    definition: Saga, state: SagaState, index: int, now: float, effects: list[Effect]
) -> SagaState:
    if index >= len(definition.steps):
        effects.append(Log(COMPLETED, None, {}))
        return dataclasses.replace(state, status=COMPLETED, step=index, deadline=None, attempt=0,
                                   step_started=None, waiting_on=None)  # fmt: skip
    step = definition.steps[index]
    if step.done_at_start:  # done by the transaction that started the saga
        effects.append(Log("LOCAL", step.name, {"outcome": "done at start"}))
        return _enter_step(
            definition, dataclasses.replace(state, completed=index + 1), index + 1, now, effects
        )
    state = dataclasses.replace(
        state, step=index, attempt=1, refusals=0, step_started=None, waiting_on=None
    )
    if step.action is not None:
        effects.append(RunLocal(step.name, step.action, compensation=False))
        return dataclasses.replace(state, deadline=None)
    return _send_command(definition, state, now, effects)


def _send_command(
    definition: Saga, state: SagaState, now: float, effects: list[Effect], *, slow: bool = False
) -> SagaState:
    step = definition.steps[state.step]
    assert step.command is not None
    effects.append(_command(definition, state, step, step.command, compensation=False))
    return _waiting(state, step, step.command, step.retry, now, slow=slow)


def _send_compensation(
    definition: Saga, state: SagaState, now: float, effects: list[Effect], *, slow: bool = False
) -> SagaState:
    step = definition.steps[state.step]
    if step.compensate is not None:
        effects.append(RunLocal(step.name, step.compensate, compensation=True))
        return dataclasses.replace(state, deadline=None, waiting_on=None, step_started=None)
    assert step.compensation is not None
    effects.append(_command(definition, state, step, step.compensation, compensation=True))
    return _waiting(state, step, step.compensation, step.compensation_retry, now, slow=slow)


def _waiting(
    state: SagaState,
    step: Step,
    command: Command,
    policy: RetryPolicy,
    now: float,
    *,
    slow: bool,
) -> SagaState:
    """The state after a send: when to resend, and since when the step waits."""
    sends = state.attempt if not slow else 1_000  # a participant known down: the longest wait
    wait = policy.resend_after(step.timeout_s, sends, _spread(state.id, step.name, state.attempt))
    started = state.step_started if state.step_started is not None else now
    return dataclasses.replace(
        state, deadline=now + wait, step_started=started, waiting_on=command.topic
    )


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
        return dataclasses.replace(state, status=COMPENSATED, step=0, deadline=None, attempt=0,
                                   step_started=None, waiting_on=None)  # fmt: skip
    state = dataclasses.replace(
        state, step=index, attempt=1, refusals=0, step_started=None, waiting_on=None
    )
    return _send_compensation(definition, state, now, effects)
