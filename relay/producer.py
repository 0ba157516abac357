"""The Kafka producer of one source: its settings, its health, waiting for the broker.

The producer is idempotent with ``acks=all`` (the relay's guarantee needs
both; :mod:`relay.config` refuses settings that drop them). A fatal producer
error marks it broken; the session then restarts with a new producer from
the slot's confirmed position, so nothing acknowledged is lost and nothing
unacknowledged is skipped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from relay.config import RelayConfig, SourceConfig
from relay.metrics import SourceMetrics
from walsaga.logs import kafka_logger

ProducerFactory = Callable[[dict[str, Any]], Producer]


class SourceProducer:
    """Owns the producer of a source across sessions."""

    def __init__(
        self,
        source: SourceConfig,
        config: RelayConfig,
        metrics: SourceMetrics,
        log: Any,
        *,
        factory: ProducerFactory = Producer,
    ) -> None:
        self.source = source
        self.config = config
        self.metrics = metrics
        self.log = log
        self._factory = factory
        self._producer: Producer | None = None
        #: Why the producer cannot be used any more (a fatal error), or None.
        self.broken: str | None = None
        self.broker_down = False

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.broken = err.str()
            self.log.error("kafka producer failed", error=err.str())
        elif err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            if not self.broker_down:
                self.log.warning("kafka unreachable, retrying", error=err.str())
            self.broker_down = True
        self.metrics.error("kafka")

    def ready(self) -> Producer:
        """The producer to use for the next session (a new one after a fatal error)."""
        if self._producer is not None and self.broken is None:
            return self._producer
        self.close(flush_s=0)
        settings = self.config.producer_settings()
        settings["error_cb"] = self._on_error
        settings.setdefault("logger", kafka_logger())
        settings.setdefault("client.id", f"walsaga-relay-{self.source.name}")
        self.broken = None
        self._producer = self._factory(settings)
        return self._producer

    def wait_for_broker(self, stop: threading.Event, on_wait: Callable[[str], None]) -> bool:
        """Block until Kafka answers (True) or `stop` is set (False).

        The relay takes the slot only once it can publish: a standby that can
        reach Kafka is better than an active instance that cannot.
        """
        producer = self.ready()
        waited = False
        while not stop.is_set():
            try:
                producer.list_topics(timeout=2.0)
            except KafkaException as e:
                if not waited:
                    self.log.warning(
                        "waiting for kafka",
                        bootstrap_servers=self.config.kafka.get("bootstrap.servers"),
                        error=str(e),
                    )
                waited = True
                on_wait(f"kafka unreachable: {e}")
                continue
            if waited:
                self.log.info("kafka reachable again")
            self.broker_down = False
            return True
        return False

    def close(self, *, flush_s: float) -> int:
        """Give queued events up to `flush_s` to be delivered; returns how many were left."""
        producer, self._producer = self._producer, None
        if producer is None:
            return 0
        return int(producer.flush(flush_s)) if flush_s > 0 else len(producer)
