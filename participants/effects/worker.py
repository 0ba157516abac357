"""The effect worker: performs effect requests outside any transaction and records
their outcomes, with the outcome events, in the same database.

Any number of workers may run on one database (they lease rows with ``FOR
UPDATE SKIP LOCKED``); each performs up to ``concurrency`` calls at a time, in
threads. For every effect it leases:

1. in doubt (an earlier attempt's outcome is unknown)? resolve it first, the
   target's way: a lookup, or calling again with the same key;
2. mark the attempt ``SENT`` and commit, then call, outside any transaction,
   within the target's ``timeout_s``;
3. record what :mod:`participants.effects.decision` makes of the outcome, in
   one transaction with the target's ``on_done`` / ``on_failed`` writes and
   the outcome event (outbox): done, refused, failed, or due again later.

Delivery guarantee: each effect is performed once *in effect*. A crash
before step 2 commits sends nothing; a crash after it leaves a ``SENT`` row
that the next worker resolves before any new attempt; a crash after the
call but before step 3 commits is the same case. Whether "once" holds at the
provider rests on how the target resolves unknown outcomes (see
:class:`participants.effects.model.Resolution`): an idempotency key the
provider honours, or a lookup it answers truthfully once ``settle_s`` has
passed.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog

from participants import commit
from participants.effects import store
from participants.effects.decision import CALL_NOW, Decision, after_call, after_lookup, on_takeover
from participants.effects.metrics import EffectMetrics
from participants.effects.model import (
    DONE,
    ENDED,
    IN_DOUBT,
    CallResult,
    Effect,
    InDoubt,
    Resolution,
    Target,
)
from participants.effects.recording import write_outcome
from walsaga import tracing
from walsaga.errors import SetupError, from_psycopg
from walsaga.retry import BackoffPolicy

log = structlog.get_logger("walsaga.effects")

NOTIFY_CHANNEL = "walsaga_effect"


class EffectWorker:
    """Performs the effects of some targets, from one database."""

    def __init__(
        self,
        name: str,
        *,
        dsn: str,
        targets: Iterable[Target],
        concurrency: int = 8,
        poll_interval_s: float = 0.5,
        lease_margin_s: float = 10.0,
        retention_s: float = 7 * 24 * 3600,
        metrics_interval_s: float = 2.0,
        shutdown_timeout_s: float = 10.0,
        metrics: EffectMetrics | None = None,
    ) -> None:
        self.name = name
        self.dsn = dsn
        self.targets = {t.name: t for t in targets}
        if not self.targets:
            raise SetupError(f"effect worker {name!r} has no targets")
        self.concurrency = max(1, concurrency)
        self.poll_interval_s = poll_interval_s
        self.lease_margin_s = lease_margin_s
        self.retention_s = retention_s
        self.metrics_interval_s = metrics_interval_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.metrics = metrics or EffectMetrics()
        #: Identifies this worker's leases (several may run on one host).
        self.worker_id = f"{name}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.log = log.bind(worker=name)
        self._wake = threading.Event()
        self._local = threading.local()
        self._connect_backoff = BackoffPolicy(min_s=0.2, max_s=5.0)
        # Long enough for a lookup or a call (each within its timeout) to end
        # before the lease does.
        self._lease_s = max(t.timeout_s for t in self.targets.values()) * 2 + lease_margin_s

    # -- running -----------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()
        self._wake.set()

    def run(self) -> None:
        """Work until :meth:`stop`; calls under way finish (each within its timeout)."""
        self._check_database()
        listener = threading.Thread(target=self._listen, name=f"{self.name}-listen", daemon=True)
        listener.start()
        pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, f"{self.name}-call")
        running: set[concurrent.futures.Future[None]] = set()
        next_gauges = 0.0
        next_trim = time.monotonic() + 60
        self.ready.set()
        self.log.info(
            "performing effects", targets=sorted(self.targets), concurrency=self.concurrency
        )
        try:
            while not self.stop_event.is_set():
                # Cleared before looking, so a wake-up that comes meanwhile is kept.
                self._wake.clear()
                running = {f for f in running if not f.done()}
                free = self.concurrency - len(running)
                leased: list[tuple[Effect, bool]] = []
                if free > 0:
                    leased = self._lease(free)
                    for effect, was_sent in leased:
                        future = pool.submit(self._perform, effect, was_sent)
                        future.add_done_callback(lambda _: self._wake.set())
                        running.add(future)
                now = time.monotonic()
                if now >= next_gauges:
                    next_gauges = now + self.metrics_interval_s
                    self._gauges()
                if now >= next_trim:
                    next_trim = now + 3600
                    self._trim()
                if free > 0 and len(leased) == free:
                    continue  # there may be more due
                self._wake.wait(self.poll_interval_s)
        finally:
            self.stop_event.set()
            deadline = time.monotonic() + self.shutdown_timeout_s
            for future in list(running):
                try:
                    future.result(max(0.0, deadline - time.monotonic()))
                except concurrent.futures.TimeoutError:
                    self.log.warning(
                        "a call did not end in time: its outcome is resolved by the next worker"
                    )
                except Exception as e:
                    self.log.error("effect task failed", error=repr(e))
            pool.shutdown(wait=False, cancel_futures=True)
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()
            self.log.info("stopped")

    def _check_database(self) -> None:
        try:
            conn = self._connection()
            with conn.transaction():
                row = conn.execute("SELECT to_regclass('walsaga.effect') IS NOT NULL").fetchone()
        except psycopg.Error as e:
            raise from_psycopg(e, f"effect worker {self.name!r}") from e
        if not (row and row[0]):
            raise SetupError(
                f"effect worker {self.name!r}: its database has no walsaga.effect table; "
                "install it first with: walsaga effects --config <file> --install"
            )

    def _connection(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        backoff = self._connect_backoff.backoff()
        while True:
            try:
                self._local.conn = conn = psycopg.connect(self.dsn, connect_timeout=10)
                return conn
            except psycopg.OperationalError as e:
                error = from_psycopg(e, f"effect worker {self.name!r}: cannot connect")
                if self.stop_event.is_set() or isinstance(error, SetupError):
                    raise error from e
                delay = backoff.next_delay()
                self.log.warning(
                    "database unreachable, retrying", error=str(e), retry_in_s=round(delay, 2)
                )
                self.stop_event.wait(delay)

    def _listen(self) -> None:
        """Wake the loop when an effect is requested (NOTIFY walsaga_effect)."""
        backoff = self._connect_backoff.backoff()
        while not self.stop_event.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    backoff.reset()
                    while not self.stop_event.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self._wake.set()
            except psycopg.Error as e:
                self.log.info("listener reconnecting", error=str(e))
                self.stop_event.wait(backoff.next_delay())

    def _lease(self, limit: int) -> list[tuple[Effect, bool]]:
        try:
            return store.lease(
                self._connection(),
                worker=self.worker_id,
                targets=list(self.targets),
                limit=limit,
                lease_s=self._lease_s,
            )
        except psycopg.Error as e:
            self.log.warning("cannot lease effects", error=str(e))
            return []

    # -- one effect --------------------------------------------------------

    def _perform(self, effect: Effect, was_sent: bool) -> None:
        try:
            parent = tracing.from_headers(effect.headers)
            if parent is None:  # untraced: no trace starts here
                self._resolve_and_call(effect, was_sent)
                return
            # The worker's attempt is a hop of its own in the step's trace: the
            # call and the outcome event carry its span.
            attributes = {"walsaga.effect.target": effect.target, "walsaga.effect.key": effect.key}
            with tracing.span(
                f"effect {effect.target}", parent, kind="client", attributes=attributes
            ) as hop:
                self._resolve_and_call(traced(effect, hop), was_sent)
        except psycopg.Error as e:
            # The lease runs out and another attempt picks the effect up; a
            # call that left is then resolved first.
            self.log.warning("database error around an effect", effect=effect.key, error=str(e))
        except Exception as e:
            self.log.error("effect failed unexpectedly", effect=effect.key, error=repr(e))

    def _resolve_and_call(self, effect: Effect, was_sent: bool) -> None:
        target = self.targets[effect.target]
        in_doubt = effect.status == IN_DOUBT
        if in_doubt and was_sent:
            taken = on_takeover(target)
            if taken is not None:
                self._record(effect, taken, target)
                return
        if in_doubt and target.resolution is Resolution.LOOKUP:
            assert target.lookup is not None
            found = self._timed(target, target.lookup, effect, lookup=True)
            decision = after_lookup(found, target, attempts=effect.attempts, age_s=_age(effect))
            if decision is not CALL_NOW:
                self._record(effect, decision, target)
                return
            self.metrics.calls.labels(target.name, decision.outcome).inc()
            in_doubt = False  # certainly not done: a call is safe
        lease_s = target.timeout_s + max(target.settle, self.lease_margin_s)
        sent = store.mark_sent(self._connection(), effect, worker=self.worker_id, lease_s=lease_s)
        if sent is None:
            return  # the lease was lost: the effect is someone else's now
        result = self._timed(target, target.call, sent)
        decision = after_call(
            result, target, attempts=sent.attempts, age_s=_age(sent), was_in_doubt=in_doubt
        )
        self._record(sent, decision, target)

    def _timed(self, target: Target, call: Any, effect: Effect, *, lookup: bool = False) -> Any:
        started = time.monotonic()
        try:
            result: CallResult = call(effect, target.timeout_s)
        except Exception as e:  # a target's own code: its outcome is unknown
            result = InDoubt(f"{type(e).__name__}: {e}", answered=False)
        self.metrics.seconds.labels(target.name).observe(time.monotonic() - started)
        if not lookup:
            outcome = type(result).__name__
            label = {"Done": "done", "Refused": "refused", "NotDone": "not_done"}.get(
                outcome, "in_doubt"
            )
            self.metrics.calls.labels(target.name, label).inc()
        return result

    def _record(self, effect: Effect, decision: Decision, target: Target) -> None:
        if decision.outcome.startswith("lookup"):
            self.metrics.calls.labels(target.name, decision.outcome).inc()
        backoff = self._connect_backoff.backoff()
        for attempt in range(1, 4):
            conn = self._connection()
            try:
                with conn.transaction():
                    recorded = store.record(conn, effect, decision, worker=self.worker_id)
                    if recorded and decision.ended:
                        write_outcome(conn, effect, decision, target)
                commit.committed(conn)
            except psycopg.Error as e:
                commit.rolled_back(conn)
                if attempt == 3:
                    raise
                self.log.warning(
                    "recording an outcome failed, retrying", effect=effect.key, error=str(e)
                )
                time.sleep(backoff.next_delay())
                continue
            except BaseException:
                commit.rolled_back(conn)
                raise
            if recorded:
                self._announce(effect, decision, target)
            return

    def _announce(self, effect: Effect, decision: Decision, target: Target) -> None:
        if decision.status in ENDED:
            self.metrics.ended.labels(target.name, decision.status).inc()
            level = self.log.info if decision.status == DONE else self.log.warning
            level(
                "effect ended",
                effect=effect.key,
                target=target.name,
                status=decision.status,
                attempts=effect.attempts,
                reason=decision.reason,
            )
        elif decision.error:
            self.log.info(
                "effect not done yet",
                effect=effect.key,
                target=target.name,
                status=decision.status,
                attempt=effect.attempts,
                retry_in_s=round(decision.delay_s, 2),
                error=decision.error,
            )

    # -- periodic ----------------------------------------------------------

    def _gauges(self) -> None:
        try:
            conn = self._connection()
            with conn.transaction():
                rows = store.queue(conn)
        except psycopg.Error as e:
            self.log.info("cannot read the queue", error=str(e))
            return
        self.metrics.refresh(rows, self.targets)

    def _trim(self) -> None:
        try:
            conn = self._connection()
            with conn.transaction():
                removed = store.trim(conn, retention_s=self.retention_s)
            if removed:
                self.log.info("removed ended effects past retention", count=removed)
        except psycopg.Error as e:
            self.log.info("cannot trim ended effects", error=str(e))


def traced(effect: Effect, hop: tracing.TraceContext) -> Effect:
    """`effect` as the hop `hop` performs it: its call and outcome event carry `hop`."""
    return replace(effect, headers={**effect.headers, **hop.headers()})


def _age(effect: Effect) -> float:
    return max(0.0, (datetime.now(UTC) - effect.created_at).total_seconds())
