"""The participant's side of Kafka: consumer settings, topic creation, offsets.

Offsets are stored by hand after each database commit and committed in the
background from what was stored (``enable.auto.offset.store=false``): a record
whose transaction did not commit is delivered again, and the inbox makes the
repeat harmless. Users may add any librdkafka setting (``[kafka]``); the few
that the guarantee needs cannot be overridden.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from walsaga.logs import kafka_logger

#: Defaults of every participant's consumer, each chosen to suit Apache Kafka
#: and the embedded broker alike (docs/sagas.md says why for each).
CONSUMER_DEFAULTS: dict[str, Any] = {
    "auto.offset.reset": "earliest",
    "auto.commit.interval.ms": 500,
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "fetch.wait.max.ms": 20,
    "partition.assignment.strategy": "cooperative-sticky",
}

#: Settings the delivery guarantee depends on: applied after the user's.
CONSUMER_REQUIRED: dict[str, Any] = {
    "enable.auto.commit": True,
    "enable.auto.offset.store": False,
}

#: Settings an admin client shares with a consumer: where and how to connect.
_CONNECTION_PREFIXES = ("bootstrap.", "security.", "sasl.", "ssl.", "client.", "socket.")


def consumer_settings(
    group: str, kafka: dict[str, Any], *, error_cb: Callable[[KafkaError], None]
) -> dict[str, Any]:
    """librdkafka settings of a participant's consumer in consumer group `group`."""
    return {
        "group.id": group,
        **CONSUMER_DEFAULTS,
        "logger": kafka_logger(),
        **kafka,
        **CONSUMER_REQUIRED,
        "error_cb": error_cb,
    }


def connection_settings(kafka: dict[str, Any]) -> dict[str, Any]:
    """The part of `kafka` an admin client or a producer needs to reach the cluster."""
    return {k: v for k, v in kafka.items() if k.startswith(_CONNECTION_PREFIXES)}


def ensure_topics(
    kafka: dict[str, Any], topics: Iterable[str], *, partitions: int, log: Any
) -> list[str]:
    """Create the `topics` that do not exist yet; returns those created.

    A consumer subscribed to a missing topic would not notice it appear for
    minutes (``topic.metadata.refresh.interval.ms``), so a participant creates
    the topics it consumes before subscribing.
    """
    settings: dict[str, Any] = {**connection_settings(kafka), "logger": kafka_logger()}
    admin = AdminClient(settings)
    try:
        existing = set(admin.list_topics(timeout=10).topics)
    except KafkaException as e:
        log.warning("cannot list topics", error=str(e))
        return []
    missing = [t for t in topics if t not in existing]
    if not missing:
        return []
    created = []
    futures = admin.create_topics([NewTopic(t, num_partitions=partitions) for t in missing])
    for topic, future in futures.items():
        try:
            future.result(10)
            created.append(topic)
            log.info("created topic", topic=topic, partitions=partitions)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                log.warning("cannot create topic", topic=topic, error=str(e))
    return created


def next_offsets(records: Sequence[Any]) -> list[TopicPartition]:
    """The offsets to commit after `records`: one past the last of each partition."""
    last: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic(), r.partition())
        last[key] = max(last.get(key, -1), r.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
