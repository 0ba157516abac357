"""The registration saga: accept, create the user at the provider, send the welcome
e-mail, complete.

Orchestrated from the intake service's database. The welcome e-mail is the
saga's pivot: it cannot be undone, so every step before it can be
compensated (the user is deleted at the provider) and nothing after it can
fail for a business reason (``complete`` only publishes an event). Steps
whose work is an effect wait for the effect's outcome however long it takes
(``give_up_after_s = inf``): the effect worker is their clock, it retries
with forgiving backoff and always answers (done, refused, or failed with the
outcome known), so the saga never compensates a call still under way.
"""

from __future__ import annotations

import math
from typing import Any

import psycopg

from participants.handlers import publish
from participants.saga import Command, RetryPolicy, Saga, Step

NAME = "registration"
#: Intake's events: RegistrationAccepted, RegistrationRefused, RegistrationCompleted.
EVENTS = "registration"
IDENTITY_COMMANDS = "identity-commands"
IDENTITY_EVENTS = "identity"
NOTIFIER_COMMANDS = "notifier-commands"
NOTIFIER_EVENTS = "notifier"
TOPICS = (EVENTS, IDENTITY_COMMANDS, IDENTITY_EVENTS, NOTIFIER_COMMANDS, NOTIFIER_EVENTS)

CREATE_USER, USER_CREATED, USER_CREATION_FAILED = "CreateUser", "UserCreated", "UserCreationFailed"
DELETE_USER, USER_DELETED, USER_DELETION_FAILED = "DeleteUser", "UserDeleted", "UserDeletionFailed"
SEND_WELCOME, WELCOME_SENT, WELCOME_FAILED = "SendWelcome", "WelcomeSent", "WelcomeFailed"


def _user(data: dict[str, Any]) -> dict[str, Any]:
    return {k: data[k] for k in ("registration_id", "email", "name")}


def _deletion(data: dict[str, Any]) -> dict[str, Any]:
    return {"registration_id": data["registration_id"]}


def provider_user_id(data: dict[str, Any]) -> str | None:
    """The provider's id of the user, once the create-user step has succeeded."""
    created = data.get("create-user") or {}
    result = created.get("result") or {}
    value = result.get("id") if isinstance(result, dict) else None
    return str(value) if value is not None else None


def _welcome(data: dict[str, Any]) -> dict[str, Any]:
    return {
        **_user(data),
        "locale": data.get("locale", "en"),
        "provider_user_id": provider_user_id(data),
    }


def _refuse(conn: psycopg.Connection[Any], data: dict[str, Any]) -> None:
    reason = data.get("failure_reason") or "not registered"
    body = {"registration_id": data["registration_id"], "status": "REFUSED",
            "reasons": [{"field": None, "problem": reason}]}  # fmt: skip
    publish(conn, EVENTS, data["registration_id"], "RegistrationRefused", body,
            {"saga_id": data["registration_id"], "saga_type": NAME})  # fmt: skip


def _complete(conn: psycopg.Connection[Any], data: dict[str, Any]) -> None:
    body = {"registration_id": data["registration_id"], "status": "REGISTERED",
            "provider_user_id": provider_user_id(data)}  # fmt: skip
    publish(conn, EVENTS, data["registration_id"], "RegistrationCompleted", body,
            {"saga_id": data["registration_id"], "saga_type": NAME})  # fmt: skip


def registration_saga(*, timeout_s: float = 30.0, name: str = NAME) -> Saga:
    """The saga; `timeout_s` is how long a command waits before it is sent again
    (harmless: the participant's inbox performs it once)."""
    retry = RetryPolicy(backoff_max_s=120.0)
    return Saga(
        name,
        compensation_give_up_after_s=math.inf,
        steps=(
            # The registration was accepted by intake's transaction that
            # started the saga; undoing it announces the refusal.
            Step("accept", compensate=_refuse),
            Step(
                "create-user",
                command=Command(IDENTITY_COMMANDS, CREATE_USER, "registration_id", _user),
                reply_topic=IDENTITY_EVENTS,
                success=(USER_CREATED,),
                failure=(USER_CREATION_FAILED,),
                compensation=Command(IDENTITY_COMMANDS, DELETE_USER, "registration_id", _deletion),
                compensated=(USER_DELETED,),
                compensation_failed=(USER_DELETION_FAILED,),
                timeout_s=timeout_s,
                retry=retry,
                give_up_after_s=math.inf,
            ),
            # The pivot: once sent, the e-mail stays sent.
            Step(
                "send-welcome",
                command=Command(NOTIFIER_COMMANDS, SEND_WELCOME, "registration_id", _welcome),
                reply_topic=NOTIFIER_EVENTS,
                success=(WELCOME_SENT,),
                failure=(WELCOME_FAILED,),
                timeout_s=timeout_s,
                retry=retry,
                give_up_after_s=math.inf,
            ),
            # After the pivot: nothing that can fail for a business reason.
            Step("complete", action=_complete),
        ),
    )


REGISTRATION = registration_saga()
