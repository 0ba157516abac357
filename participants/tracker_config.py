"""The shape of ``tracker.toml``: what the saga tracker, ``walsaga sagas`` and the console read.

One file serves the three: ``[tracker]`` (its database, the topics it
follows, how records are correlated), ``[kafka]``, one ``[[saga]]`` per saga
type (the event types that end it, its deadline), one ``[[orchestrator]]``
per orchestrator database (orchestrated sagas' state and log, the repair
actions), and for the console ``[console]`` and ``[[relay_source]]``. Loaded
by :func:`walsaga.config.load`, so every key can also come from a
``WALSAGA_*`` variable (``WALSAGA_TRACKER__DSN``,
``WALSAGA_CONSOLE__OPERATOR_TOKEN``, ``WALSAGA_ORCHESTRATOR__ORDERS__DSN``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from participants.saga import Saga
from participants.timeline import Correlation, Rules, SagaRules
from walsaga.config import Strict, load
from walsaga.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_CORRELATION = re.compile(r"^(header|payload):[A-Za-z_][A-Za-z0-9_.-]*$")


def _check_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError("use letters, digits, '_', '.' or '-'")
    return v


class TrackerSettings(Strict):
    """The ``[tracker]`` table."""

    #: Consumer group, inbox consumer and metrics label.
    name: str = "saga-tracker"
    #: The tracker's own database (timelines, saga summaries).
    dsn: str
    #: The topics whose records are saga events, commands and replies.
    topics: list[str] = Field(default_factory=list)
    #: Where a record's saga id is found, tried in order: ``header:NAME`` or
    #: ``payload:FIELD`` (``payload:order.id`` walks into objects).
    correlate_by: list[str] = Field(default_factory=lambda: ["header:saga_id"], min_length=1)
    #: Deadline of saga types without a ``[[saga]]`` entry of their own.
    deadline_s: float = Field(default=600.0, gt=0)
    #: How often orchestrator databases are read for changed sagas.
    sync_every_s: float = Field(default=1.0, gt=0)
    #: How often the stuck and failed gauges are refreshed.
    gauges_every_s: float = Field(default=5.0, gt=0)
    #: Ended sagas (and their timelines) are removed this long after they ended.
    retention_days: float = Field(default=30.0, gt=0)
    batch_size: int = Field(default=500, ge=1, le=10000)
    workers: int = Field(default=1, ge=1, le=64)
    shutdown_timeout_s: float = Field(default=5.0, gt=0, le=300)
    http_port: int | None = Field(default=None, ge=0, le=65535)
    http_host: str = "0.0.0.0"
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("correlate_by")
    @classmethod
    def _correlate_by(cls, v: list[str]) -> list[str]:
        for where in v:
            if not _CORRELATION.match(where):
                raise ValueError(f"{where!r}: write 'header:NAME' or 'payload:FIELD'")
        return v


class SagaTypeConfig(Strict):
    """One ``[[saga]]``: what ends sagas of a type, and how long they may take."""

    type: str
    #: Event types that start a saga of this type (and so tell its type when
    #: records carry no ``saga_type`` header, as in a choreography).
    started_by: list[str] = Field(default_factory=list)
    completed_by: list[str] = Field(default_factory=list)
    compensated_by: list[str] = Field(default_factory=list)
    failed_by: list[str] = Field(default_factory=list)
    #: Event and command types that are compensations (drawn as such; a saga
    #: that sees one is COMPENSATING). Commands with a ``compensates`` header
    #: are compensations without being listed.
    compensations: list[str] = Field(default_factory=list)
    #: Past this many seconds after its start without an end, a saga is stuck.
    deadline_s: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _one_outcome_each(self) -> SagaTypeConfig:
        seen: dict[str, str] = {}
        for outcome in ("completed_by", "compensated_by", "failed_by"):
            for event in getattr(self, outcome):
                if event in seen:
                    raise ValueError(f"{event!r} is in both {seen[event]} and {outcome}")
                seen[event] = outcome
        return self


class OrchestratorConfig(Strict):
    """One ``[[orchestrator]]``: a database whose ``walsaga.saga`` holds orchestrated sagas."""

    name: str
    dsn: str
    #: The relay's name for this database (its lane in diagrams); default: `name`.
    source: str | None = None
    #: Saga definitions, as ``module:attribute`` (a Saga, a list of them, or an
    #: Orchestrator): ``retry`` and ``abort`` need them to send commands.
    definitions: list[str] = Field(default_factory=list)
    #: Aggregate type (the topic, with the relay's default template) of the
    #: events that announce repair actions.
    operator_events: str = "walsaga.operator"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("definitions")
    @classmethod
    def _references(cls, v: list[str]) -> list[str]:
        for reference in v:
            if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", reference):
                raise ValueError(f"{reference!r}: write 'package.module:attribute'")
        return v

    @property
    def lane(self) -> str:
        return self.source or self.name

    def load_definitions(self) -> dict[str, Saga]:
        """Import the saga definitions named in ``definitions``, by saga type."""
        found: dict[str, Saga] = {}
        for reference in self.definitions:
            for saga in _sagas(_import(reference), reference):
                found[saga.name] = saga
        return found


class RelaySourceConfig(Strict):
    """One ``[[relay_source]]``: a source database the console reports the relay's state of."""

    name: str
    dsn: str
    #: The relay's slot (default, as the relay names it: walsaga_<name>).
    slot: str | None = None
    #: ``/healthz`` addresses of the relay instances serving it (streaming or standby).
    relay_urls: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @property
    def slot_name(self) -> str:
        if self.slot:
            return self.slot
        return "walsaga_" + re.sub(r"[^a-z0-9_]", "_", self.name.lower())[:55]


