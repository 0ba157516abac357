"""Where each outbox event goes in Kafka: topic, key, value and headers. Pure.

The contract (ARCHITECTURE.md §2): topic from the template (default
``{aggregatetype}``), key the aggregate id so one aggregate's events keep their
order, value the payload JSON, headers ``id``, ``type``, ``aggregatetype``,
``aggregateid``, ``source``, ``lsn``, ``xid`` and every entry of the row's
``headers``.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from relay.wal2json import OutboxEvent

#: Events whose topic would not be a legal Kafka topic name go here, with the
#: intended topic in header ``walsaga.unroutable``, rather than block the stream.
UNROUTABLE_TOPIC = "walsaga.unroutable"

_LEGAL_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def header_value(value: Any) -> str | bytes:
    """Strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value)


class Router:
    """Builds Kafka records for one source."""

    __slots__ = ("_by_aggregate_only", "_source", "_template", "_topics")

    def __init__(self, template: str, source: str) -> None:
        self._template = template
        self._source = source
        self._topics: dict[tuple[str, str], tuple[str, str | None]] = {}
        self._by_aggregate_only = "{type}" not in template

    def topic(self, aggregatetype: str, type: str) -> tuple[str, str | None]:
        """The topic to produce to, and the intended topic when that one is illegal."""
        key = (aggregatetype, "" if self._by_aggregate_only else type)
        found = self._topics.get(key)
        if found is None:
            topic = self._template.format(
                aggregatetype=aggregatetype, type=type, source=self._source
            )
            found = (topic, None) if _LEGAL_TOPIC.match(topic) else (UNROUTABLE_TOPIC, topic)
            if len(self._topics) > 10000:
                self._topics.clear()
            self._topics[key] = found
        return found

    def route(self, event: OutboxEvent, lsn: int) -> tuple[str, dict[str, str | bytes | None]]:
        """Topic and headers of `event` read at `lsn`."""
        found = self._topics.get(
            (event.aggregatetype, "" if self._by_aggregate_only else event.type)
        )
        if found is None:
            found = self.topic(event.aggregatetype, event.type)
        topic, unroutable = found
        xid = event.xid
        # A dict costs librdkafka less than a list of pairs; the standard
        # headers win over a row header of the same name.
        headers: dict[str, str | bytes | None] = {
            "id": event.id,
            "type": event.type,
            "aggregatetype": event.aggregatetype,
            "aggregateid": event.aggregateid,
            "source": self._source,
            "lsn": "%X/%X" % (lsn >> 32, lsn & 0xFFFFFFFF),  # noqa: UP031 (the fastest form)
            "xid": "" if xid is None else str(xid),
        }
        if event.headers:
            for name, value in event.headers.items():
                if name not in headers:
                    headers[name] = header_value(value)
        if unroutable is not None:
            headers["walsaga.unroutable"] = unroutable
        return topic, headers
