"""Interoperability presets: the same events, shaped for consumers of other tools. Pure.

- ``cloudevents = "binary"``: CloudEvents 1.0 in the Kafka protocol binding's
  binary mode. The value stays the payload; headers ``ce_specversion``,
  ``ce_id`` (the event id), ``ce_source`` (``/walsaga/<source>``), ``ce_type``,
  ``ce_time`` (the commit time, RFC 3339), ``ce_subject`` (the aggregate id)
  and ``content-type: application/json`` are added. walsaga's own headers stay.
- ``compat = "debezium"``: what a consumer of Debezium's outbox event router
  expects with its documented set-up (``JsonConverter`` without schemas for
  key and value, ``table.fields.additional.placement = type:header:eventType``):
  topic ``outbox.event.<aggregatetype>`` (unless a topic template is set),
  key the aggregate id as a JSON string, value the payload as a JSON string
  (escaped JSON, as the router passes a ``jsonb`` column on), headers ``id``
  and ``eventType``. walsaga's other headers stay.

In every mode the Kafka record timestamp is the transaction's commit time
(set by the session, not here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import orjson

from relay.wal2json import CommitTimes

CloudEventsMode = Literal["none", "binary"]
CompatMode = Literal["none", "debezium"]

#: Debezium's default ``route.topic.replacement``, as a walsaga topic template.
DEBEZIUM_TOPIC_TEMPLATE = "outbox.event.{aggregatetype}"

Headers = dict[str, str | bytes | None]
#: (topic, value, key, headers, commit time) -> the same, reshaped.
Shape = Callable[[str, bytes, str, Headers, str | None], tuple[str, bytes, str | bytes, Headers]]


def cloudevents_binary(source: str) -> Shape:
    """CloudEvents binary mode for events of `source`."""
    ce_source = f"/walsaga/{source}"
    times = CommitTimes()

    def shape(
        topic: str, value: bytes, key: str, headers: Headers, commit_time: str | None
    ) -> tuple[str, bytes, str | bytes, Headers]:
        headers["ce_specversion"] = "1.0"
        headers["ce_id"] = headers["id"]
        headers["ce_source"] = ce_source
        headers["ce_type"] = headers["type"]
        if commit_time is not None:
            headers["ce_time"] = times.rfc3339(commit_time)
        headers["ce_subject"] = key
        headers["content-type"] = "application/json"
        return topic, value, key, headers

    return shape


def debezium(
    topic: str, value: bytes, key: str, headers: Headers, commit_time: str | None
) -> tuple[str, bytes, str | bytes, Headers]:
    """Debezium's outbox event router with JsonConverter (schemas off) and eventType."""
    headers["eventType"] = headers["type"]
    text = value.decode()
    return topic, orjson.dumps(text), orjson.dumps(key), headers


def shape_for(*, cloudevents: CloudEventsMode, compat: CompatMode, source: str) -> Shape | None:
    """The preset's reshaping of records, None for walsaga's own shape."""
    if compat == "debezium":
        return debezium
    if cloudevents == "binary":
        return cloudevents_binary(source)
    return None
