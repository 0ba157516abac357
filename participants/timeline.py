"""What a saga's records mean, and its timeline across services. Pure: no I/O.

The tracker turns each Kafka record into an :class:`Entry`: which saga it
belongs to (its correlation id, by ``saga_id`` header or a configured header
or payload field), the saga's type when the record tells it, whether it is a
command, a compensation or an event, and the status it implies under the
rules of that type (an end event ends the saga, a compensation makes it
COMPENSATING). How an entry is folded into the saga's summary is the store's
business (:mod:`participants.tracker_store`), done in one statement so that
concurrent trackers agree.

For reading, :func:`timeline` merges a saga's entries with its
orchestrator's log (when it has one) into :class:`Line` s: one per message,
with the service that sent it and the one that reacted, and one per log
entry that no message shows (retries, timeouts, local steps, compensations,
operators' actions).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson

from participants.message import Message, UnreadableMessageError

RUNNING = "RUNNING"
COMPENSATING = "COMPENSATING"
COMPLETED = "COMPLETED"
COMPENSATED = "COMPENSATED"
FAILED = "FAILED"
RESOLVED = "RESOLVED"
STATUSES = (RUNNING, COMPENSATING, COMPLETED, COMPENSATED, FAILED, RESOLVED)
ENDED = frozenset({COMPLETED, COMPENSATED, FAILED, RESOLVED})

COMMAND = "command"
COMPENSATION = "compensation"
EVENT = "event"

#: Largest payload kept in a timeline as it is; larger ones are summarised.
MAX_PAYLOAD_BYTES = 64 * 1024

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


# -- rules -------------------------------------------------------------------


@dataclass(frozen=True)
class SagaRules:
    """What the tracker knows of one saga type."""

    type: str
    deadline_s: float
    started_by: frozenset[str] = frozenset()
    completed_by: frozenset[str] = frozenset()
    compensated_by: frozenset[str] = frozenset()
    failed_by: frozenset[str] = frozenset()
    compensations: frozenset[str] = frozenset()

    def outcome(self, event_type: str | None) -> str | None:
        """The status a saga of this type ends with on `event_type`, if it ends it."""
        if event_type in self.completed_by:
            return COMPLETED
        if event_type in self.compensated_by:
            return COMPENSATED
        if event_type in self.failed_by:
            return FAILED
        return None

    @property
    def known_types(self) -> frozenset[str]:
        return (self.started_by | self.completed_by | self.compensated_by | self.failed_by
                | self.compensations)  # fmt: skip


@dataclass(frozen=True)
class Correlation:
    """Where a record's saga id is: a header, or a payload field."""

    place: str  # "header" or "payload"
    name: str

    @classmethod
    def parse(cls, text: str) -> Correlation:
        place, _, name = text.partition(":")
        if place not in ("header", "payload") or not name:
            raise ValueError(f"{text!r}: write 'header:NAME' or 'payload:FIELD'")
        return cls(place, name)

    def find(self, message: Message) -> str | None:
        if self.place == "header":
            return message.headers.get(self.name) or None
        try:
            value = message.field(self.name)
        except UnreadableMessageError:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            return None
        return str(value) or None


@dataclass(frozen=True)
class Rules:
    """The tracker's rules: how records are correlated, and each saga type's."""

    correlate_by: tuple[Correlation, ...] = (Correlation("header", "saga_id"),)
    sagas: Mapping[str, SagaRules] = field(default_factory=dict)
    default_deadline_s: float = 600.0

    def rules_for(self, saga_type: str | None) -> SagaRules | None:
        return self.sagas.get(saga_type) if saga_type else None

    def deadline_s(self, saga_type: str | None) -> float:
        rules = self.rules_for(saga_type)
        return rules.deadline_s if rules is not None else self.default_deadline_s

    def saga_id(self, message: Message) -> str | None:
        for correlation in self.correlate_by:
            found = correlation.find(message)
            if found:
                return found
        return None

    def saga_type(self, message: Message) -> str | None:
        """The record's saga type: its ``saga_type`` header, else the one type
        whose configured events include the record's type."""
        declared = message.headers.get("saga_type")
        if declared:
            return declared
        if message.type is None:
            return None
        starting = [r.type for r in self.sagas.values() if message.type in r.started_by]
        if len(starting) == 1:
            return starting[0]
        mentioning = [r.type for r in self.sagas.values() if message.type in r.known_types]
        return mentioning[0] if len(mentioning) == 1 else None


