"""The notifier service: sends the welcome e-mail (the saga's pivot) through an effect.

``SendWelcome`` (on ``notifier-commands``) writes an effect request in the
handler's transaction; the notifier's effect worker sends the e-mail over
SMTP and, in the transaction that records it, saves the user's data with the
id of the template used (``welcome_emails``) and publishes ``WelcomeSent``.
A recipient the mail server refuses (``550``) is a business refusal:
``WelcomeFailed``, and the saga deletes the user at the provider.

SMTP has no idempotency key. The e-mail's Message-ID is derived from the
effect's key, and an unknown outcome (the connection broke after the message
was handed over, the worker died mid-call) is resolved by looking that
Message-ID up in the mail server's archive before sending again.
"""

from __future__ import annotations

import hashlib
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import psycopg

from participants.effects.http import HttpLookup, HttpRequest
from participants.effects.model import (
    CallResult,
    Done,
    Effect,
    EffectRetry,
    InDoubt,
    NotDone,
    Refused,
    Resolution,
    Target,
)
from participants.effects.worker import EffectWorker
from participants.examples.registration import saga
from participants.handlers import HandlerContext
from participants.message import Message
from participants.runtime import Participant
from walsaga import schema

TARGET = "send_welcome"
SENDER = "welcome@registration.example"

