"""Which participants an orchestrator's sagas wait on, and which of them are down.

A participant is *known to be down* when its commands pile up unanswered
across many sagas (at least ``min_waiting``, each waiting longer than
``silence_s``) while nothing has been heard from it for ``silence_s``: a
restart, a rebalance or an outage, not a business answer. Sagas waiting on it
then keep waiting instead of giving up together, and resend at the longest
interval (see :func:`participants.saga.on_timeout`). It is *busy* when
``busy_waiting`` sagas or more wait on it while its answers keep coming: a
backlog, which a resent copy of a command would only lengthen, so nothing is
resent.

The facts come from the orchestrator's own database (``walsaga.saga``'s
``waiting_on`` and ``step_started_at``, ``walsaga.saga_participant``'s last
answer), so every orchestrator instance reaches the same view. They are read
every ``refresh_s``, and feed the waiting metrics too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Gauge


@dataclass(frozen=True)
class Waiting:
    """Sagas waiting on one participant (by the topic of its commands)."""

    topic: str
    sagas: int
    #: Sagas that have waited longer than the silence threshold.
    overdue: int
    oldest_s: float
    #: Seconds since the participant last answered any saga (None: never).
    silent_s: float | None


def is_down(waiting: Waiting, *, min_waiting: int, silence_s: float) -> bool:
    """Whether the participant behind `waiting` is known to be down. Pure."""
    silent = waiting.silent_s is None or waiting.silent_s >= silence_s
    return silent and waiting.overdue >= min_waiting


def is_busy(waiting: Waiting, *, busy_waiting: int, silence_s: float) -> bool:
    """Whether the participant answers but has a backlog: at least `busy_waiting` sagas
    wait on it while its answers keep coming (one within `silence_s`). A command
    resent then would join the backlog its first copy is in. Pure."""
    answering = waiting.silent_s is not None and waiting.silent_s < silence_s
    return answering and waiting.sagas >= busy_waiting


class Availability:
    """The orchestrator's view of its participants, refreshed from its database."""

    def __init__(
        self,
        *,
        min_waiting: int = 5,
        busy_waiting: int = 20,
        silence_s: float = 15.0,
        refresh_s: float = 2.0,
        note_every_s: float = 1.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.min_waiting = min_waiting
        self.busy_waiting = busy_waiting
        self.silence_s = silence_s
        self.refresh_s = refresh_s
        self.note_every_s = note_every_s
        self.down: frozenset[str] = frozenset()
        self.busy: frozenset[str] = frozenset()
        self.waiting: dict[str, Waiting] = {}
        self._refreshed = 0.0
        self._noted: dict[str, float] = {}
        self._known: set[str] = set()
        self._m_waiting: Gauge | None = None
        if registry is not None:
            self._m_waiting = Gauge(
                "walsaga_sagas_waiting",
                "Sagas waiting for an answer, by the topic of the participant's commands",
                ["participant"],
                registry=registry,
            )
            self._m_oldest = Gauge(
                "walsaga_sagas_waiting_oldest_seconds",
                "How long the longest-waiting saga has waited, by participant",
                ["participant"],
                registry=registry,
            )
            self._m_down = Gauge(
                "walsaga_saga_participant_down",
                "1 while a participant is known to be down (sagas wait instead of giving up)",
                ["participant"],
                registry=registry,
            )

    def answered(self, conn: psycopg.Connection[Any], topic: str) -> None:
        """The participant behind `topic` answered a saga (in `conn`'s transaction)."""
        now = time.monotonic()
        if now - self._noted.get(topic, -1e9) < self.note_every_s:
            return
        self._noted[topic] = now
        conn.execute(
            """
            INSERT INTO walsaga.saga_participant (command_topic, last_answer_at)
            VALUES (%s, now())
            ON CONFLICT (command_topic) DO UPDATE SET last_answer_at = EXCLUDED.last_answer_at
            WHERE walsaga.saga_participant.last_answer_at < EXCLUDED.last_answer_at
            """,
            (topic,),
        )

    def refresh(self, conn: psycopg.Connection[Any], *, force: bool = False) -> frozenset[str]:
        """Read who waits on whom (every ``refresh_s``); return the participants known down."""
        now = time.monotonic()
        if not force and now - self._refreshed < self.refresh_s:
            return self.down
        self._refreshed = now
        rows = conn.execute(
            """
            SELECT s.waiting_on, count(*),
                   count(*) FILTER (WHERE s.step_started_at < now() - make_interval(secs => %s)),
                   extract(epoch FROM now() - min(s.step_started_at)),
                   extract(epoch FROM now() - p.last_answer_at)
            FROM walsaga.saga s
            LEFT JOIN walsaga.saga_participant p ON p.command_topic = s.waiting_on
            WHERE s.status IN ('RUNNING', 'COMPENSATING') AND s.waiting_on IS NOT NULL
            GROUP BY s.waiting_on, p.last_answer_at
            """,
            (self.silence_s,),
        ).fetchall()
        self.update(
            Waiting(
                topic,
                int(sagas),
                int(overdue),
                float(oldest or 0.0),
                None if silent is None else float(silent),
            )
            for topic, sagas, overdue, oldest, silent in rows
        )
        return self.down

    def update(self, waiting: Iterable[Waiting]) -> None:
        self.waiting = {w.topic: w for w in waiting}
        self.down = frozenset(
            w.topic
            for w in self.waiting.values()
            if is_down(w, min_waiting=self.min_waiting, silence_s=self.silence_s)
        )
        self.busy = frozenset(
            w.topic
            for w in self.waiting.values()
            if is_busy(w, busy_waiting=self.busy_waiting, silence_s=self.silence_s)
        )
        if self._m_waiting is None:
            return
        self._known |= set(self.waiting)
        for topic in self._known:
            found = self.waiting.get(topic)
            self._m_waiting.labels(topic).set(found.sagas if found else 0)
            self._m_oldest.labels(topic).set(found.oldest_s if found else 0)
            self._m_down.labels(topic).set(1 if topic in self.down else 0)
