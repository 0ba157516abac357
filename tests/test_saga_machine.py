"""The saga state machine, pure: steps, replies, timeouts, compensation order."""

from __future__ import annotations

from typing import Any

import pytest

from participants import saga
from participants.saga import (
    Command,
    Log,
    Reply,
    RetryPolicy,
    RunLocal,
    Saga,
    SendCommand,
    Step,
)


def remote(name: str, *, compensable: bool = True, **kw: Any) -> Step:
    return Step(
        name,
        command=Command(f"{name}-commands", f"Do{name}", "key"),
        reply_topic=name,
        success=(f"{name}Done",),
        failure=(f"{name}Refused",),
        compensation=Command(f"{name}-commands", f"Undo{name}", "key") if compensable else None,
        compensated=(f"{name}Undone",) if compensable else (),
        compensation_failed=(f"{name}UndoRefused",) if compensable else (),
        timeout_s=10,
        **kw,
    )


TRIP = Saga("trip", (remote("Flight"), remote("Hotel"), remote("Car")))


def reply(type: str, **payload: Any) -> Reply:
    return Reply(type, payload, {"saga_id": "s1"}, f"m-{type}")


def sent(effects: list[Any]) -> list[str]:
    return [e.command.type for e in effects if isinstance(e, SendCommand)]


def logged(effects: list[Any]) -> list[str]:
    return [e.kind for e in effects if isinstance(e, Log)]


def test_a_saga_sends_each_command_after_the_previous_success_and_completes() -> None:
    state, effects = saga.start(TRIP, "s1", {"key": "k"}, now=0)
    assert sent(effects) == ["DoFlight"]
    assert state.status == saga.RUNNING and state.deadline == 10
    command = next(e for e in effects if isinstance(e, SendCommand))
    assert command.headers == {
        "saga_id": "s1",
        "saga_type": "trip",
        "saga_step": "Flight",
        "idempotency_key": "s1/Flight/do",
    }
    state, effects = saga.on_reply(TRIP, state, reply("FlightDone", seat="3A"), now=1)
    assert sent(effects) == ["DoHotel"]
    assert state.data["Flight"] == {"seat": "3A"}
    state, effects = saga.on_reply(TRIP, state, reply("HotelDone"), now=2)
    state, effects = saga.on_reply(TRIP, state, reply("CarDone"), now=3)
    assert state.status == saga.COMPLETED
    assert state.deadline is None
    assert logged(effects)[-1] == "COMPLETED"


def test_a_business_failure_compensates_completed_steps_in_reverse_order() -> None:
    state, _ = saga.start(TRIP, "s1", {"key": "k"}, now=0)
    state, _ = saga.on_reply(TRIP, state, reply("FlightDone"), now=1)
    state, _ = saga.on_reply(TRIP, state, reply("HotelDone"), now=2)
    state, effects = saga.on_reply(TRIP, state, reply("CarRefused", reason="no cars"), now=3)
    assert state.status == saga.COMPENSATING
    assert state.reason == "no cars"
    assert sent(effects) == ["UndoHotel"]  # the refused step did nothing: not compensated
    undo = next(e for e in effects if isinstance(e, SendCommand))
    assert undo.headers["compensates"] == "s1/Hotel/do"
    assert undo.headers["idempotency_key"] == "s1/Hotel/compensate"
    state, effects = saga.on_reply(TRIP, state, reply("HotelUndone"), now=4)
    assert sent(effects) == ["UndoFlight"]
    state, effects = saga.on_reply(TRIP, state, reply("FlightUndone"), now=5)
    assert state.status == saga.COMPENSATED
    assert logged(effects)[-1] == "COMPENSATED"


def test_an_unanswered_command_is_resent_with_growing_waits_then_given_up_with_a_reason() -> None:
    defn = Saga("t", (remote("A"), remote("B")), give_up_after_s=120)
    state, _ = saga.start(defn, "s1", {"key": "k"}, now=0)
    state, _ = saga.on_reply(defn, state, reply("ADone"), now=1)
    assert state.deadline == 11  # the step's timeout
    assert (state.step_started, state.waiting_on) == (1, "B-commands")
    waits = []
    while state.status == saga.RUNNING:
        now = state.deadline
        assert now is not None
        state, effects = saga.on_timeout(defn, state, now=now)
        if state.status != saga.RUNNING:
            break
        assert sent(effects) == ["DoB"]
        retried = next(e for e in effects if isinstance(e, SendCommand))
        assert retried.headers["idempotency_key"] == "s1/B/do"  # same key: performed once
        assert state.step_started == 1  # the give-up clock does not restart
        waits.append(state.deadline - now)  # type: ignore[operator]
    # Waits double from the timeout, capped at 60 s, less at most 20% jitter.
    assert [round(w) for w in waits[:3]] != [10, 10, 10]
    for n, wait in enumerate(waits, start=2):
        step = min(10 * 2 ** (n - 1), 60)
        assert 0.8 * step <= wait <= step
    # Given up once 120 s had passed since the first send: B's outcome is
    # unknown, so B is compensated too, then A.
    assert logged(effects)[:2] == ["GAVE_UP", "COMPENSATING"]
    assert state.reason is not None and state.reason.startswith("gave up waiting for DoB")
    assert sent(effects) == ["UndoB"]
    state, effects = saga.on_reply(defn, state, reply("BUndone"), now=200)
    assert sent(effects) == ["UndoA"]


