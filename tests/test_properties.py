"""Properties of the pure cores, over any order of inputs: the acknowledgement
window and the saga state machine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from participants import saga
from participants.saga import Command, Reply, RetryPolicy, RunLocal, Saga, SendCommand, Step
from relay.window import AckWindow, Group
from walsaga.errors import DeliveryError

# -- the acknowledgement window --------------------------------------------------


@dataclass
class Arrival:
    """One message read from the slot, in arrival order."""

    lsn: int
    group: Group | None = None  # None: a position-only message
    acked: bool = False
    failed: bool = False

    @property
    def settled(self) -> bool:
        return self.group is None or (self.acked and not self.failed)


class AckWindowMachine(RuleBasedStateMachine):
    """Events, position-only messages, seals and acknowledgements in any order.

    Change positions need not increase in arrival order (transactions
    interleave in the WAL and are decoded in commit order), so positions are
    drawn near the last one, below it as well as above. A failed delivery is
    either left alone (the next advance() stops the session) or resolved the
    way the session does: the event is sent again (or reported), and that
    delivery takes its place.
    """

    @initialize(
        confirmed=st.integers(min_value=0, max_value=1000),
        max_group=st.integers(min_value=1, max_value=4),
    )
    def start(self, confirmed: int, max_group: int) -> None:
        self.initial = confirmed
        self.retired: list[Group] = []
        self.window = AckWindow(confirmed, max_group=max_group, on_retired=self.retired.append)
        self.arrivals: list[Arrival] = []
        self.last_lsn = confirmed
        self.confirmed = confirmed
        self.stopped = False

    def _next_lsn(self, step: int) -> int:
        self.last_lsn = max(0, self.last_lsn + step)
        return self.last_lsn

    @precondition(lambda self: not self.stopped)
    @rule(steps=st.lists(st.integers(min_value=-50, max_value=100), min_size=1, max_size=4))
    def events(self, steps: list[int]) -> None:
        for step in steps:
            lsn = self._next_lsn(step)
            self.arrivals.append(Arrival(lsn, self.window.event(lsn, f"t{lsn}")))

    @precondition(lambda self: not self.stopped)
    @rule(step=st.integers(min_value=-50, max_value=100))
    def position(self, step: int) -> None:
        lsn = self._next_lsn(step)
        self.window.position(lsn)
        self.arrivals.append(Arrival(lsn))

    @precondition(lambda self: not self.stopped)
    @rule()
    def seal(self) -> None:
        self.window.seal()

    def _unacked(self) -> list[Arrival]:
        return [a for a in self.arrivals if a.group is not None and not a.acked]

    @precondition(lambda self: not self.stopped and self._unacked())
    @rule(
        acks=st.lists(
            st.tuples(st.integers(min_value=0), st.sampled_from([False] * 3 + [True])),
            min_size=1,
            max_size=3,
        )
    )
    def ack(self, acks: list[tuple[int, bool]]) -> None:
        for pick, error in acks:
            unacked = self._unacked()
            if not unacked:
                return
            arrival = unacked[pick % len(unacked)]
            assert arrival.group is not None
            arrival.group.ack("broker said no" if error else None, None)
            arrival.acked = True
            arrival.failed = error

    @precondition(lambda self: not self.stopped and any(a.failed for a in self.arrivals))
    @rule()
    def resolve_failures(self) -> None:
        failed = self.window.take_failed()
        expected = {id(a.group) for a in self.arrivals if a.failed}
        assert {id(g) for g in failed} == expected
        assert len(failed) == len(expected), "a group with failures is handed over once"
        assert self.window.take_failed() == []
        for group in failed:
            mine = [a for a in self.arrivals if a.failed and a.group is group]
            assert len(group.failures or ()) == len(mine)
            group.resolved()
            for arrival in mine:
                group.pending += 1  # the record sent again takes the event's place
                arrival.acked = arrival.failed = False

    def _bound(self) -> int:
        """The highest position the window may confirm: nothing past the first
        event not (successfully) acknowledged."""
        bound = self.initial
        for arrival in self.arrivals:
            if not arrival.settled:
                return bound
            bound = max(bound, arrival.lsn)
        return bound

    @precondition(lambda self: not self.stopped)
    @rule()
    def advance(self) -> None:
        first_failed = next((i for i, a in enumerate(self.arrivals) if a.failed), None)
        try:
            confirmable = self.window.advance()
        except DeliveryError:
            assert first_failed is not None, "a delivery error without any failed event"
            self.stopped = True  # the session ends here
            return
        if first_failed is not None:
            before = self.arrivals[:first_failed]
            assert not all(a.settled for a in before), (
                "every event before a failed one was acknowledged: the failure must surface"
            )
        assert confirmable >= self.confirmed, "the confirmable position moved backwards"
        assert confirmable <= self._bound(), (
            f"confirmable {confirmable} is past an unacknowledged event (bound {self._bound()})"
        )
        self.confirmed = confirmable

    @precondition(lambda self: not self.stopped)
    @rule()
    def loop_turn(self) -> None:
        # As the session's loop does: failures are dealt with before advancing.
        if any(a.failed for a in self.arrivals):
            self.resolve_failures()
        self.advance()
        assert not self.stopped

    @precondition(lambda self: not self.stopped)
    @rule()
    def acknowledge_everything(self) -> None:
        for arrival in self._unacked():
            assert arrival.group is not None
            arrival.group.ack(None, None)
            arrival.acked = True
        if any(a.failed for a in self.arrivals):
            with pytest.raises(DeliveryError):
                self.window.advance()
            self.stopped = True
            return
        last = max([self.initial, *(a.lsn for a in self.arrivals)])
        assert self.window.advance() == last
        self.confirmed = last
        assert len(self.window) == 0
        assert self.window.oldest_commit() is None
        # Every event was counted once as published, no more.
        events = sum(a.group is not None for a in self.arrivals)
        assert sum(g.size for g in self.retired) == events
        assert len({id(g) for g in self.retired}) == len(self.retired)

    @precondition(lambda self: self.stopped)
    @rule()
    def advance_after_a_failure(self) -> None:
        # The failed event is never skipped: the window stays stopped.
        with pytest.raises(DeliveryError):
            self.window.advance()
        assert self.window.confirmable <= self._bound()

    @invariant()
    def confirmable_is_bounded(self) -> None:
        if not self.stopped:
            assert self.window.confirmable <= self._bound()

    @invariant()
    def the_oldest_commit_is_that_of_the_first_event_still_waiting(self) -> None:
        retired = {id(g) for g in self.retired}
        waiting = [a for a in self.arrivals if a.group is not None and id(a.group) not in retired]
        assert self.window.oldest_commit() == (f"t{waiting[0].lsn}" if waiting else None)


TestAckWindow = AckWindowMachine.TestCase
TestAckWindow.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# -- the saga state machine --------------------------------------------------------

KINDS = ("remote", "remote+undo", "local", "local+undo")
#: Steps done by the transaction that started the saga: only undone, and first.
AT_START = ("at-start+undo", "at-start+remote-undo")


def _noop(conn: Any, data: dict[str, Any]) -> None:
    return None


def build_step(index: int, kind: str, tries: int, undo_tries: int) -> Step:
    name = f"S{index}"
    undo_retry = RetryPolicy(max_attempts=undo_tries)
    if kind.startswith("local"):
        return Step(
            name,
            action=_noop,
            compensate=_noop if kind == "local+undo" else None,
            compensation_retry=undo_retry,
        )
    at_start = kind.startswith("at-start")
    if kind == "at-start+undo":
        return Step(name, compensate=_noop, compensation_retry=undo_retry)
    undo = kind in ("remote+undo", "at-start+remote-undo")
    return Step(
        name,
        command=None if at_start else Command(f"{name}-commands", f"Do{name}", "key"),
        reply_topic=f"{name}-replies",
        success=() if at_start else (f"{name}Done",),
        failure=() if at_start else (f"{name}Refused",),
        compensation=Command(f"{name}-commands", f"Undo{name}", "key") if undo else None,
        compensated=(f"{name}Undone",) if undo else (),
        compensation_failed=(f"{name}UndoRefused",) if undo else (),
        timeout_s=5,
        retry=RetryPolicy(max_attempts=tries),
        compensation_retry=undo_retry,
    )


definitions = st.tuples(
    st.lists(
        st.tuples(st.sampled_from(AT_START), st.just(1), st.integers(min_value=1, max_value=3)),
        max_size=2,
    ),
    st.lists(
        st.tuples(
            st.sampled_from(KINDS),
            st.integers(min_value=1, max_value=4),
            st.integers(min_value=1, max_value=3),
        ),
        min_size=1,
        max_size=5,
    ),
).map(
    lambda parts: Saga(
        "random", tuple(build_step(i, *spec) for i, spec in enumerate(parts[0] + parts[1]))
    )
)

#: What a reply of each type suffix means to the step it names.
REPLY_KINDS = {
    "Done": "success",
    "Refused": "failure",
    "Undone": "compensated",
    "UndoRefused": "compensation_failed",
}


def actions(effects: list[Any], defn: Saga) -> list[tuple[str, int]]:
    """The effects that make something happen: ("do" | "undo", step index)."""
    index = {s.name: i for i, s in enumerate(defn.steps)}
    out = []
    for e in effects:
        if isinstance(e, SendCommand):
            out.append(("undo" if "compensates" in e.headers else "do", index[e.step]))
        elif isinstance(e, RunLocal):
            out.append(("undo" if e.compensation else "do", index[e.step]))
    return out


class SagaMachine(RuleBasedStateMachine):
    """A random saga driven by replies (expected, unexpected, late), timeouts
    and local results, the way the orchestrator drives it: a local result
    right after the local action was asked for, nothing else in between.

    Alongside, which steps took effect (a success) or may have (given up on
    while unanswered): those, and only those, are what compensation undoes.
    """

    @initialize(defn=definitions)
    def start(self, defn: Saga) -> None:
        self.defn = defn
        self.now = 0.0
        self.performed: list[int] = []  # steps that took effect, or may have
        self.plan: list[int] | None = None  # the compensation run, once it starts
        self.undone: list[int] = []  # compensations confirmed
        self.undo_order: list[int] = []  # compensations requested, resends collapsed
        self.do_order: list[int] = []  # commands and actions, resends collapsed
        self.last: tuple[str, int] = ("do", 0)
        self.local_pending = False
        # Steps done at start took effect with the transaction that started the saga.
        at_start = [i for i, s in enumerate(defn.steps) if s.done_at_start]
        self.performed.extend(at_start)
        self.do_order.extend(at_start)
        self.state, effects = saga.start(defn, "s1", {"key": "k"}, self.now)
        self._observe(effects)

    def _observe(self, effects: list[Any]) -> list[tuple[str, int]]:
        done = actions(effects, self.defn)
        assert len(done) <= 1, f"one transition, one thing to do: {done}"
        self.local_pending = any(isinstance(e, RunLocal) for e in effects)
        for kind, index in done:
            self.last = (kind, index)
            order = self.undo_order if kind == "undo" else self.do_order
            if not order or order[-1] != index:
                order.append(index)
        if self.state.status == saga.COMPENSATING and self.plan is None:
            # Compensation starts: every step that took effect, latest first.
            self.plan = [i for i in sorted(self.performed, reverse=True)
                         if self.defn.steps[i].compensable]  # fmt: skip
        if self.state.status == saga.COMPENSATED and self.plan is None:
            self.plan = []  # nothing had to be undone
        return done

    def _terminal(self) -> bool:
        return self.state.status in saga.TERMINAL

    # -- inputs --

    @precondition(lambda self: not self.local_pending)
    @rule(step=st.integers(min_value=0, max_value=4), suffix=st.sampled_from(sorted(REPLY_KINDS)))
    def reply(self, step: int, suffix: str) -> None:
        self._reply(step % len(self.defn.steps), suffix)

    @precondition(lambda self: not self.local_pending)
    @rule(suffix=st.sampled_from(["Done"] * 4 + ["Refused"] + ["Undone"] * 4 + ["UndoRefused"]))
    def reply_to_the_last_command(self, suffix: str) -> None:
        # Most replies answer the command last sent: runs get long.
        self._reply(self.last[1], suffix)

    def _reply(self, index: int, suffix: str) -> None:
        kind = REPLY_KINDS[suffix]
        before = self.state
        self.now += 1
        reply = Reply(f"S{index}{suffix}", {}, {"saga_id": "s1"}, f"m{self.now}")
        self.state, effects = saga.on_reply(self.defn, before, reply, self.now)
        step = self.defn.steps[index]
        waits_for_it = not self._was_terminal(before) and before.step == index
        if waits_for_it and before.status == saga.RUNNING and step.command is not None:
            if kind == "success":
                self.performed.append(index)
                done = self._observe(effects)
                if index + 1 < len(self.defn.steps):
                    assert done == [("do", index + 1)]
                else:
                    assert self.state.status == saga.COMPLETED and done == []
                return
            if kind == "failure":  # the refused step did nothing: not undone
                self._observe(effects)
                assert self.state.status in (saga.COMPENSATING, saga.COMPENSATED)
                return
        if waits_for_it and before.status == saga.COMPENSATING and step.compensation is not None:
            if kind == "compensated":
                self.undone.append(index)
                self._observe(effects)
                return
            if kind == "compensation_failed":  # tried again when the deadline passes
                assert self._observe(effects) == []
                assert self.state.status == saga.COMPENSATING and self.state.step == index
                return
        assert self.state == before, f"an unexpected {reply.type} changed the saga"
        assert self._observe(effects) == []

    @staticmethod
    def _was_terminal(state: saga.SagaState) -> bool:
        return state.status in saga.TERMINAL

    @precondition(lambda self: not self.local_pending)
    @rule()
    def unrelated_reply(self) -> None:
        before = self.state
        self.now += 1
        reply = Reply("SomethingElse", {}, {"saga_id": "s1"}, f"m{self.now}")
        self.state, effects = saga.on_reply(self.defn, before, reply, self.now)
        assert self.state == before
        assert self._observe(effects) == []

    @precondition(lambda self: not self.local_pending)
    @rule(elapsed=st.sampled_from([5, 60, 400]))
    def timeout(self, elapsed: float) -> None:
        before = self.state
        self.now += elapsed
        self.state, effects = saga.on_timeout(self.defn, before, self.now)
        if self._was_terminal(before):
            assert self.state == before
            assert self._observe(effects) == []
            return
        was = self.last
        if before.status == saga.RUNNING and self.state.status != saga.RUNNING:
            # Given up unanswered: whether the command took effect is unknown.
            self.performed.append(before.step)
        done = self._observe(effects)
        if self.state.status == before.status and self.state.step == before.step:
            assert done == [was], "a timeout resends what the step waits for"
        elif before.status == saga.COMPENSATING:
            assert self.state.status == saga.FAILED and done == []
        else:
            assert self.state.status in (saga.COMPENSATING, saga.COMPENSATED)

    @precondition(lambda self: self.local_pending)
    @rule(ok=st.sampled_from([True] * 4 + [False]))
    def local_result(self, ok: bool) -> None:
        before = self.state
        self.now += 1
        self.state, effects = saga.on_local_result(
            self.defn, before, {"x": 1} if ok else None, None if ok else "refused", self.now
        )
        if before.status == saga.RUNNING and ok:
            self.performed.append(before.step)
        if before.status == saga.COMPENSATING and ok:
            self.undone.append(before.step)
        done = self._observe(effects)
        if before.status == saga.COMPENSATING and not ok:
            assert done == []
            assert self.state.status in (saga.COMPENSATING, saga.FAILED)

    @precondition(lambda self: self.state.status in saga.TERMINAL)
    @rule(error=st.sampled_from([None, "late"]))
    def local_result_after_the_end(self, error: str | None) -> None:
        after, effects = saga.on_local_result(self.defn, self.state, None, error, self.now)
        assert after == self.state
        assert actions(effects, self.defn) == []

    # -- properties --

    @invariant()
    def terminal_states_absorb(self) -> None:
        if self._terminal():
            for step in range(len(self.defn.steps)):
                for suffix in REPLY_KINDS:
                    reply = Reply(f"S{step}{suffix}", {}, {"saga_id": "s1"}, "late")
                    after, effects = saga.on_reply(self.defn, self.state, reply, self.now + 1)
                    assert after == self.state
                    assert actions(effects, self.defn) == []
            after, effects = saga.on_timeout(self.defn, self.state, self.now + 1e6)
            assert after == self.state
            assert actions(effects, self.defn) == []

    @invariant()
    def steps_run_in_order_and_none_after_a_failure(self) -> None:
        assert self.do_order == list(range(len(self.do_order)))
        # At most one step past those that took effect: the one under way,
        # or the one that failed.
        assert len(self.do_order) - len(self.performed) in (0, 1)

    @invariant()
    def compensation_undoes_what_took_effect_latest_first_each_once(self) -> None:
        if self.plan is None:
            assert self.undo_order == []
            return
        # Requested in the plan's order (repeats of one request aside), and
        # confirmed in that order too.
        assert self.undo_order == self.plan[: len(self.undo_order)], (self.undo_order, self.plan)
        assert self.undone == self.plan[: len(self.undone)], (self.undone, self.plan)

    @invariant()
    def ends_say_what_happened(self) -> None:
        if self.state.status == saga.COMPLETED:
            assert self.performed == list(range(len(self.defn.steps)))
            assert self.undo_order == []
        elif self.state.status == saga.COMPENSATED:
            assert self.plan is not None
            assert self.undone == self.plan == self.undo_order
        elif self.state.status == saga.FAILED:
            assert self.plan is not None
            assert len(self.undone) < len(self.plan), "failed, yet everything was undone"


TestSagaMachine = SagaMachine.TestCase
TestSagaMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_a_local_result_after_completion_changes_nothing() -> None:
    defn = Saga("one", (build_step(0, "local", 1, 1),))
    state, _ = saga.start(defn, "s1", {"key": "k"}, 0)
    state, _ = saga.on_local_result(defn, state, None, None, 0)
    assert state.status == saga.COMPLETED
    after, effects = saga.on_local_result(defn, state, None, None, 1)
    assert after == state
    assert actions(effects, defn) == []