# -- entries -----------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One record of a saga, as the tracker keeps it."""

    saga_id: str
    event_id: str
    at: datetime
    type: str | None
    kind: str  # COMMAND, COMPENSATION or EVENT
    source: str | None
    topic: str
    partition: int
    offset: int
    key: str | None
    headers: Mapping[str, str]
    payload: Any
    #: Filled when recording: the saga type the record tells, and the status it implies.
    saga_type: str | None = None
    status: str = RUNNING

    @property
    def step(self) -> str | None:
        return self.headers.get("saga_step")

    @property
    def lsn(self) -> str | None:
        return self.headers.get("lsn")

    @property
    def ends(self) -> bool:
        return self.status in ENDED

    @property
    def trace_id(self) -> str | None:
        return trace_id(self.headers)


def trace_id(headers: Mapping[str, str]) -> str | None:
    """The W3C trace id of a ``traceparent`` header, when there is a valid one."""
    match = _TRACEPARENT.match(headers.get("traceparent", "").strip().lower())
    if match is None or match.group(1) == "0" * 32:
        return None
    return match.group(1)


def kind_of(message: Message, rules: SagaRules | None) -> str:
    if message.headers.get("compensates") or (
        rules is not None and message.type in rules.compensations
    ):
        return COMPENSATION
    if message.headers.get("idempotency_key"):
        return COMMAND
    return EVENT


def payload_of(message: Message) -> Any:
    """The record's value as a timeline keeps it: JSON as is, anything else described."""
    if message.value is not None and len(message.value) > MAX_PAYLOAD_BYTES:
        return {"walsaga.truncated": True, "size_bytes": len(message.value)}
    kept = message.value_for_dead_letter()
    return kept["value"] if kept.get("encoding") == "json" else kept


def entry_of(message: Message, rules: Rules, at: datetime) -> Entry | None:
    """What `message` means for its saga (None: it belongs to none)."""
    saga_id = rules.saga_id(message)
    if saga_id is None:
        return None
    saga_type = rules.saga_type(message)
    saga_rules = rules.rules_for(saga_type)
    kind = kind_of(message, saga_rules)
    outcome = saga_rules.outcome(message.type) if saga_rules is not None else None
    status = outcome or (COMPENSATING if kind == COMPENSATION else RUNNING)
    return Entry(
        saga_id=saga_id,
        event_id=message.id,
        at=at,
        type=message.type,
        kind=kind,
        source=message.headers.get("source"),
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        headers=dict(message.headers),
        payload=payload_of(message),
        saga_type=saga_type,
        status=status,
    )


# -- the timeline ------------------------------------------------------------


@dataclass(frozen=True)
class LogEntry:
    """One row of an orchestrator's ``walsaga.saga_log``."""

    seq: int
    at: datetime
    kind: str
    step: str | None
    detail: Mapping[str, Any]


#: Log entries about compensating (drawn as compensations).
_COMPENSATION_LOG = frozenset({"COMPENSATING", "COMPENSATED_STEP", "COMPENSATION_ERROR",
                               "COMPENSATED", "ABORTED"})  # fmt: skip
#: Reply outcomes that answer a compensation.
_COMPENSATION_OUTCOMES = frozenset({"compensated", "compensation refused"})


@dataclass(frozen=True)
class Line:
    """One line of a saga's timeline: a message (an arrow) or a log entry (a note)."""

    at: datetime
    title: str
    lane: str  # the service that sent the message, or the orchestrator for a note
    target: str | None = None  # the service that reacted to the message, if seen
    step: str | None = None
    compensation: bool = False
    outcome: str | None = None  # how the orchestrator took a reply
    note: str = ""
    entry: Entry | None = None
    log: LogEntry | None = None

    @property
    def is_message(self) -> bool:
        return self.entry is not None


def _describe(log: LogEntry) -> str:
    detail = dict(log.detail)
    parts = []
    for key in ("outcome", "reason", "error", "attempt", "waited_s", "type", "by", "note", "why"):
        if detail.get(key) not in (None, ""):
            parts.append(f"{key} {detail[key]}")
    return ", ".join(parts)


