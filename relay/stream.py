"""One source's stream: its replication slot, read with wal2json, published to Kafka.

One thread per source runs :meth:`SourceStream.run`: connect, check the set-up,
take the slot (or stand by while another instance holds it), then run a
:class:`~relay.session.Session` until the relay stops or an error ends it.
What happens after an error is decided by its kind (:mod:`walsaga.errors`):
another instance holding the slot means standing by; a transient error
(Postgres or Kafka unreachable, a lost connection) means a new session after
a backoff with jitter; a set-up error (credentials, privileges, TLS, a missing
schema or plugin) or a lost slot stops the source with the reason, since no
retry can fix them.

Delivery guarantee: at-least-once (see :mod:`relay.session`). A new session
starts from the slot's confirmed position, so unacknowledged events are read
and sent again with the same ``id``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import structlog
from confluent_kafka import Producer
from psycopg import pq, sql

from relay import slot
from relay.config import RelayConfig, SourceConfig
from relay.delivery import SourceHaltedError
from relay.metrics import HopStages, LatencyWindow, RelayMetrics, SourceMetrics
from relay.producer import SourceProducer
from relay.session import Session, SessionContext, StreamStatus
from relay.wal2json import PLUGIN_OPTIONS, format_lsn
from walsaga.errors import (
    ErrorKind,
    PermanentError,
    SetupError,
    SlotBusyError,
    SlotLostError,
    TransientError,
    WalsagaError,
    classify,
    from_psycopg,
)
from walsaga.retry import BackoffPolicy

log = structlog.get_logger("walsaga.relay")

__all__ = ["SourceStream", "StreamStatus"]


class SourceStream:
    """Streams one source database to Kafka until :attr:`stop` is set."""

    def __init__(
        self,
        source: SourceConfig,
        config: RelayConfig,
        metrics: RelayMetrics,
        stop: threading.Event,
        *,
        producer_factory: Callable[[dict[str, Any]], Producer] = Producer,
    ) -> None:
        self.source = source
        self.config = config
        self.settings = config.relay
        self.stop = stop
        self.status = StreamStatus()
        self.latencies = LatencyWindow()
        self.stages = HopStages()
        self.log = log.bind(source=source.name, slot=source.slot_name)
        self.metrics = SourceMetrics(metrics, source.name)
        self.producer = SourceProducer(
            source, config, self.metrics, self.log, factory=producer_factory
        )
        self.context = SessionContext(
            source=source,
            settings=self.settings,
            router=config.router(source),
            metrics=self.metrics,
            status=self.status,
            latencies=self.latencies,
            stages=self.stages,
            log=self.log,
            stopping=stop.is_set,
            producer_broken=lambda: self.producer.broken,
            on_refused=config.on_refused(source),
            dead_letter_topic=self.settings.dead_letter_topic,
            message_max_bytes=config.message_max_bytes,
            drain_s=self.settings.shutdown_timeout_s,
        )
        self._halted_reason: str | None = None
        self.backoff = BackoffPolicy(
            min_s=self.settings.retry_min_s, max_s=self.settings.retry_max_s
        ).backoff()

    # -- lifecycle ---------------------------------------------------------

    def run(self) -> None:
        """Stream until stopped. Raises only for errors that retrying cannot fix."""
        standby_logged = False
        try:
            while not self.stop.is_set():
                try:
                    self._session()
                    self.backoff.reset()
                except SlotBusyError as e:
                    self.metrics.streaming.set(0)
                    if not standby_logged:
                        self.log.info("standby: another relay streams this slot", detail=str(e))
                        standby_logged = True
                    self.status.set("standby", str(e))
                    self.stop.wait(self.settings.standby_retry_s)
                except SourceHaltedError as e:
                    self._halted(e)
                except (SetupError, SlotLostError, PermanentError) as e:
                    self._fatal(e)
                    raise
                except psycopg.Error as e:
                    # Anything not translated on the way: classified here.
                    error = from_psycopg(e, f"source {self.source.name!r}")
                    if classify(e) in (ErrorKind.SETUP, ErrorKind.PERMANENT):
                        self._fatal(error)
                        raise error from e
                    standby_logged = self._retry(error)
                except WalsagaError as e:  # transient, delivery
                    standby_logged = self._retry(e)
        finally:
            self.metrics.streaming.set(0)
            left = self.producer.close(flush_s=self.settings.shutdown_timeout_s * 0.2)
            if left:
                self.log.warning("events left unacknowledged at exit", events=left)
            if self.status.state != "failed":
                self.status.set("stopped")

    def _halted(self, halt: SourceHaltedError) -> None:
        """Stopped at an event that may not be passed: say why once, try again now and then."""
        self.metrics.streaming.set(0)
        self.metrics.halted.set(1)
        if halt.lsn is not None:
            self.context.halted_at = halt.lsn
        if halt.reason != self._halted_reason:
            self.log.error("source halted", reason=halt.reason)
            self._halted_reason = halt.reason
        self.status.set("halted", halt.reason)
        self.stop.wait(self.settings.retry_max_s)

    def _fatal(self, error: BaseException) -> None:
        self.metrics.streaming.set(0)
        self.metrics.error("fatal")
        self.log.error("source stopped", error=str(error))
        self.status.set("failed", str(error))

    def _retry(self, error: BaseException) -> bool:
        self.metrics.streaming.set(0)
        self.metrics.restarts.inc()
        self.metrics.error("stream")
        delay = self.backoff.next_delay()
        self.status.set("retrying", f"{error}; retrying in {delay:.1f}s")
        self.log.warning(
            "stream interrupted, retrying", error=str(error), retry_in_s=round(delay, 2)
        )
        self.stop.wait(delay)
        return False

    # -- session -----------------------------------------------------------

    def _session(self) -> None:
        name = self.source.name
        try:
            conn = psycopg.connect(self.source.dsn, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            raise from_psycopg(e, f"cannot connect to source {name!r}") from e
        with conn:
            try:
                slot.check_source(conn, self.source)
                confirmed = slot.ensure_slot(conn, self.source.slot_name, self.log)
            except psycopg.Error as e:
                raise from_psycopg(e, f"source {name!r}") from e
            if not self.producer.wait_for_broker(
                self.stop, lambda why: self.status.set("waiting", why)
            ):
                return
            producer = self.producer.ready()
            repl = self._start_replication()
            try:
                self.metrics.streaming.set(1)
                if self.context.halted_at is None:
                    # A halted source trying again stays "halted" until it passes the event.
                    self.status.set("streaming")
                    self.log.info("streaming", from_lsn=format_lsn(confirmed))
                Session(self.context, conn, repl, producer, confirmed).loop()
            finally:
                # Not `with repl`: leaving it would try to end a transaction
                # on a connection that is in COPY mode.
                repl.close()

    def _start_replication(self) -> psycopg.Connection[Any]:
        try:
            repl = psycopg.connect(
                self.source.dsn, replication="database", autocommit=True, connect_timeout=10
            )
        except psycopg.Error as e:
            raise from_psycopg(
                e, f"cannot open a replication connection to {self.source.name!r}"
            ) from e
        options = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v))
            for k, v in PLUGIN_OPTIONS.items()
        )
        command = sql.SQL("START_REPLICATION SLOT {} LOGICAL 0/0 ({})").format(
            sql.Identifier(self.source.slot_name), options
        )
        try:
            repl.execute(command)
        except psycopg.errors.ObjectInUse as e:
            repl.close()
            raise SlotBusyError(e.diag.message_primary or str(e)) from e
        except psycopg.errors.UndefinedFile as e:
            repl.close()
            raise SetupError(slot.no_wal2json(self.source.name, repl.info.server_version)) from e
        except psycopg.Error as e:
            repl.close()
            raise from_psycopg(e, f"START_REPLICATION on {self.source.name!r}") from e
        if repl.pgconn.status != pq.ConnStatus.OK or repl.pgconn.transaction_status not in (
            pq.TransactionStatus.ACTIVE,
            pq.TransactionStatus.IDLE,
        ):
            repl.close()
            raise TransientError("replication did not start")
        return repl
