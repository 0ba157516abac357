"""Configuration files: one loader at the edge, TOML plus ``WALSAGA_*`` overrides.

Every key of a file can also come from the environment:
``WALSAGA_<TABLE>__<KEY>`` sets ``[table] key`` (``WALSAGA_RELAY__HTTP_PORT=9200``);
in a pass-through table such as ``[kafka]``, underscores become dots
(``WALSAGA_KAFKA__BOOTSTRAP_SERVERS`` sets ``"bootstrap.servers"``); in an array
of tables such as ``[[source]]``, the element is picked by its ``name``
(``WALSAGA_SOURCE__CUSTOMERS__DSN``). Values are read as TOML when they parse
(numbers, booleans) and as strings otherwise. Errors name the key and the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from relay.errors import ConfigError

ENV_PREFIX = "WALSAGA_"

M = TypeVar("M", bound=BaseModel)


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env(
    data: dict[str, Any],
    environ: Mapping[str, str],
    *,
    passthrough: frozenset[str] = frozenset({"kafka"}),
    tables: frozenset[str] | None = None,
) -> list[str]:
    """Apply ``WALSAGA_*`` overrides to `data` in place; return the variables used.

    Only `tables` are considered (when given): one environment can then hold
    the settings of several walsaga programs without one tripping another.
    """
    used = []
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        parts = var[len(ENV_PREFIX) :].split("__")
        table, rest = parts[0].lower(), parts[1:]
        if not rest or not all(rest):
            continue
        if tables is not None and table not in tables:
            continue
        value = _env_value(raw)
        current = data.get(table)
        if isinstance(current, list):
            if len(rest) < 2:
                continue
            name = rest[0].lower()
            element = next(
                (
                    e
                    for e in current
                    if isinstance(e, dict) and str(e.get("name", "")).lower() == name
                ),
                None,
            )
            if element is None:
                raise ConfigError(f"{var}: no [[{table}]] named {rest[0].lower()!r} to override")
            _set(element, [r.lower() for r in rest[1:]], value)
        elif table in passthrough:
            data.setdefault(table, {})[".".join(rest).lower().replace("_", ".")] = value
        else:
            target = data.setdefault(table, {})
            if not isinstance(target, dict):
                continue
            _set(target, [r.lower() for r in rest], value)
        used.append(var)
    return used


def _set(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def load(
    path: str | Path | None,
    model: type[M],
    *,
    environ: Mapping[str, str] | None = None,
    passthrough: frozenset[str] = frozenset({"kafka"}),
) -> M:
    """Read `path` (or only the environment when None) into `model`."""
    where = str(path) if path is not None else "environment"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{where}: no such file") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{where}: not valid TOML: {e}") from e
    apply_env(
        data,
        os.environ if environ is None else environ,
        passthrough=passthrough,
        tables=frozenset(model.model_fields),
    )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe(e, data)}") from e


def describe(error: ValidationError, data: Any = None) -> str:
    """One line per problem: ``relay.http_port: Input should be a valid integer``."""
    lines = []
    for problem in error.errors():
        parts: list[str] = []
        node = data
        for loc in problem["loc"]:
            if isinstance(loc, int) and isinstance(node, list) and loc < len(node):
                node = node[loc]
                name = node.get("name") if isinstance(node, dict) else None
                parts[-1] = f"{parts[-1]}[{name!r}]" if name else f"{parts[-1]}[{loc}]"
                continue
            parts.append(str(loc))
            node = node.get(loc) if isinstance(node, dict) else None
        key = ".".join(parts) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Strict):
    """One source database and the slot the relay reads it through."""

    name: str
    dsn: str
    slot: str | None = None
    topic_template: str | None = None

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


class RelaySettings(_Strict):
    """The ``[relay]`` table."""

    topic_template: str = "{aggregatetype}"
    http_host: str = "0.0.0.0"
    http_port: int | None = Field(default=9108, ge=0, le=65535)
    #: How often the confirmed position is reported to Postgres while events flow.
    feedback_interval_s: float = Field(default=0.01, gt=0, le=10)
    #: A position-only message is written after this long without any event.
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    #: How often a standby instance tries to take over the slot.
    standby_retry_s: float = Field(default=1.0, gt=0)
    #: Published outbox rows are deleted after this long (0: at once).
    outbox_retention_s: float = Field(default=3600.0, ge=0)
    cleanup_interval_s: float = Field(default=10.0, gt=0)
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


TEMPLATE_FIELDS = frozenset({"aggregatetype", "type", "source"})


def check_topic_template(template: str) -> None:
    import string

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


class RelayConfig(_Strict):
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
        return source.topic_template or self.relay.topic_template


def load_relay_config(
    path: str | Path | None, environ: Mapping[str, str] | None = None
) -> RelayConfig:
    return load(path, RelayConfig, environ=environ)
