"""Participants without code: handlers declared in a TOML file, each a SQL statement.

A legacy service joins a saga with a capture spec (its writes become events)
and one of these files (events and commands become calls of its existing
procedures). Parameters are written ``:name`` and come from the message:

- ``:field`` or ``:field.sub`` — a payload field (JSON value, bound as text
  unless it is a number, boolean or null);
- ``:header.name`` — a Kafka header (the relay's ``id``, ``type``, ``saga_id``...);
- ``:message.id``, ``:message.key``, ``:message.type``, ``:message.topic``.

``::`` casts are left alone. A missing field sends the record to the
dead-letter topic. A statement that fails with SQLSTATE class ``WS`` (or one
listed in ``business_sqlstates``) is a business failure: its effects are
rolled back and a failure event is published instead.

    [participant]
    name = "customer-service"
    dsn = "postgresql://customer@127.0.0.1/customers"
    business_sqlstates = ["P0001"]

    [kafka]
    "bootstrap.servers" = "127.0.0.1:9092"

    [[handler]]
    topic = "customer-commands"
    type = "ReserveCredit"
    sql = "CALL reserve_credit(:customer_id, :order_id, :total, :header.saga_id)"
    failure_type = "CreditReservationFailed"
    failure_topic = "customer"

    [[schedule]]
    sql = "CALL expire_credit_reservations()"
    every_s = 1.0
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import orjson
import psycopg
from pydantic import Field, field_validator

from participants.handlers import HandlerContext, Route
from participants.message import Message, UnreadableMessageError
from participants.runtime import Participant
from walsaga.config import Strict, load

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)")


def _placeholders(sql: str) -> tuple[str, list[str]]:
    """Turn ``:name`` parameters into psycopg placeholders; list the names in order."""
    names: list[str] = []
    pieces: list[str] = []
    last = 0
    for m in _PARAM.finditer(sql):
        pieces.append(sql[last : m.start()].replace("%", "%%"))
        pieces.append(f"%(p{len(names)})s")
        names.append(m.group(1))
        last = m.end()
    pieces.append(sql[last:].replace("%", "%%"))
    return "".join(pieces), names


def resolve(name: str, message: Message) -> str | None:
    """The value of parameter `name` for `message` (see the module docstring).

    Values are bound as untyped text, so Postgres casts them to whatever the
    statement needs (a procedure's numeric argument, a uuid column...).
    """
    head, _, rest = name.partition(".")
    if head == "header" and rest:
        if rest not in message.headers:
            raise UnreadableMessageError(f"no header {rest!r}")
        return message.headers[rest]
    if head == "message" and rest in ("id", "key", "type", "topic"):
        value = getattr(message, rest)
        return None if value is None else str(value)
    return as_text(message.field(name))


def as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return orjson.dumps(value).decode()


class SqlHandler:
    """Runs one statement per message with parameters taken from the message."""

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self._query, self.parameters = _placeholders(sql)

    def __call__(self, ctx: HandlerContext, message: Message) -> None:
        params = {f"p{i}": resolve(name, message) for i, name in enumerate(self.parameters)}
        ctx.execute(self._query, params)


class HandlerConfig(Strict):
    topic: str
    type: str | None = None
    sql: str
    failure_type: str | None = None
    failure_topic: str | None = None
    failure_event: bool = True

    @field_validator("sql")
    @classmethod
    def _one_statement(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty statement")
        return v


class ScheduleConfig(Strict):
    sql: str
    every_s: float = Field(gt=0)


class ParticipantSettings(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    dsn: str
    batch_size: int = Field(default=200, ge=1, le=10000)
    #: Consumer threads, each with its own connection and some of the partitions.
    workers: int = Field(default=1, ge=1, le=64)
    max_attempts: int = Field(default=5, ge=1)
    dead_letter_topic: str | None = None
    business_sqlstates: list[str] = Field(default_factory=list)
    #: How long a stop may take: the batch under way, committing offsets, leaving the group.
    shutdown_timeout_s: float = Field(default=5.0, gt=0, le=300)
    http_port: int | None = Field(default=None, ge=0, le=65535)
    http_host: str = "0.0.0.0"
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("business_sqlstates")
    @classmethod
    def _sqlstates(cls, v: list[str]) -> list[str]:
        for code in v:
            if not re.fullmatch(r"[0-9A-Z]{5}", code):
                raise ValueError(f"{code!r} is not a SQLSTATE (five digits or capitals)")
        return v


class ParticipantConfig(Strict):
    participant: ParticipantSettings
    kafka: dict[str, Any] = Field(default_factory=dict)
    handler: list[HandlerConfig] = Field(min_length=1)
    schedule: list[ScheduleConfig] = Field(default_factory=list)

    @field_validator("kafka")
    @classmethod
    def _kafka(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "bootstrap.servers" not in v:
            raise ValueError('"bootstrap.servers" is required')
        return v


def load_participant_config(path: str | Path | None) -> ParticipantConfig:
    return load(path, ParticipantConfig)


def build(config: ParticipantConfig) -> Participant:
    """A participant that runs the declared statements."""
    settings = config.participant
    participant = Participant(
        settings.name,
        dsn=settings.dsn,
        kafka=dict(config.kafka),
        batch_size=settings.batch_size,
        max_attempts=settings.max_attempts,
        dead_letter_topic=settings.dead_letter_topic,
        business_sqlstates=settings.business_sqlstates,
        workers=settings.workers,
        shutdown_timeout_s=settings.shutdown_timeout_s,
    )
    for h in config.handler:
        participant.add_route(
            Route(
                h.topic,
                h.type,
                SqlHandler(h.sql),
                failure_type=h.failure_type,
                failure_topic=h.failure_topic,
                failure_event=h.failure_event,
                transactional=True,
            )
        )
    for job in config.schedule:
        participant.every(job.every_s, _statement(job.sql), name=job.sql[:60])
    return participant


def _statement(sql: str) -> Any:
    def run(conn: psycopg.Connection[Any]) -> None:
        conn.execute(sql)

    return run
