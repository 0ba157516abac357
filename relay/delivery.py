"""What a Kafka error on one event means, and the record that reports a refused event. Pure.

Kafka can fail an event in three ways, and each asks for something different:

- **refused**: this record will never be accepted as it is (larger than the
  producer's ``message.max.bytes`` or the broker's limit, a record the broker
  rejects as invalid). Waiting does not help; the source's ``on_refused``
  policy decides: dead-letter it and let the events after it flow, or halt.
  A broker fails a whole produce batch for one such record, so a refusal
  reported by the broker is first retried alone: only a record refused on its
  own is refused for good, the others of its batch are delivered.
- **blocked**: the refusal concerns every record (authorization, a topic that
  does not exist with auto-creation off): the source halts with the reason
  and tries again now and then, so fixing the cause resumes it.
- **transient**: anything else (a broker down, a leader moving, a timeout):
  the session restarts from the slot and the event is sent again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from confluent_kafka import KafkaError

from walsaga.errors import WalsagaError

#: Default topic of the records that report refused events.
DEAD_LETTER_TOPIC = "walsaga.relay.dead-letter"

#: Header of the next event of a key after a dead-lettered one: the id of the
#: event that is missing before it.
GAP_HEADER = "walsaga.gap"


class Failure(StrEnum):
    REFUSED = "refused"
    BLOCKED = "blocked"
    TRANSIENT = "transient"


_REFUSED = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.POLICY_VIOLATION,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError._INVALID_ARG,
        KafkaError._BAD_MSG,
    }
)

_BLOCKED = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._AUTHENTICATION,
        KafkaError.INVALID_REQUIRED_ACKS,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
    }
)


def classify(code: int) -> Failure:
    """What a Kafka error code on one event means (see the module docstring)."""
    if code in _REFUSED:
        return Failure.REFUSED
    if code in _BLOCKED:
        return Failure.BLOCKED
    return Failure.TRANSIENT


@dataclass(frozen=True)
class Triage:
    """Delivery failures sorted by what they ask for, each list in the order reported."""

    blocked: list[Any]
    transient: list[Any]
    refused: list[Any]

    @property
    def next_step(self) -> Failure:
        """Halt if any is blocked, else restart if any is transient, else resend the refused."""
        if self.blocked:
            return Failure.BLOCKED
        if self.transient:
            return Failure.TRANSIENT
        return Failure.REFUSED


def triage(failures: list[tuple[Any, Any]]) -> Triage:
    """Sort (error, message) pairs of failed deliveries by :func:`classify`."""
    sorted_: dict[Failure, list[Any]] = {f: [] for f in Failure}
    for error, message in failures:
        sorted_[classify(error.code())].append((error, message))
    return Triage(sorted_[Failure.BLOCKED], sorted_[Failure.TRANSIENT], sorted_[Failure.REFUSED])


def error_name(error: Any) -> str:
    """A KafkaError's name (``MSG_SIZE_TOO_LARGE``), for logs, metrics and headers."""
    try:
        return str(error.name())
    except AttributeError:
        return type(error).__name__


@dataclass(frozen=True)
class Refused:
    """An event Kafka refused for good, with everything needed to report and replay it."""

    id: str
    topic: str
    key: str
    value: bytes
    headers: dict[str, str | bytes | None]
    lsn: int
    reason: str
    code: str

    @property
    def size(self) -> int:
        headers = sum(len(k) + len(v or b"") for k, v in self.headers.items())
        return len(self.value) + len(self.key) + headers

    @property
    def type(self) -> str:
        value = self.headers.get("type") or ""
        return value.decode() if isinstance(value, bytes) else value


def dead_letter_record(
    refused: Refused, *, topic: str, source: str, max_bytes: int
) -> tuple[str, bytes, str, dict[str, str | bytes | None]]:
    """The record that reports `refused` on the dead-letter `topic`: (topic, value, key, headers).

    The value is a JSON document with the event's id, source, position, intended
    topic and key, headers and the reason; the payload too when the whole
    stays well under `max_bytes` (the producer's limit), otherwise its size only.
    The key is the event's own key, so reports of one aggregate keep its order.
    """
    headers = {
        name: (value.decode(errors="replace") if isinstance(value, bytes) else value)
        for name, value in refused.headers.items()
    }
    document: dict[str, Any] = {
        "id": refused.id,
        "source": source,
        "lsn": headers.get("lsn"),
        "xid": headers.get("xid"),
        "topic": refused.topic,
        "key": refused.key,
        "type": refused.type,
        "headers": headers,
        "reason": refused.reason,
        "code": refused.code,
        "size_bytes": refused.size,
    }
    value = orjson.dumps(document)
    if len(value) + len(refused.value) + 64 <= max_bytes // 2:
        try:
            document["payload"] = orjson.Fragment(refused.value)
            value = orjson.dumps(document)
        except orjson.JSONEncodeError:
            document.pop("payload", None)
            document["payload_omitted"] = "not JSON"
    else:
        document["payload_omitted"] = f"{len(refused.value)} bytes, too large to include"
        value = orjson.dumps(document)
    record_headers: dict[str, str | bytes | None] = {
        "id": refused.id,
        "type": refused.type,
        "source": source,
        "walsaga.deadletter.reason": refused.reason[:1000],
        "walsaga.deadletter.code": refused.code,
        "walsaga.deadletter.topic": refused.topic,
    }
    return topic, value, refused.key, record_headers


class SourceHaltedError(WalsagaError):
    """The source stopped at an event it may not pass; it tries again now and then."""

    def __init__(self, reason: str, *, lsn: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.lsn = lsn


#: What a halted source's operator can do, by failure.
HALT_ADVICE = {
    Failure.REFUSED: (
        "The events after it wait. Fix the cause (a record too large: raise message.max.bytes "
        "in [kafka] together with the broker's message.max.bytes and the topic's "
        'max.message.bytes), or set on_refused = "dead-letter" to report it on the '
        "dead-letter topic and go on; the relay tries again every {retry_s:g}s."
    ),
    Failure.BLOCKED: (
        "Kafka refuses every event of this topic: check the relay's ACLs and credentials, or "
        "create the topic (auto-creation is off); the relay tries again every {retry_s:g}s."
    ),
}
