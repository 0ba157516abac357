"""The registration example: intake, identity (legacy) and notifier over real
Postgres, relay and broker, with the identity provider and a real SMTP server."""

from __future__ import annotations

import random
import threading
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from participants.examples.registration import identity, intake, saga
from tests.registration_support import duplicating, running_registration, submission


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


@pytest.mark.slow
def test_hundreds_of_registrations_under_faults_all_end_and_everyone_agrees(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    """The provider fails (5xx before or after acting), times out and crashes after
    creating; the effect workers are killed with kill -9 at random; every record
    of the saga's topics is delivered twice."""
    rng = random.Random(10)
    with running_registration(
        tmp_path, make_database, broker, provider_process=True, workers="processes"
    ) as site:
        taken = [f"taken{i}@example.com" for i in range(5)]
        for address in taken:
            httpx.post(
                f"{site.provider.url}/users",
                json={"email": address, "name": "x", "external_key": "preexisting"},
                timeout=10,
            ).raise_for_status()
        site.provider.faults(
            error_rate=0.05,
            error_after_rate=0.05,
            timeout_rate=0.05,
            crash_rate=0.01,
            crash_every=80,
            hang_s=2.0,
            max_request_s=3.0,
        )
        stop = threading.Event()

        def kill_at_random() -> None:
            while not stop.wait(rng.uniform(2.0, 5.0)):
                worker = site.processes[rng.choice(sorted(site.processes))]
                worker.kill()
                worker.start()

        killer = threading.Thread(target=kill_at_random, daemon=True)
        expected: dict[str, str] = {}
        refused_at_intake = 0
        with duplicating(broker, list(saga.TOPICS)) as copies:
            killer.start()
            for i in range(300):
                kind = i % 20
                if kind == 0:
                    _, verdict = site.submit(submission(i, email=f"user{i}@nowhere"))
                    assert not verdict.accepted
                    refused_at_intake += 1
                    continue
                if kind == 1:
                    registration_id, _ = site.submit(submission(i, email=taken[i % 5]))
                    expected[registration_id] = "registered already"
                elif kind == 2:
                    registration_id, _ = site.submit(submission(i, email=f"u{i}@bounce.example"))
                    expected[registration_id] = "no such mailbox"
                else:
                    registration_id, _ = site.submit(submission(i))
                    expected[registration_id] = "REGISTERED"
                time.sleep(0.02)
            statuses = site.wait_ended(list(expected), timeout_s=900)
            stop.set()
            killer.join(30)
        kills = sum(p.kills for p in site.processes.values())
        assert kills >= 3 and site.provider.crashes >= 1, (kills, site.provider.crashes)
        assert sum(copies.values()) >= 4 * len(expected)
        for registration_id, outcome in expected.items():
            status = statuses[registration_id]
            if outcome == "REGISTERED":
                assert status["status"] == "REGISTERED", status
            else:
                assert status["status"] == "REFUSED" and outcome in status["reason"], status
        assert refused_at_intake == 15
        site.assert_consistent(statuses)
        assert len(site.mails()) == sum(1 for o in expected.values() if o == "REGISTERED")


@pytest.mark.slow
def test_a_provider_down_for_a_minute_delays_sagas_but_fails_none(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    with running_registration(tmp_path, make_database, broker, provider_process=True) as site:
        before = [site.submit(submission(i))[0] for i in range(3)]
        assert {s["status"] for s in site.wait_ended(before).values()} == {"REGISTERED"}
        site.provider.down()
        during = [site.submit(submission(i))[0] for i in range(10, 30)]
        time.sleep(60)
        assert {s["status"] for s in site.statuses(during).values()} == {"PENDING"}
        site.provider.up()
        statuses = site.wait_ended(during, timeout_s=180)
        assert {s["status"] for s in statuses.values()} == {"REGISTERED"}
        site.assert_consistent({**site.statuses(before), **statuses})
        attempts = site.query("identity", "SELECT max(attempts) FROM walsaga.effect")
        assert attempts[0][0] >= 5, "the calls were retried while it was down"
