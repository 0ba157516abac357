"""Where each outbox event goes in Kafka: topic, key, value and headers. Pure.

The contract (docs/relay.md, "The Kafka record"): topic from the template (default
``{aggregatetype}``), key the aggregate id so one aggregate's events keep their
order, value the payload JSON, headers ``id``, ``type``, ``aggregatetype``,
``aggregateid``, ``source``, ``lsn``, ``xid`` and every entry of the row's
``headers``.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from relay.presets import Shape
from relay.wal2json import HEARTBEAT, Heartbeat, OutboxEvent, decode, exact_headers

#: Events whose topic would not be a legal Kafka topic name go here, with the
#: intended topic in header ``walsaga.unroutable``, rather than block the stream.
UNROUTABLE_TOPIC = "walsaga.unroutable"

_LEGAL_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def header_value(value: Any) -> str | bytes:
    """Strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value)


#: A Kafka record ready for ``Producer.produce``: topic, value, key, headers, and
#: the commit timestamp of its transaction as wal2json prints it (None if absent).
Record = tuple[str, bytes, str | bytes, dict[str, str | bytes | None], str | None]


class Router:
    """Builds Kafka records for one source."""

    __slots__ = ("_by_aggregate_only", "_lsn_high", "_lsn_prefix", "_shape", "_source",
                 "_template", "_topics", "_xid", "_xid_text")  # fmt: skip

    def __init__(self, template: str, source: str, *, shape: Shape | None = None) -> None:
        self._template = template
        self._source = source
        #: An interoperability preset's reshaping (relay.presets), or None.
        self._shape = shape
        self._topics: dict[tuple[str, str], tuple[str, str | None]] = {}
        self._by_aggregate_only = "{type}" not in template
        self._lsn_high = -1
        self._lsn_prefix = ""
        self._xid: int | None = None
        self._xid_text = ""

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

    def record(self, data: bytes | memoryview, lsn: int) -> Record | Heartbeat | None:
        """The Kafka record of a wal2json message read at `lsn`, in one step.

        The same result as :func:`~relay.wal2json.decode` followed by
        :meth:`route` (the tests hold them to it), without the objects in
        between: this runs once per event on the relay's hot path. Returns
        :data:`~relay.wal2json.HEARTBEAT` or None like ``decode``, and raises
        :class:`~relay.wal2json.DecodeError` for the same messages.
        """
        try:
            msg = orjson.loads(data)
            if msg["action"] != "I" or msg["table"] != "outbox" or msg["schema"] != "walsaga":
                raise LookupError
            c0, c1, c2, c3, c4, c5 = msg["columns"][:6]
            # Columns are matched by position (the table's order, fixed by
            # sql/core), after checking their names: a changed table takes the
            # general path.
            if (
                c0["name"] != "id"
                or c1["name"] != "aggregatetype"
                or c2["name"] != "aggregateid"
                or c3["name"] != "type"
                or c4["name"] != "payload"
                or c5["name"] != "headers"
            ):
                raise LookupError
            aggregatetype = c1["value"]
            aggregateid = c2["value"]
            type_ = c3["value"]
            value = c4["value"].encode()
            headers_text = c5["value"]
            xid = msg["xid"]
            commit_time = msg["timestamp"]
            if type(aggregateid) is not str or type(xid) is not int:
                raise LookupError
            headers: dict[str, str | bytes | None] = {
                "id": c0["value"],
                "type": type_,
                "aggregatetype": aggregatetype,
                "aggregateid": aggregateid,
                "source": self._source,
                "lsn": "",
                "xid": "",
            }
            if headers_text != "{}":
                row_headers = orjson.loads(headers_text)
                for header in row_headers.values():
                    if type(header) is not str:
                        # A float or an object: kept as written (every digit).
                        row_headers = exact_headers(row_headers, headers_text)
                        break
                for name, header in row_headers.items():
                    if name not in headers:
                        headers[name] = header if type(header) is str else header_value(header)
        except (LookupError, TypeError, ValueError, AttributeError):
            # Anything unusual (another message kind, a changed table, a null,
            # malformed JSON) takes the general path, which also says what is wrong.
            return self._record_slowly(data, lsn)
        if xid != self._xid:
            self._xid = xid
            self._xid_text = str(xid)
        headers["xid"] = self._xid_text
        high = lsn >> 32
        if high != self._lsn_high:
            self._lsn_high = high
            self._lsn_prefix = "%X/" % high  # noqa: UP031 (the fastest form)
        headers["lsn"] = self._lsn_prefix + "%X" % (lsn & 0xFFFFFFFF)
        found = (
            self._topics.get((aggregatetype, ""))
            if self._by_aggregate_only
            else self._topics.get((aggregatetype, type_))
        )
        if found is None:
            found = self.topic(aggregatetype, type_)
        topic, unroutable = found
        if unroutable is not None:
            headers["walsaga.unroutable"] = unroutable
        if self._shape is not None:
            return self.shaped(topic, value, aggregateid, headers, commit_time)
        return topic, value, aggregateid, headers, commit_time

    def shaped(
        self,
        topic: str,
        value: bytes,
        key: str,
        headers: dict[str, str | bytes | None],
        commit_time: str | None,
    ) -> Record:
        """The record as the relay's preset wants it (unchanged without one)."""
        if self._shape is None:
            return topic, value, key, headers, commit_time
        topic, value, shaped_key, headers = self._shape(topic, value, key, headers, commit_time)
        return topic, value, shaped_key, headers, commit_time

    def _record_slowly(self, data: bytes | memoryview, lsn: int) -> Record | Heartbeat | None:
        item = decode(data)
        if item is None or item is HEARTBEAT:
            return item
        assert isinstance(item, OutboxEvent)
        topic, headers = self.route(item, lsn)
        return self.shaped(topic, item.payload, item.aggregateid, headers, item.commit_time)
