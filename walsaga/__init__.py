"""walsaga: sagas across Postgres-backed microservices.

What a service author imports::

    from walsaga import BusinessError, HandlerContext, Message, Participant
    from walsaga import Command, Orchestrator, Saga, Step

The error tree and the kernel (configuration, logging, metrics, schema) live
in this package; the participant runtime and the orchestrator live in
:mod:`participants` and are re-exported here on first use, so importing the
kernel alone (as the relay does) loads none of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from walsaga.errors import (
    BusinessError,
    ConfigError,
    PermanentError,
    SetupError,
    SpecError,
    TransientError,
    WalsagaError,
)

if TYPE_CHECKING:
    from participants.handlers import HandlerContext, Route, publish
    from participants.message import Message, UnreadableMessageError
    from participants.orchestrator import Orchestrator
    from participants.runtime import Participant
    from participants.saga import Command, RetryPolicy, Saga, Step

_LAZY = {
    "HandlerContext": "participants.handlers",
    "Route": "participants.handlers",
    "publish": "participants.handlers",
    "Message": "participants.message",
    "UnreadableMessageError": "participants.message",
    "Orchestrator": "participants.orchestrator",
    "Participant": "participants.runtime",
    "Command": "participants.saga",
    "RetryPolicy": "participants.saga",
    "Saga": "participants.saga",
    "Step": "participants.saga",
}

__all__ = [
    "BusinessError",
    "Command",
    "ConfigError",
    "HandlerContext",
    "Message",
    "Orchestrator",
    "Participant",
    "PermanentError",
    "RetryPolicy",
    "Route",
    "Saga",
    "SetupError",
    "SpecError",
    "Step",
    "TransientError",
    "UnreadableMessageError",
    "WalsagaError",
    "publish",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'walsaga' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
