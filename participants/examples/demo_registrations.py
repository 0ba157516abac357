"""The demo's batch of user registrations: what it submits, how it tells the outcomes
apart, and whether the mailbox and the identity provider agree with them.

The batch ends every way a registration can: registered (the user created at
the provider, the welcome e-mail sent), refused at intake (a malformed
address: no saga starts), refused by the provider (an address registered
there beforehand), and compensated (an address whose mailbox does not exist:
the user was created, the e-mail bounced, the user was deleted again). Every
address carries the batch's tag, so a demo run with ``--keep`` never meets
the users and e-mails of an earlier one.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg

from participants.examples.registration import saga
from participants.orchestrator import saga_status

REGISTERED = "REGISTERED"
REFUSED_AT_INTAKE = "REFUSED at intake"
REFUSED_BY_PROVIDER = "REFUSED by the provider"
COMPENSATED = "COMPENSATED (user deleted)"
#: The order of the summary's rows.
OUTCOMES = (REGISTERED, REFUSED_AT_INTAKE, REFUSED_BY_PROVIDER, COMPENSATED)

#: Of every ten submissions, which end otherwise than registered (by position).
_BOUNCES, _MALFORMED, _TAKEN = {1}, {2}, {3}
_NAMES = ("Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov")
_LOCALES = ("en", "pt", "de")
_ADDRESS = re.compile(r"<?[^\s<>@:]+@[^\s<>@:]+\.[A-Za-z]{2,}>?")


@dataclass(frozen=True)
class Batch:
    """The submissions of one run, and the addresses to register at the provider first."""

    tag: str
    submissions: list[dict[str, Any]]
    taken: list[str]

    def ours(self, address: str) -> bool:
        """Whether `address` is one of this batch's (not of an earlier run's)."""
        return f"-{self.tag}-" in address or f"-{self.tag}@" in address


def batch(n: int, tag: str) -> Batch:
    """`n` submissions tagged `tag`, mixed so that every outcome shows from four on. Pure."""
    taken = f"taken-{tag}@example.com"
    submissions = []
    for i in range(n):
        name, locale = _NAMES[i % len(_NAMES)], _LOCALES[i % len(_LOCALES)]
        if i % 10 in _MALFORMED:
            email = "not-an-address"
        elif i % 10 in _TAKEN:
            email = taken
        elif i % 10 in _BOUNCES:
            email = f"user-{tag}-{i}@bounce.example"
        else:
            email = f"user-{tag}-{i}@example.com"
        submissions.append({"email": email, "name": name, "locale": locale, "accept_terms": True})
    used = any(s["email"] == taken for s in submissions)
    return Batch(tag, submissions, [taken] if used else [])


def reason_text(reason: str | None) -> str:
    """A reason as the summary groups it: its last clause, addresses left out. Pure.

    ``user-1a2b-3@bounce.example: 5.1.1 <user-1a2b-3@bounce.example>: no such
    mailbox`` becomes ``no such mailbox``."""
    text = _ADDRESS.sub("the address", reason or "")
    return text.rsplit(": ", 1)[-1].strip() or "no reason given"


def outcome_of(result: dict[str, Any]) -> str:
    """Which row of the summary a registration belongs to (its status when it did
    not end: PENDING, FAILED). Pure."""
    if result["status"] != "REFUSED":
        return str(result["status"])
    if result.get("at_intake"):
        return REFUSED_AT_INTAKE
    return COMPENSATED if result.get("user_created") else REFUSED_BY_PROVIDER


def tracker_status(result: dict[str, Any]) -> str:
    """The status the saga tracker shows for a registration once it has seen it end
    (one refused at intake ends with its one event). Pure."""
    return {"REGISTERED": "COMPLETED", "REFUSED": "COMPENSATED", "FAILED": "FAILED"}.get(
        result["status"], "RUNNING"
    )


@dataclass(frozen=True)
class Agreement:
    """The batch against the outside world: the mailbox holds one welcome e-mail per
    registered user, the provider those users and the addresses taken beforehand."""

    registered: int
    mails: int
    users: int
    taken: int

    @property
    def mails_agree(self) -> bool:
        return self.mails == self.registered

    @property
    def users_agree(self) -> bool:
        return self.users == self.registered + self.taken


# -- talking to the services ---------------------------------------------------------


class Registrations:
    """The demo's client of the intake API, the identity provider and the mail archive."""

    def __init__(
        self,
        *,
        intake_url: str,
        provider_url: str,
        archive_url: str,
        intake_dsn: str,
        http: httpx.Client,
    ) -> None:
        self.intake_url = intake_url
        self.provider_url = provider_url
        self.archive_url = archive_url
        self.intake_dsn = intake_dsn
        #: Shared by the batch's threads (a client of its own per request would
        #: load the CA bundle each time: tens of ms of CPU).
        self.http = http

    def take(self, addresses: Iterable[str]) -> None:
        """Register `addresses` at the provider directly (409: taken already, as wanted)."""
        for address in addresses:
            resp = self.http.post(f"{self.provider_url}/users",
                                  json={"email": address, "name": "x"}, timeout=10)  # fmt: skip
            if resp.status_code != 409:
                resp.raise_for_status()

    def register(
        self, submission: dict[str, Any], *, stopping: threading.Event, timeout_s: float = 60.0
    ) -> dict[str, Any]:
        """Submit one registration and follow it until it has ended (or `timeout_s`)."""
        started = time.monotonic()
        resp = self.http.post(f"{self.intake_url}/registrations", params={"wait": 30},
                              json=submission, timeout=40)  # fmt: skip
        if resp.status_code == 422:
            answer = resp.json()
            reasons = answer.get("reasons") or [{}]
            reason = "; ".join(f"{r.get('field')}: {r.get('problem')}" for r in reasons)
            return {"id": answer["id"], "status": "REFUSED", "at_intake": True,
                    "reason": reason, "latency_s": time.monotonic() - started}  # fmt: skip
        resp.raise_for_status()
        answer = resp.json()
        deadline = started + timeout_s
        while answer["status"] == "PENDING" and time.monotonic() < deadline:
            if stopping.wait(0.1):
                break
            followed = self.http.get(f"{self.intake_url}/registrations/{answer['id']}", timeout=10)
            followed.raise_for_status()
            answer = followed.json()
        return {**answer, "latency_s": time.monotonic() - started}

    def note_created_users(self, results: list[dict[str, Any]]) -> None:
        """Mark each refused registration whose saga had created the user (then deleted it)."""
        refused = [r for r in results if r["status"] == "REFUSED" and not r.get("at_intake")]
        if not refused:
            return
        with psycopg.connect(self.intake_dsn, autocommit=True) as conn:
            for result in refused:
                state = saga_status(conn, result["id"])
                result["user_created"] = bool(state and saga.provider_user_id(state.data))

    def agreement(self, found: Batch, results: list[dict[str, Any]]) -> Agreement:
        mails = self._get(f"{self.archive_url}/messages")["messages"]
        users = self._get(f"{self.provider_url}/users")["users"]
        return Agreement(
            registered=sum(1 for r in results if r["status"] == REGISTERED),
            mails=sum(m.get("copies", 1) for m in mails if found.ours(str(m.get("to", "")))),
            users=sum(1 for u in users if found.ours(str(u.get("email", "")))),
            taken=len(found.taken),
        )

    def _get(self, url: str) -> Any:
        resp = self.http.get(url, timeout=30)
        resp.raise_for_status()
        return resp.json()


def grouped(results: Iterable[dict[str, Any]]) -> list[tuple[str, list[float]]]:
    """The summary's registration rows: (outcome and reason, latencies in ms), in
    the order of :data:`OUTCOMES`. Pure."""
    rows: dict[tuple[int, str], list[float]] = {}
    for result in results:
        outcome = outcome_of(result)
        rank = OUTCOMES.index(outcome) if outcome in OUTCOMES else len(OUTCOMES)
        if outcome != REGISTERED:
            outcome += f": {reason_text(result.get('reason'))}"
        rows.setdefault((rank, outcome), []).append(result["latency_s"] * 1000)
    return [(outcome, latencies) for (_, outcome), latencies in sorted(rows.items())]
