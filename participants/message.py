"""A Kafka record as a participant sees it: ids, type, correlation, payload. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import orjson

from walsaga.errors import PermanentError

#: Headers that travel from a message to the events its handler publishes.
CORRELATION_HEADERS = ("saga_id", "saga_type")


class UnreadableMessageError(PermanentError):
    """The record cannot be handled at all (not JSON, a required field missing)."""


@dataclass(frozen=True)
class Message:
    """One record: its place in Kafka, key, raw value and headers (decoded as text)."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes | None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_kafka(cls, record: Any) -> Message:
        headers = {}
        for name, raw in record.headers() or ():
            headers[name] = raw.decode("utf-8", "replace") if raw is not None else ""
        key = record.key()
        return cls(
            topic=record.topic(),
            partition=record.partition(),
            offset=record.offset(),
            key=key.decode("utf-8", "replace") if key is not None else None,
            value=record.value(),
            headers=headers,
        )

    @property
    def id(self) -> str:
        """The event id the relay put in header ``id``; the record's place otherwise."""
        return self.headers.get("id") or f"{self.topic}/{self.partition}/{self.offset}"

    @property
    def dedupe_key(self) -> str:
        """What the inbox records: a command's idempotency key, else the event id.

        A saga command sent again after a timeout keeps its idempotency key, so
        a participant performs it once however many copies arrive.
        """
        return self.headers.get("idempotency_key") or self.id

    @property
    def type(self) -> str | None:
        return self.headers.get("type")

    @property
    def saga_id(self) -> str | None:
        return self.headers.get("saga_id")

    @cached_property
    def payload(self) -> Any:
        """The value as JSON; raises :class:`UnreadableMessageError` when it is not."""
        if self.value is None:
            raise UnreadableMessageError("the record has no value")
        try:
            return orjson.loads(self.value)
        except orjson.JSONDecodeError as e:
            raise UnreadableMessageError(f"the value is not JSON: {e}") from e

    def field(self, name: str) -> Any:
        """A payload field by name ('a.b' walks into objects); UnreadableMessageError if absent."""
        node = self.payload
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                raise UnreadableMessageError(f"payload has no field {name!r}")
            node = node[part]
        return node

    def correlation(self) -> dict[str, str]:
        """Headers to carry into the events published while handling this message."""
        carried = {h: self.headers[h] for h in CORRELATION_HEADERS if h in self.headers}
        carried["causation_id"] = self.id
        return carried

    def describe(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset} type={self.type} id={self.id}"

    def value_for_dead_letter(self) -> dict[str, Any]:
        """The original value in a form an outbox payload (jsonb) can hold."""
        if self.value is None:
            return {"encoding": "none"}
        try:
            return {"encoding": "json", "value": orjson.loads(self.value)}
        except orjson.JSONDecodeError:
            pass
        try:
            return {"encoding": "text", "value": self.value.decode("utf-8")}
        except UnicodeDecodeError:
            import base64

            return {"encoding": "base64", "value": base64.b64encode(self.value).decode()}