def test_a_participant_known_down_keeps_its_sagas_waiting_at_the_longest_interval() -> None:
    defn = Saga("t", (remote("A"),), give_up_after_s=30)
    state, _ = saga.start(defn, "s1", {"key": "k"}, now=0)
    for _ in range(20):
        now = state.deadline
        assert now is not None
        state, effects = saga.on_timeout(defn, state, now=now, unavailable=True)
        assert state.status == saga.RUNNING and sent(effects) == ["DoA"]
        assert 48 <= state.deadline - now <= 60  # type: ignore[operator]
    assert state.deadline > 600  # type: ignore[operator]
    # It comes back: the answer is taken as if nothing had happened.
    state, effects = saga.on_reply(defn, state, reply("ADone"), now=state.deadline)  # type: ignore[arg-type]
    assert state.status == saga.COMPLETED


def test_max_attempts_still_bounds_the_sends_of_a_step() -> None:
    defn = Saga("t", (remote("A", retry=RetryPolicy(max_attempts=2)),))
    state, _ = saga.start(defn, "s1", {"key": "k"}, now=0)
    state, effects = saga.on_timeout(defn, state, now=10)
    assert sent(effects) == ["DoA"] and state.attempt == 2
    state, effects = saga.on_timeout(defn, state, now=state.deadline)  # type: ignore[arg-type]
    assert "GAVE_UP" in logged(effects)
    assert "after 2 sends" in (state.reason or "")


def test_a_compensation_that_keeps_failing_ends_failed_never_compensated() -> None:
    defn = Saga(
        "t",
        (remote("A", compensation_retry=RetryPolicy(max_attempts=3, backoff_s=1)), remote("B")),
    )
    state, _ = saga.start(defn, "s1", {"key": "k"}, now=0)
    state, _ = saga.on_reply(defn, state, reply("ADone"), now=1)
    state, _ = saga.on_reply(defn, state, reply("BRefused"), now=2)
    for attempt in (1, 2):
        state, effects = saga.on_reply(defn, state, reply("AUndoRefused"), now=3)
        assert state.status == saga.COMPENSATING
        state, effects = saga.on_timeout(defn, state, now=state.deadline)  # type: ignore[arg-type]
        assert sent(effects) == ["UndoA"]
        assert state.attempt == attempt + 1
        # A refused request was handled: the retry is a new request, not a copy.
        again = next(e for e in effects if isinstance(e, SendCommand))
        assert again.headers["idempotency_key"] == f"s1/A/compensate/{attempt}"
        assert again.headers["compensates"] == "s1/A/do"
    state, effects = saga.on_reply(defn, state, reply("AUndoRefused"), now=9)
    state, effects = saga.on_timeout(defn, state, now=state.deadline)  # type: ignore[arg-type]
    assert state.status == saga.FAILED
    assert "did not succeed after 3 attempts" in (state.reason or "")


def test_unexpected_and_late_replies_are_logged_and_change_nothing() -> None:
    state, _ = saga.start(TRIP, "s1", {"key": "k"}, now=0)
    same, effects = saga.on_reply(TRIP, state, reply("HotelDone"), now=1)
    assert same == state
    assert logged(effects) == ["IGNORED"]
    done = state
    for t in ("FlightDone", "HotelDone", "CarDone"):
        done, _ = saga.on_reply(TRIP, done, reply(t), now=2)
    late, effects = saga.on_reply(TRIP, done, reply("CarDone"), now=3)
    assert late == done and logged(effects) == ["IGNORED"]


def test_local_steps_run_in_the_orchestrator_and_feed_back() -> None:
    def approve(conn: Any, data: dict[str, Any]) -> dict[str, Any]:
        return {"approved": True}

    defn = Saga(
        "order",
        (
            Step("create", action=lambda c, d: None, compensate=lambda c, d: None),
            remote("Credit", compensable=False),
            Step("approve", action=approve),
        ),
    )
    state, effects = saga.start(defn, "o1", {"key": "k"}, now=0)
    assert isinstance(effects[-1], RunLocal) and effects[-1].step == "create"
    state, effects = saga.on_local_result(defn, state, None, None, now=0)
    assert sent(effects) == ["DoCredit"]
    state, effects = saga.on_reply(defn, state, reply("CreditDone"), now=1)
    assert isinstance(effects[-1], RunLocal) and effects[-1].step == "approve"
    state, effects = saga.on_local_result(defn, state, {"approved": True}, None, now=1)
    assert state.status == saga.COMPLETED and state.data["approved"] is True

    # A refusal compensates the local create step (the credit step has no undo).
    state, _ = saga.start(defn, "o2", {"key": "k"}, now=0)
    state, _ = saga.on_local_result(defn, state, None, None, now=0)
    state, effects = saga.on_reply(defn, state, reply("CreditRefused", reason="limit"), now=1)
    local = [e for e in effects if isinstance(e, RunLocal)]
    assert [e.step for e in local] == ["create"] and local[0].compensation
    assert state.data["failure_reason"] == "limit"
    state, effects = saga.on_local_result(defn, state, None, None, now=1)
    assert state.status == saga.COMPENSATED


