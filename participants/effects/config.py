"""HTTP effects declared in a TOML file, for services that add no code:
``walsaga effects --config effects.toml``.

    [effects]
    name = "identity-effects"
    dsn = "postgresql://identity@127.0.0.1/identity"

    [vars]                       # {vars.NAME} in templates; WALSAGA_VARS__PROVIDER=...
    provider = "http://127.0.0.1:8025"

    [[effect]]
    name = "create_user"         # walsaga.request_effect('create_user', ...)
    method = "POST"
    url = "{vars.provider}/users"
    body = { email = "{payload.email}", external_key = "{payload.registration_id}" }
    refusals = [409, 422]        # business refusals: a failure event, no retry
    timeout_s = 5.0
    topic = "identity"
    done_event = "UserCreated"
    failed_event = "UserCreationFailed"
    on_done = "INSERT INTO provider_users VALUES (:payload.registration_id, :result.id)"

    [effect.lookup]              # how an unknown outcome is resolved
    url = "{vars.provider}/users/external/{payload.registration_id}"

    [effect.retry]
    give_up_after_s = 900

Every effect says how an unknown outcome (a timeout, a worker that died after
sending) is resolved: ``idempotency_header`` (the provider deduplicates by
the key), ``idempotent = true`` (calling again is harmless, as a DELETE),
``[effect.lookup]``, or, knowingly, ``unknown_outcome = "resend"`` (at least
once) or ``"fail"`` (at most once). ``on_done`` / ``on_failed`` are SQL run in
the transaction that records the outcome, with ``:key``, ``:id``,
``:target``, ``:payload.FIELD``, ``:header.NAME``, ``:result``,
``:result.FIELD``, ``:reason`` and ``:code`` bound as text.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import psycopg
from pydantic import Field, field_validator, model_validator

from participants.declarative import _placeholders, as_text
from participants.effects.http import HttpCall, HttpLookup, HttpRequest, TemplateError
from participants.effects.metrics import EffectMetrics
from participants.effects.model import Effect, EffectRetry, Refused, Resolution, Target
from participants.effects.worker import EffectWorker
from walsaga.config import Strict, load
from walsaga.errors import ConfigError

_BODY_METHODS = ("POST", "PUT", "PATCH")


class WorkerSettings(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    dsn: str
    #: Calls performed at once (threads); each has its own database connection.
    concurrency: int = Field(default=8, ge=1, le=256)
    #: How often to look for due effects besides being woken by new requests.
    poll_interval_s: float = Field(default=0.5, gt=0, le=60)
    #: How long ended effects (and so their idempotency keys) are kept.
    retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    shutdown_timeout_s: float = Field(default=10.0, gt=0, le=600)
    http_port: int | None = Field(default=None, ge=0, le=65535)
    http_host: str = "0.0.0.0"
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class RequestConfig(Strict):
    method: str = "GET"
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    body: Any = None

    def request(self, *, default_body: bool) -> HttpRequest:
        body = self.body
        if body is None and default_body and self.method.upper() in _BODY_METHODS:
            body = "{payload}"
        try:
            return HttpRequest(self.method.upper(), self.url, dict(self.headers), body)
        except TemplateError as e:
            raise ValueError(str(e)) from e

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v.upper() not in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"):
            raise ValueError(f"{v!r} is not an HTTP method walsaga sends")
        return v.upper()


class LookupConfig(RequestConfig):
    #: Statuses that mean "certainly not there" (as does an empty 2xx answer).
    absent: list[int] = Field(default_factory=lambda: [404])


class RetryConfig(Strict):
    min_s: float = Field(default=1.0, gt=0)
    max_s: float = Field(default=60.0, gt=0)
    give_up_after_s: float = Field(default=900.0, gt=0)
    multiplier: float = Field(default=2.0, ge=1)

    def policy(self) -> EffectRetry:
        return EffectRetry(
            min_s=self.min_s,
            max_s=max(self.min_s, self.max_s),
            give_up_after_s=self.give_up_after_s,
            multiplier=self.multiplier,
        )


class EffectConfig(RequestConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    method: str = "POST"
    #: Statuses that are business refusals: a failure event at once, no retry.
    refusals: list[int] = Field(default_factory=lambda: [409, 422])
    #: Statuses that count as done besides 2xx (404 for a delete, say).
    done: list[int] = Field(default_factory=list)
    idempotency_header: str | None = None
    idempotent: bool = False
    lookup: LookupConfig | None = None
    unknown_outcome: Literal["resend", "fail"] | None = None
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    settle_s: float | None = Field(default=None, ge=0)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    topic: str | None = None
    done_event: str | None = None
    failed_event: str | None = None
    on_done: str | None = None
    on_failed: str | None = None

    @model_validator(mode="after")
    def _checked(self) -> EffectConfig:
        ways = [
            w
            for w, given in (
                (
                    "idempotency_header / idempotent",
                    bool(self.idempotency_header or self.idempotent),
                ),
                ("[effect.lookup]", self.lookup is not None),
                ("unknown_outcome", self.unknown_outcome is not None),
            )
            if given
        ]
        if not ways:
            raise ValueError(
                "say how an unknown outcome (a timeout, a worker that died after sending) is "
                "resolved: idempotency_header, idempotent = true, [effect.lookup], or "
                'unknown_outcome = "resend" (at least once) or "fail" (at most once)'
            )
        if len(ways) > 1:
            raise ValueError(
                f"give one way to resolve an unknown outcome, not {' and '.join(ways)}"
            )
        if (self.done_event or self.failed_event) and not self.topic:
            raise ValueError("done_event and failed_event need a topic")
        self.request(default_body=True)
        if self.lookup is not None:
            self.lookup.request(default_body=False)
        return self

    @property
    def resolution(self) -> Resolution:
        if self.idempotency_header or self.idempotent:
            return Resolution.KEY
        if self.lookup is not None:
            return Resolution.LOOKUP
        return Resolution.RESEND if self.unknown_outcome == "resend" else Resolution.FAIL

    def target(self, variables: Mapping[str, str]) -> Target:
        call = HttpCall(
            self.request(default_body=True),
            refusals=frozenset(self.refusals),
            done=frozenset(self.done),
            idempotency_header=self.idempotency_header,
            variables=variables,
        )
        lookup = None
        if self.lookup is not None:
            lookup = HttpLookup(
                self.lookup.request(default_body=False),
                absent=frozenset(self.lookup.absent),
                variables=variables,
            )
        return Target(
            self.name,
            call,
            self.resolution,
            lookup=lookup,
            timeout_s=self.timeout_s,
            settle_s=self.settle_s,
            retry=self.retry.policy(),
            topic=self.topic,
            done_event=self.done_event,
            failed_event=self.failed_event,
            on_done=SqlHook(self.on_done).done if self.on_done else None,
            on_failed=SqlHook(self.on_failed).failed if self.on_failed else None,
        )


class EffectsConfig(Strict):
    effects: WorkerSettings
    vars: dict[str, str] = Field(default_factory=dict)
    effect: list[EffectConfig] = Field(min_length=1)

    @field_validator("effect")
    @classmethod
    def _unique(cls, v: list[EffectConfig]) -> list[EffectConfig]:
        names = [e.name for e in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"effect names must be unique: {', '.join(twice)} given twice")
        return v

    def targets(self) -> list[Target]:
        return [e.target(dict(self.vars)) for e in self.effect]


def load_effects_config(path: str | Path | None) -> EffectsConfig:
    return load(path, EffectsConfig)


def build(config: EffectsConfig, *, metrics: EffectMetrics | None = None) -> EffectWorker:
    """The effect worker the file declares (`metrics`: instruments to share)."""
    s = config.effects
    return EffectWorker(
        s.name,
        dsn=s.dsn,
        targets=config.targets(),
        concurrency=s.concurrency,
        poll_interval_s=s.poll_interval_s,
        retention_s=s.retention_s,
        shutdown_timeout_s=s.shutdown_timeout_s,
        metrics=metrics,
    )


class SqlHook:
    """An ``on_done`` / ``on_failed`` statement with parameters from the effect."""

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self._query, self.parameters = _placeholders(sql)
        for name in self.parameters:
            if name.split(".")[0] not in (
                "key",
                "id",
                "target",
                "payload",
                "header",
                "result",
                "reason",
                "code",
            ):
                raise ConfigError(f"unknown parameter :{name} in {sql!r}")

    def done(self, conn: psycopg.Connection[Any], effect: Effect, result: Any) -> None:
        self._run(conn, effect, {"result": result})

    def failed(self, conn: psycopg.Connection[Any], effect: Effect, refusal: Refused) -> None:
        self._run(conn, effect, {"reason": refusal.reason, "code": refusal.code})

    def _run(self, conn: psycopg.Connection[Any], effect: Effect, extra: dict[str, Any]) -> None:
        scope: dict[str, Any] = {
            "key": effect.key,
            "id": effect.id,
            "target": effect.target,
            "payload": effect.payload,
            "header": effect.headers,
            **extra,
        }
        params = {f"p{i}": as_text(_walk(scope, name)) for i, name in enumerate(self.parameters)}
        conn.execute(self._query, params)


def _walk(scope: Mapping[str, Any], name: str) -> Any:
    node: Any = scope
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