class ConsoleSettings(Strict):
    """The ``[console]`` table (``walsaga console``)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    #: Without it the console is read-only. Give it by the environment
    #: (WALSAGA_CONSOLE__OPERATOR_TOKEN), not in a file others can read.
    operator_token: str | None = Field(default=None, min_length=16)
    #: Sagas per page of the list.
    page_size: int = Field(default=50, ge=1, le=1000)
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class TrackerConfig(Strict):
    """The whole of ``tracker.toml``."""

    tracker: TrackerSettings
    kafka: dict[str, Any] = Field(default_factory=dict)
    saga: list[SagaTypeConfig] = Field(default_factory=list)
    orchestrator: list[OrchestratorConfig] = Field(default_factory=list)
    relay_source: list[RelaySourceConfig] = Field(default_factory=list)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)

    @model_validator(mode="after")
    def _unique(self) -> TrackerConfig:
        for table, names in (
            ("saga", [s.type for s in self.saga]),
            ("orchestrator", [o.name for o in self.orchestrator]),
            ("relay_source", [s.name for s in self.relay_source]),
        ):
            doubles = sorted({n for n in names if names.count(n) > 1})
            if doubles:
                raise ValueError(f"[[{table}]] named more than once: {', '.join(doubles)}")
        return self

    def orchestrator_named(self, name: str) -> OrchestratorConfig:
        for orchestrator in self.orchestrator:
            if orchestrator.name == name:
                return orchestrator
        known = ", ".join(o.name for o in self.orchestrator) or "none configured"
        raise ConfigError(f"no [[orchestrator]] named {name!r} ({known})")

    def require_kafka(self) -> None:
        if "bootstrap.servers" not in self.kafka:
            raise ConfigError('[kafka] "bootstrap.servers" is required to run the tracker')
        if not self.tracker.topics:
            raise ConfigError("[tracker] topics: name the topics the tracker follows")


def load_tracker_config(path: str | Path | None) -> TrackerConfig:
    return load(path, TrackerConfig)


def _import(reference: str) -> Any:
    module_name, _, attribute = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"definitions: cannot import {module_name!r} ({e})") from e
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"definitions: {module_name!r} has no {attribute!r}") from None
    return target


def _sagas(value: Any, reference: str) -> Iterable[Saga]:
    if isinstance(value, Saga):
        return [value]
    definitions = getattr(value, "definitions", None)  # an Orchestrator
    if isinstance(definitions, dict):
        value = list(definitions.values())
    if isinstance(value, list | tuple) and all(isinstance(v, Saga) for v in value):
        return list(value)
    raise ConfigError(
        f"definitions: {reference!r} is neither a Saga, a list of them, nor an Orchestrator"
    )


def rules_of(config: TrackerConfig) -> Rules:
    """The tracker's rules (correlation, saga types) from its configuration."""
    return Rules(
        correlate_by=tuple(Correlation.parse(c) for c in config.tracker.correlate_by),
        sagas={
            s.type: SagaRules(
                type=s.type,
                deadline_s=s.deadline_s,
                started_by=frozenset(s.started_by),
                completed_by=frozenset(s.completed_by),
                compensated_by=frozenset(s.compensated_by),
                failed_by=frozenset(s.failed_by),
                compensations=frozenset(s.compensations),
            )
            for s in config.saga
        },
        default_deadline_s=config.tracker.deadline_s,
    )