def test_the_change_that_started_the_saga_is_a_step_with_only_its_compensation() -> None:
    undo = lambda c, d: None  # noqa: E731
    defn = Saga("order", (Step("create", compensate=undo), remote("Credit", compensable=False)))
    state, effects = saga.start(defn, "o1", {"key": "k"}, now=0)
    assert not [e for e in effects if isinstance(e, RunLocal)], "nothing runs for it"
    assert sent(effects) == ["DoCredit"] and logged(effects) == ["STARTED", "LOCAL"]
    assert state.step == 1 and state.completed == 1
    state, effects = saga.on_reply(defn, state, reply("CreditDone"), now=1)
    assert state.status == saga.COMPLETED

    # A refusal undoes it, with its compensation.
    state, _ = saga.start(defn, "o2", {"key": "k"}, now=0)
    state, effects = saga.on_reply(defn, state, reply("CreditRefused", reason="limit"), now=1)
    local = [e for e in effects if isinstance(e, RunLocal)]
    assert [(e.step, e.compensation, e.action) for e in local] == [("create", True, undo)]
    state, effects = saga.on_local_result(defn, state, None, None, now=1)
    assert state.status == saga.COMPENSATED


def test_definitions_reject_ambiguous_steps() -> None:
    with pytest.raises(ValueError, match="at most one of command and action"):
        Step("x", command=Command("t", "C", "k"), reply_topic="r", success=("D",),
             action=lambda c, d: None)  # fmt: skip
    with pytest.raises(ValueError, match="give a command or an action"):
        Step("x")
    done = Step("created", compensate=lambda c, d: None)
    with pytest.raises(ValueError, match="'created' follow a step that runs"):
        Saga("d", (remote("A"), done))
    with pytest.raises(ValueError, match="no step has a command or an action"):
        Saga("d", (done,))
    with pytest.raises(ValueError, match="needs its reply_topic"):  # where would it be answered?
        Step("created", compensation=Command("t", "Undo", "k"), compensated=("Undone",))
    with pytest.raises(ValueError, match="success reply types"):
        Step("x", command=Command("t", "C", "k"), reply_topic="r")
    with pytest.raises(ValueError, match="unique"):
        Saga("d", (remote("A"), remote("A")))


def test_retry_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(max_attempts=10, backoff_s=0.5, backoff_max_s=3)
    assert [policy.backoff(n) for n in range(1, 7)] == [0, 0.5, 1, 2, 3, 3]


def test_a_busy_participant_gets_no_copies_of_commands_already_in_its_backlog() -> None:
    defn = Saga("t", (remote("A"),), give_up_after_s=300)
    state, _ = saga.start(defn, "s1", {"key": "k"}, now=0)
    state, effects = saga.on_timeout(defn, state, now=10, busy=True)
    assert sent(effects) == [] and logged(effects) == ["WAITING"]
    assert state.attempt == 1 and 48 <= state.deadline - 10 <= 60  # type: ignore[operator]
    # Busy is not down: the give-up clock runs on.
    while state.status == saga.RUNNING:
        state, effects = saga.on_timeout(defn, state, now=state.deadline, busy=True)  # type: ignore[arg-type]
    assert "GAVE_UP" in logged(effects) and sent(effects) == ["UndoA"]


def test_down_and_busy_are_told_apart_by_whether_answers_keep_coming() -> None:
    from participants.availability import Waiting, is_busy, is_down

    rule = {"min_waiting": 5, "silence_s": 15.0}
    busy_rule = {"busy_waiting": 20, "silence_s": 15.0}
    silent = Waiting("t", sagas=40, overdue=30, oldest_s=90, silent_s=60)
    answering = Waiting("t", sagas=40, overdue=30, oldest_s=90, silent_s=0.5)
    never = Waiting("t", sagas=40, overdue=30, oldest_s=90, silent_s=None)
    few = Waiting("t", sagas=4, overdue=4, oldest_s=90, silent_s=60)
    assert is_down(silent, **rule) and not is_busy(silent, **busy_rule)  # type: ignore[arg-type]
    assert is_busy(answering, **busy_rule) and not is_down(answering, **rule)  # type: ignore[arg-type]
    assert is_down(never, **rule)  # type: ignore[arg-type]
    assert not is_down(few, **rule) and not is_busy(few, **busy_rule)  # type: ignore[arg-type]
