"""The identity service: a legacy service plugged into the registration saga with
no code of its own.

Three files next to this one say everything: ``schema.sql`` (its table and
procedures), ``handlers.toml`` (which command calls which procedure: run by
``walsaga participant``) and ``effects.toml`` (the calls to the identity
provider: run by ``walsaga effects``). This module only installs them and
loads them with this machine's database, broker and provider.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg

from participants.declarative import ParticipantConfig, build, load_participant_config
from participants.effects import config as effects_config
from participants.effects.metrics import EffectMetrics
from participants.effects.worker import EffectWorker
from participants.runtime import Participant
from walsaga import schema

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "schema.sql"
HANDLERS = HERE / "handlers.toml"
EFFECTS = HERE / "effects.toml"


def install(conn: psycopg.Connection[Any]) -> None:
    """walsaga's core and effects components and the legacy schema, in one transaction."""
    with conn.transaction():
        schema.apply(conn, "core")
        schema.apply(conn, "effects")
        exists = conn.execute("SELECT to_regclass('public.provider_users') IS NOT NULL").fetchone()
        if not (exists and exists[0]):
            conn.execute(SCHEMA.read_text())


def handlers(dsn: str, kafka: Mapping[str, Any], **participant: Any) -> ParticipantConfig:
    """handlers.toml with this machine's database and broker."""
    base = load_participant_config(HANDLERS)
    return base.model_copy(
        update={
            "participant": base.participant.model_copy(update={"dsn": dsn, **participant}),
            "kafka": {**base.kafka, **kafka},
        }
    )


def participant(*, dsn: str, kafka: dict[str, Any], **settings: Any) -> Participant:
    """The identity service's consumer: handlers.toml, run by the declarative runtime."""
    return build(handlers(dsn, kafka, **settings))


def effects(
    dsn: str,
    provider_url: str,
    *,
    effect: Mapping[str, Mapping[str, Any]] | None = None,
    **worker: Any,
) -> effects_config.EffectsConfig:
    """effects.toml with this machine's database and provider; `effect` changes
    some effects' settings by name (``{"create_user": {"settle_s": 4}}``)."""
    base = effects_config.load_effects_config(EFFECTS)
    changes = effect or {}
    return effects_config.EffectsConfig.model_validate(
        {
            "effects": {**base.effects.model_dump(), "dsn": dsn, **worker},
            "vars": {**base.vars, "provider": provider_url},
            "effect": [
                {**e.model_dump(exclude_none=True), **changes.get(e.name, {})} for e in base.effect
            ],
        }
    )


def effect_worker(
    dsn: str, provider_url: str, *, metrics: EffectMetrics | None = None, **settings: Any
) -> EffectWorker:
    """The identity service's effect worker (what ``walsaga effects`` runs)."""
    return effects_config.build(effects(dsn, provider_url, **settings), metrics=metrics)
