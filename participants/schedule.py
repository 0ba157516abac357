"""Periodic work of a participant (expiring holds, saga deadlines, inbox retention).

Each task runs in a transaction of its own, between batches, on the first
worker's connection; a task that fails is logged and tried again at its next
turn, and never stops the participant.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

Task = Callable[[psycopg.Connection[Any]], object]


@dataclass
class Periodic:
    interval_s: float
    task: Task
    name: str
    due: float = 0.0


class Schedule:
    """The periodic tasks of one participant."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.tasks: list[Periodic] = []

    def every(self, interval_s: float, task: Task, *, name: str = "") -> None:
        self.tasks.append(Periodic(interval_s, task, name or getattr(task, "__name__", "?")))

    def run_due(
        self,
        connection: Callable[[], psycopg.Connection[Any]],
        *,
        committed: Callable[[psycopg.Connection[Any]], None],
        rolled_back: Callable[[psycopg.Connection[Any]], None],
    ) -> None:
        """Run every task whose turn has come, each in its own transaction."""
        now = time.monotonic()
        for job in self.tasks:
            if now < job.due:
                continue
            job.due = now + job.interval_s
            conn = None
            try:
                conn = connection()
                with conn.transaction():
                    job.task(conn)
                committed(conn)
            except psycopg.Error as e:
                if conn is not None:
                    rolled_back(conn)
                self.log.warning("periodic task failed", task=job.name, error=str(e))
            except Exception as e:
                if conn is not None:
                    rolled_back(conn)
                self.log.error("periodic task failed", task=job.name, error=repr(e))
