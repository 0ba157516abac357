"""The registration example: intake, identity (legacy) and notifier over real
Postgres, relay and broker, with the identity provider and a real SMTP server."""

from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

from participants.examples.registration import identity, intake, saga
from tests.registration_support import running_registration, submission


def test_intake_cleans_what_it_accepts_and_says_why_it_refuses() -> None:
    verdict = intake.check(
        {
            "email": "  Ada@Example.COM ",
            "name": " Ada \t Lovelace ",
            "locale": "pt",
            "accept_terms": True,
        }
    )
    assert verdict.registration == {
        "email": "ada@example.com",
        "name": "Ada Lovelace",
        "locale": "pt",
    }
    refused = intake.check({"email": "not-an-address", "name": "  ", "locale": "xx"})
    assert not refused.accepted
    assert {(r["field"], r["problem"]) for r in refused.reasons} == {
        ("email", "not an e-mail address"),
        ("name", "required"),
        ("locale", "one of en, pt, de"),
        ("accept_terms", "the terms must be accepted"),
    }
    assert intake.check(["a list"]).reasons == [{"field": "", "problem": "send a JSON object"}]


def test_the_identity_files_use_the_names_the_saga_expects() -> None:
    handlers = tomllib.loads(identity.HANDLERS.read_text())
    assert {(h["topic"], h["type"]) for h in handlers["handler"]} == {
        (saga.IDENTITY_COMMANDS, saga.CREATE_USER),
        (saga.IDENTITY_COMMANDS, saga.DELETE_USER),
    }
    effects = {e["name"]: e for e in tomllib.loads(identity.EFFECTS.read_text())["effect"]}
    assert (effects["create_user"]["done_event"], effects["create_user"]["failed_event"]) == (
        saga.USER_CREATED,
        saga.USER_CREATION_FAILED,
    )
    assert (effects["delete_user"]["done_event"], effects["delete_user"]["failed_event"]) == (
        saga.USER_DELETED,
        saga.USER_DELETION_FAILED,
    )
    assert {e["topic"] for e in effects.values()} == {saga.IDENTITY_EVENTS}
    schema = identity.SCHEMA.read_text()
    assert "'create_user'" in schema and "'delete_user'" in schema
    assert [s.name for s in saga.REGISTRATION.steps] == [
        "accept",
        "create-user",
        "send-welcome",
        "complete",
    ]


def test_registrations_complete_or_are_refused_and_everyone_agrees(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    with running_registration(tmp_path, make_database, broker) as site:
        ids: dict[str, str] = {}
        for i in range(6):
            ids[f"ok-{i}"], verdict = site.submit(submission(i))
            assert verdict.accepted
        bad_id, bad = site.submit({"email": "nope", "name": "X", "accept_terms": True})
        assert not bad.accepted
        # The provider refuses an address it has already (HTTP 409).
        ids["taken"], _ = site.submit(submission(0, name="Someone Else"))
        # The mail server refuses the mailbox: the user is deleted again.
        ids["bounce"], _ = site.submit(submission(99, email="ghost@bounce.example"))
        statuses = site.wait_ended(list(ids.values()), timeout_s=120)
        assert {k: statuses[v]["status"] for k, v in ids.items()} == {
            **{f"ok-{i}": "REGISTERED" for i in range(6)},
            "taken": "REFUSED",
            "bounce": "REFUSED",
        }
        assert "registered already" in statuses[ids["taken"]]["reason"]
        assert "no such mailbox" in statuses[ids["bounce"]]["reason"]
        assert site.statuses([bad_id]) == {}, "refused by intake: no saga"
        site.assert_consistent(statuses)
        mails = site.mails()
        welcome = next(m for m in mails if m["X-Registration-Id"] == ids["ok-1"])
        assert welcome["To"] == "user1@example.com"
        assert welcome["Subject"] == "Bem-vindo, user 1!"
        templates = dict(
            site.query("notifier", "SELECT registration_id, template_id FROM welcome_emails")
        )
        assert templates[ids["ok-1"]] == "welcome-pt-v1"
        kinds = [k for k, _, _ in site.log(ids["bounce"])]
        assert kinds.count("COMMAND") == 3  # create, welcome, delete
        assert "COMPENSATED" in kinds
        events = Counter(
            t
            for (t,) in site.query(
                "intake", "SELECT type FROM walsaga.outbox WHERE aggregatetype = 'registration'"
            )
        )
        assert events == {
            "RegistrationAccepted": 8,
            "RegistrationRefused": 3,
            "RegistrationCompleted": 6,
        }


def test_a_step_that_keeps_failing_compensates_after_its_retries_with_the_reason(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    with running_registration(tmp_path, make_database, broker, notifier_give_up_s=3.0) as site:
        site.mail.stop()  # nothing listens for SMTP any more
        registration_id, _ = site.submit(submission(1))
        status = site.wait_ended([registration_id], timeout_s=120)[registration_id]
        assert status["status"] == "REFUSED"
        assert status["reason"].startswith("gave up after")
        assert "cannot connect to the mail server" in status["reason"]
        attempts = site.query("notifier", "SELECT attempts, status FROM walsaga.effect")
        assert attempts[0][0] >= 3 and attempts[0][1] == "FAILED"
        assert site.provider.users() == [], "the user was deleted again"
        assert site.query("identity", "SELECT count(*) FROM provider_users") == [(0,)]