def lanes_of(entries: Iterable[Entry], orchestrator_lane: str | None) -> list[str]:
    """The services a timeline crosses: the orchestrator first, then in order of appearance."""
    lanes: list[str] = [orchestrator_lane] if orchestrator_lane else []
    for entry in sorted(entries, key=lambda e: e.at):
        lane = entry.source or entry.topic
        if lane not in lanes:
            lanes.append(lane)
    return lanes


def _targets(entries: Sequence[Entry], orchestrator_lane: str | None) -> dict[str, str | None]:
    """For each message, the service seen reacting to it.

    A record naming it as its ``causation_id`` says so; else, in an
    orchestrated saga, whatever another service sends answers the
    orchestrator, and what the orchestrator sends other than commands (an
    announcement) goes to nobody in particular; else it is the next service
    heard from.
    """
    caused_by: dict[str, str] = {}
    for entry in entries:
        cause = entry.headers.get("causation_id")
        if cause and entry.source:
            caused_by.setdefault(cause, entry.source)
    found: dict[str, str | None] = {}
    for i, entry in enumerate(entries):
        lane = entry.source or entry.topic
        target = caused_by.get(entry.event_id)
        if target is None and orchestrator_lane:
            if lane != orchestrator_lane:
                target = orchestrator_lane
            elif entry.kind == EVENT:
                found[entry.event_id] = None
                continue
        if target is None:
            target = next(
                ((e.source or e.topic) for e in entries[i + 1 :] if (e.source or e.topic) != lane),
                None,
            )
        found[entry.event_id] = target if target != lane else None
    return found


def timeline(
    entries: Iterable[Entry],
    log: Iterable[LogEntry] = (),
    *,
    orchestrator_lane: str | None = None,
) -> list[Line]:
    """A saga's messages and its orchestrator's log, merged in time order."""
    messages = sorted(entries, key=lambda e: (e.at, e.topic, e.partition, e.offset))
    targets = _targets(messages, orchestrator_lane)
    by_id = {e.event_id: e for e in messages}
    outcomes: dict[str, str] = {}
    sent: dict[str, int] = {}
    for entry in messages:
        key = entry.headers.get("idempotency_key")
        if entry.kind != EVENT and key:
            sent[key] = sent.get(key, 0) + 1
    notes: list[Line] = []
    lane = orchestrator_lane or "orchestrator"
    for row in log:
        detail = dict(row.detail)
        if row.kind == "REPLY" and detail.get("message_id") in by_id:
            outcomes[str(detail["message_id"])] = str(detail.get("outcome", ""))
            continue
        if row.kind == "COMMAND" and sent.get(str(detail.get("key")), 0) > 0:
            sent[str(detail["key"])] -= 1  # the message itself is on the timeline
            continue
        compensation = row.kind in _COMPENSATION_LOG or bool(detail.get("compensation"))
        if row.kind == "COMMAND":
            title = f"{detail.get('type', 'command')} (sent; not seen on Kafka)"
        else:
            title = row.kind.replace("_", " ").lower()
        notes.append(Line(row.at, title, lane, step=row.step, compensation=compensation,
                          note=_describe(row), log=row))  # fmt: skip
    lines: list[Line] = []
    for entry in messages:
        outcome = outcomes.get(entry.event_id)
        compensation = entry.kind == COMPENSATION or outcome in _COMPENSATION_OUTCOMES
        lines.append(
            Line(
                entry.at,
                entry.type or "(no type)",
                entry.source or entry.topic,
                target=targets.get(entry.event_id),
                step=entry.step,
                compensation=compensation,
                outcome=outcome,
                note=entry.kind if entry.kind != EVENT else "",
                entry=entry,
            )
        )
    merged = sorted([*lines, *notes], key=lambda line: line.at)
    return [_mark_retries(line, merged[:i]) for i, line in enumerate(merged)]


def _mark_retries(line: Line, before: Sequence[Line]) -> Line:
    """A command sent again (same idempotency key) says which send it is."""
    if line.entry is None or line.entry.kind == EVENT:
        return line
    key = line.entry.headers.get("idempotency_key")
    if not key:
        return line
    earlier = sum(
        1 for b in before if b.entry is not None and b.entry.headers.get("idempotency_key") == key
    )
    if earlier:
        return replace(line, note=f"{line.note}, resent ({earlier + 1}. send)".lstrip(", "))
    return line


def as_json(value: Any) -> str:
    """Pretty JSON for people (payloads, saga data)."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS,
                        default=str).decode()  # fmt: skip
