"""The relay's configuration: the shape of ``relay.toml``.

Loaded by :func:`walsaga.config.load` (TOML plus ``WALSAGA_*`` overrides):
``WALSAGA_RELAY__HTTP_PORT=9200``, ``WALSAGA_KAFKA__BOOTSTRAP_SERVERS=...``,
``WALSAGA_SOURCE__CUSTOMERS__DSN=...``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from relay.presets import DEBEZIUM_TOPIC_TEMPLATE, CloudEventsMode, CompatMode, shape_for
from relay.routing import Router
from walsaga.config import Strict, load

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


OnRefused = Literal["dead-letter", "halt"]


class SourceConfig(Strict):
    """One source database and the slot the relay reads it through."""

    name: str
    dsn: str
    slot: str | None = None
    topic_template: str | None = None
    #: What to do with an event Kafka refuses for good (default: [relay] on_refused).
    on_refused: OnRefused | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _SOURCE_NAME.match(v):
            raise ValueError("use letters, digits, '_', '.' or '-'")
        return v

    @field_validator("topic_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            check_topic_template(v)
        return v

    @field_validator("slot")
    @classmethod
    def _slot(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z0-9_]{1,63}", v):
            raise ValueError("slot names are 1-63 of a-z, 0-9 and '_'")
        return v

    @property
    def slot_name(self) -> str:
        if self.slot:
            return self.slot
        return "walsaga_" + re.sub(r"[^a-z0-9_]", "_", self.name.lower())[:55]


class RelaySettings(Strict):
    """The ``[relay]`` table."""

    topic_template: str = "{aggregatetype}"
    #: CloudEvents Kafka binding, binary mode: ce_* headers on every record.
    cloudevents: CloudEventsMode = "none"
    #: Shape records for consumers of another relay: "debezium" (its outbox event router).
    compat: CompatMode = "none"
    #: An event Kafka refuses for good (too large, invalid): report it on the
    #: dead-letter topic and go on ("dead-letter"), or stop the source there ("halt").
    on_refused: OnRefused = "dead-letter"
    dead_letter_topic: str = Field(
        default="walsaga.relay.dead-letter", pattern=r"^[A-Za-z0-9._-]{1,249}$"
    )
    http_host: str = "0.0.0.0"
    http_port: int | None = Field(default=9108, ge=0, le=65535)
    #: false (default): when nothing is in flight and the relay has caught up
    #: with the WAL, what it just read is sent at once; linger.ms then applies
    #: only under load, where it batches. true: linger.ms applies always.
    linger_when_idle: bool = False
    #: How often the confirmed position is reported to Postgres while events flow.
    feedback_interval_s: float = Field(default=0.01, gt=0, le=10)
    #: A position-only message is written after this long without any event.
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    #: How often a standby instance tries to take over the slot.
    standby_retry_s: float = Field(default=1.0, gt=0)
    #: Published outbox rows are deleted after this long (0: at once).
    outbox_retention_s: float = Field(default=3600.0, ge=0)
    cleanup_interval_s: float = Field(default=10.0, gt=0)
    #: How long a stop may take: events in flight to be acknowledged and the
    #: last position confirmed. What is not acknowledged by then is sent
    #: again by the next run (consumers drop repeats by ``id``).
    shutdown_timeout_s: float = Field(default=5.0, gt=0, le=300)
    #: Backoff bounds when Postgres or Kafka is unreachable.
    retry_min_s: float = Field(default=0.2, gt=0)
    retry_max_s: float = Field(default=10.0, gt=0)
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("topic_template")
    @classmethod
    def _template(cls, v: str) -> str:
        check_topic_template(v)
        return v

    @model_validator(mode="after")
    def _retry_bounds(self) -> RelaySettings:
        if self.retry_min_s > self.retry_max_s:
            raise ValueError("retry_min_s must not exceed retry_max_s")
        if self.cloudevents != "none" and self.compat != "none":
            raise ValueError("choose one of cloudevents and compat: their values differ")
        return self


TEMPLATE_FIELDS = frozenset({"aggregatetype", "type", "source"})


def check_topic_template(template: str) -> None:
    names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    unknown = names - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(
            f"unknown field(s) {sorted(unknown)}; use {{aggregatetype}}, {{type}} or {{source}}"
        )


#: librdkafka settings the relay relies on for its delivery guarantee.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    # Never give up on an event: a broker outage fills the queue, and a full
    # queue stops the relay reading the slot (backpressure) instead.
    "message.timeout.ms": 0,
    "linger.ms": 2,
    "batch.num.messages": 10000,
    "queue.buffering.max.messages": 100000,
    "queue.buffering.max.kbytes": 65536,
    "compression.type": "none",
}

_REQUIRED_PRODUCER = {"enable.idempotence": ("true",), "acks": ("all", "-1")}


class RelayConfig(Strict):
    """A whole ``relay.toml``."""

    kafka: dict[str, Any] = Field(default_factory=dict)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    source: list[SourceConfig] = Field(min_length=1)

    @field_validator("kafka")
    @classmethod
    def _kafka(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "bootstrap.servers" not in v:
            raise ValueError('"bootstrap.servers" is required')
        for key, allowed in _REQUIRED_PRODUCER.items():
            if key in v and str(v[key]).lower() not in allowed:
                message = f"{key!r} must stay {allowed[0]!r}: the relay's guarantee needs it"
                raise ValueError(message)
        return v

    @model_validator(mode="after")
    def _unique(self) -> RelayConfig:
        for what, values in (
            ("name", [s.name for s in self.source]),
            ("slot", [s.slot_name for s in self.source]),
        ):
            dup = {x for x in values if values.count(x) > 1}
            if dup:
                raise ValueError(f"two sources share the {what} {sorted(dup)[0]!r}")
        return self

    def producer_settings(self) -> dict[str, Any]:
        return {**PRODUCER_DEFAULTS, **self.kafka}

    def template_for(self, source: SourceConfig) -> str:
        if source.topic_template:
            return source.topic_template
        if self.relay.compat == "debezium" and "topic_template" not in self.relay.model_fields_set:
            return DEBEZIUM_TOPIC_TEMPLATE
        return self.relay.topic_template

    def router(self, source: SourceConfig) -> Router:
        """The router of `source`: its topic template and the relay's preset."""
        shape = shape_for(
            cloudevents=self.relay.cloudevents, compat=self.relay.compat, source=source.name
        )
        return Router(self.template_for(source), source.name, shape=shape)

    def on_refused(self, source: SourceConfig) -> OnRefused:
        return source.on_refused or self.relay.on_refused

    @property
    def message_max_bytes(self) -> int:
        """The producer's size limit for one record (librdkafka's default: 1,000,000)."""
        return int(self.producer_settings().get("message.max.bytes", 1_000_000))


def load_relay_config(
    path: str | Path | None, environ: Mapping[str, str] | None = None
) -> RelayConfig:
    return load(path, RelayConfig, environ=environ)