#: The welcome template of each locale (its id is saved with the user's data).
TEMPLATES = {
    "en": ("welcome-en-v3", "Welcome, {name}!", "Hello {name},\n\nyour account is ready.\n"),
    "pt": ("welcome-pt-v1", "Bem-vindo, {name}!", "Olá {name},\n\na sua conta está pronta.\n"),
    "de": ("welcome-de-v2", "Willkommen, {name}!", "Hallo {name},\n\nIhr Konto ist bereit.\n"),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS welcome_emails (
    registration_id  text        PRIMARY KEY,
    email            text        NOT NULL,
    display_name     text        NOT NULL,
    locale           text        NOT NULL,
    provider_user_id text,
    template_id      text        NOT NULL,
    message_id       text        NOT NULL,
    sent_at          timestamptz NOT NULL DEFAULT now()
);
"""


def message_id(key: str) -> str:
    """The e-mail's Message-ID (without brackets), the same for every attempt."""
    return f"{hashlib.sha256(key.encode()).hexdigest()[:32]}@registration.example"


def send_welcome(ctx: HandlerContext, message: Message) -> None:
    """``SendWelcome``: request the e-mail (nothing leaves before this commits)."""
    locale = message.payload.get("locale", "en")
    template_id = TEMPLATES.get(locale, TEMPLATES["en"])[0]
    key = f"{message.dedupe_key}/{TARGET}"
    payload = {
        **{k: message.field(k) for k in ("registration_id", "email", "name")},
        "locale": locale,
        "provider_user_id": message.payload.get("provider_user_id"),
        "template_id": template_id,
        "message_id": message_id(key),
    }
    ctx.request_effect(TARGET, payload, key=key)


@dataclass(frozen=True)
class WelcomeMail:
    """The call: one welcome e-mail over SMTP, classified by where it stopped."""

    smtp_host: str
    smtp_port: int
    sender: str = SENDER

    def compose(self, effect: Effect) -> EmailMessage:
        p = effect.payload
        template_id, subject, body = next(
            (t for t in TEMPLATES.values() if t[0] == p["template_id"]), TEMPLATES["en"]
        )
        mail = EmailMessage()
        mail["From"] = self.sender
        mail["To"] = p["email"]
        mail["Subject"] = subject.format(name=p["name"])
        mail["Message-ID"] = f"<{p['message_id']}>"
        mail["X-Registration-Id"] = p["registration_id"]
        mail["X-Template-Id"] = template_id
        mail.set_content(body.format(name=p["name"]))
        return mail

    def __call__(self, effect: Effect, timeout_s: float) -> CallResult:
        mail = self.compose(effect)
        recipient = effect.payload["email"]
        try:
            smtp = smtplib.SMTP(self.smtp_host, self.smtp_port, timeout=timeout_s)
        except OSError as e:
            return NotDone(f"cannot connect to the mail server: {e}")
        try:
            # Until the message itself is handed over, nothing can have been sent.
            try:
                smtp.ehlo_or_helo_if_needed()
                code, reply = smtp.mail(self.sender)
                if code >= 400:
                    return NotDone(f"MAIL FROM: {code} {reply.decode(errors='replace')}")
                code, reply = smtp.rcpt(recipient)
                if 500 <= code < 600:
                    return Refused(f"{recipient}: {reply.decode(errors='replace')}", f"SMTP {code}")
                if code >= 400:
                    return NotDone(f"RCPT TO: {code} {reply.decode(errors='replace')}")
            except (OSError, smtplib.SMTPException) as e:
                return NotDone(f"{type(e).__name__}: {e}")
            try:
                code, reply = smtp.data(mail.as_bytes())
            except smtplib.SMTPDataError as e:
                if 500 <= e.smtp_code < 600:
                    return Refused(f"message refused: {e.smtp_error!r}", f"SMTP {e.smtp_code}")
                return NotDone(f"DATA: {e.smtp_code} {e.smtp_error!r}", answered=True)
            except (OSError, smtplib.SMTPException) as e:
                return InDoubt(f"{type(e).__name__} while handing the message over: {e}")
            return Done({"message_id": effect.payload["message_id"], "smtp": code})
        finally:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                smtp.close()


def _saved(conn: psycopg.Connection[Any], effect: Effect, result: Any) -> None:
    """The e-mail went out: keep the user's data with the template used."""
    p = effect.payload
    conn.execute(
        """
        INSERT INTO welcome_emails (registration_id, email, display_name, locale,
                                    provider_user_id, template_id, message_id)
        VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (registration_id) DO NOTHING
        """,
        (p["registration_id"], p["email"], p["name"], p["locale"], p.get("provider_user_id"),
         p["template_id"], p["message_id"]),
    )  # fmt: skip


def target(
    *,
    smtp_host: str,
    smtp_port: int,
    archive_url: str,
    timeout_s: float = 5.0,
    settle_s: float = 5.0,
    retry: EffectRetry | None = None,
) -> Target:
    """The welcome e-mail as an effect target; the archive settles unknown outcomes."""
    lookup = HttpLookup(HttpRequest("GET", "{vars.archive}/messages/{payload.message_id}"),
                        variables={"archive": archive_url.rstrip("/")})  # fmt: skip
    return Target(
        TARGET,
        WelcomeMail(smtp_host, smtp_port),
        Resolution.LOOKUP,
        lookup=lookup,
        timeout_s=timeout_s,
        settle_s=settle_s,
        retry=retry or EffectRetry(min_s=0.5, max_s=30.0, give_up_after_s=900.0),
        topic=saga.NOTIFIER_EVENTS,
        done_event=saga.WELCOME_SENT,
        failed_event=saga.WELCOME_FAILED,
        on_done=_saved,
    )


def install(conn: psycopg.Connection[Any]) -> None:
    """The notifier's table with walsaga's core and effects components."""
    with conn.transaction():
        schema.apply(conn, "core")
        schema.apply(conn, "effects")
        conn.execute(SCHEMA)


def participant(
    *, dsn: str, kafka: dict[str, Any], name: str = "notifier", **settings: Any
) -> Participant:
    """The notifier's consumer: ``SendWelcome`` requests the e-mail."""
    service = Participant(name, dsn=dsn, kafka=kafka, **settings)
    service.on(saga.NOTIFIER_COMMANDS, saga.SEND_WELCOME, failure_topic=saga.NOTIFIER_EVENTS,
               failure_type=saga.WELCOME_FAILED)(send_welcome)  # fmt: skip
    return service


def effect_worker(
    *,
    dsn: str,
    smtp_host: str,
    smtp_port: int,
    archive_url: str,
    name: str = "notifier-effects",
    target_settings: dict[str, Any] | None = None,
    **settings: Any,
) -> EffectWorker:
    """The notifier's effect worker: sends the welcome e-mails."""
    welcome = target(smtp_host=smtp_host, smtp_port=smtp_port, archive_url=archive_url,
                     **(target_settings or {}))  # fmt: skip
    return EffectWorker(name, dsn=dsn, targets=[welcome], **settings)
