"""Decode wal2json (format-version 2) messages into outbox events. Pure: no I/O.

The relay asks wal2json for inserts into ``walsaga.outbox`` and for logical
messages with the prefixes ``walsaga`` (table-less events) and
``walsaga.heartbeat`` (position-only). Transaction begin/commit records are
not requested: each change carries its xid and commit timestamp, and the
positions the relay confirms are change positions (see :mod:`relay.window`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson

from walsaga.errors import DecodeError

EVENT_PREFIX = "walsaga"
HEARTBEAT_PREFIX = "walsaga.heartbeat"

#: Options of START_REPLICATION for the wal2json plugin.
PLUGIN_OPTIONS: dict[str, str] = {
    "format-version": "2",
    "include-transaction": "0",
    "include-xids": "1",
    "include-timestamp": "1",
    "include-types": "0",
    "add-tables": "walsaga.outbox",
    "actions": "insert",
    "add-msg-prefixes": f"{EVENT_PREFIX},{HEARTBEAT_PREFIX}",
}

_EVENT_FIELDS = ("id", "aggregatetype", "aggregateid", "type")


class OutboxEvent:
    """One event to publish, as read from the WAL."""

    __slots__ = ("aggregateid", "aggregatetype", "commit_time", "headers", "id", "payload", "type",
                 "xid")  # fmt: skip

    def __init__(
        self,
        id: str,
        aggregatetype: str,
        aggregateid: str,
        type: str,
        payload: bytes,
        headers: dict[str, Any] | None,
        xid: int | None,
        commit_time: str | None,
    ) -> None:
        self.id = id
        self.aggregatetype = aggregatetype
        self.aggregateid = aggregateid
        self.type = type
        self.payload = payload  # JSON text, published as is
        self.headers = headers
        self.xid = xid
        self.commit_time = commit_time  # as wal2json prints it; see CommitTimes

    def __repr__(self) -> str:
        return f"OutboxEvent(id={self.id!r}, type={self.type!r}, aggregateid={self.aggregateid!r})"


class Heartbeat:
    """A position-only message: nothing to publish, but the slot may move past it."""

    __slots__ = ()


HEARTBEAT = Heartbeat()


def decode(data: bytes | memoryview) -> OutboxEvent | Heartbeat | None:
    """Read one wal2json message.

    Returns the event, :data:`HEARTBEAT`, or None for anything the relay does not
    publish (another table, another prefix). Raises :class:`DecodeError` for a
    message that claims to be an event but is malformed.
    """
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise DecodeError(f"not JSON: {bytes(data[:200])!r}") from e
    action = msg.get("action")
    if action == "I":
        if msg.get("schema") != "walsaga" or msg.get("table") != "outbox":
            return None
        return _event_from_columns(msg["columns"], msg.get("xid"), msg.get("timestamp"))
    if action == "M":
        prefix = msg.get("prefix")
        if prefix == EVENT_PREFIX:
            return _event_from_message(msg)
        if prefix == HEARTBEAT_PREFIX:
            return HEARTBEAT
    return None


def _event_from_columns(cols: list[dict[str, Any]], xid: int | None, ts: str | None) -> OutboxEvent:
    # The outbox's column order is fixed by sql/core; checking the names is far
    # cheaper than building a dict per row, which remains the fallback.
    try:
        c0, c1, c2, c3, c4, c5 = cols[0], cols[1], cols[2], cols[3], cols[4], cols[5]
        if (
            c0["name"] == "id"
            and c1["name"] == "aggregatetype"
            and c2["name"] == "aggregateid"
            and c3["name"] == "type"
            and c4["name"] == "payload"
            and c5["name"] == "headers"
        ):
            values = (c0["value"], c1["value"], c2["value"], c3["value"], c4["value"])
            headers_text = c5["value"]
        else:
            row = {c["name"]: c["value"] for c in cols}
            values = tuple(
                row[k] for k in ("id", "aggregatetype", "aggregateid", "type", "payload")
            )
            headers_text = row.get("headers")
        event_id, aggregatetype, aggregateid, type_, payload = values
        return OutboxEvent(
            event_id,
            aggregatetype,
            aggregateid,
            type_,
            payload.encode() if payload is not None else b"null",
            _row_headers(headers_text),
            xid,
            ts,
        )
    except (IndexError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError) as e:
        raise DecodeError(f"unreadable outbox row: {cols!r}"[:500]) from e


def _row_headers(text: str | None) -> dict[str, Any] | None:
    if not text or text == "{}":
        return None
    try:
        headers = orjson.loads(text)
    except orjson.JSONDecodeError:
        headers = json.loads(text)  # numbers beyond a double's range (jsonb allows them)
    if not isinstance(headers, dict):
        raise DecodeError(f"outbox headers must be a JSON object: {text!r}"[:500])
    return exact_headers(headers, text)


def exact_headers(headers: dict[str, Any], text: str) -> dict[str, Any]:
    """`headers` parsed from `text`, with every float, object and array kept as its
    JSON text: a number with more digits than a double holds stays as written."""
    if all(type(v) in _EXACT for v in headers.values()):
        return headers
    raw = raw_members(text)
    return {k: v if type(v) in _EXACT else RawJson(raw[k]) for k, v in headers.items()}


# Parsed values that encode back to the same JSON text.
_EXACT = frozenset({str, int, bool, type(None)})


class RawJson(str):
    """A JSON value kept as the text it was written as (published without re-encoding)."""

    __slots__ = ()


_SCANNER = json.JSONDecoder()
_SPACE = " \t\n\r"


def raw_members(text: str) -> dict[str, str]:
    """The members of the JSON object `text`, each value as its own JSON text.

    Parsing into Python and encoding again would turn ``10.50`` into ``10.5``
    and round numbers a double cannot hold; slicing keeps every digit.
    """
    scan = _SCANNER.raw_decode
    i = _skip(text, 0)
    if text[i : i + 1] != "{":
        raise ValueError("not a JSON object")
    i = _skip(text, i + 1)
    members: dict[str, str] = {}
    if text[i : i + 1] == "}":
        return members
    while True:
        key, i = scan(text, i)
        i = _skip(text, i)
        if text[i : i + 1] != ":":
            raise ValueError(f"expected ':' at {i}")
        start = _skip(text, i + 1)
        _, end = scan(text, start)
        members[key] = text[start:end]
        i = _skip(text, end)
        if text[i : i + 1] == "}":
            return members
        if text[i : i + 1] != ",":
            raise ValueError(f"expected ',' or '}}' at {i}")
        i = _skip(text, i + 1)


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


def _event_from_message(msg: dict[str, Any]) -> OutboxEvent:
    content = msg.get("content")
    try:
        if not isinstance(content, str):
            raise TypeError("no content")
        raw = raw_members(content)
        fields = {f: json.loads(raw[f]) for f in _EVENT_FIELDS if f in raw}
        missing = [f for f in _EVENT_FIELDS if not isinstance(fields.get(f), str)]
        if missing:
            raise DecodeError(f"walsaga message without {', '.join(missing)}: {content!r}"[:500])
        headers_text = raw.get("headers")
        headers = None
        if headers_text is not None and headers_text not in ("{}", "null"):
            parsed = json.loads(headers_text)
            if not isinstance(parsed, dict):
                raise DecodeError(f"walsaga message headers must be an object: {parsed!r}"[:500])
            headers = exact_headers(parsed, headers_text) or None
        return OutboxEvent(
            fields["id"],
            fields["aggregatetype"],
            fields["aggregateid"],
            fields["type"],
            raw.get("payload", "null").encode(),
            headers,
            msg.get("xid"),
            msg.get("timestamp"),
        )
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        if isinstance(e, DecodeError):
            raise
        raise DecodeError(f"unreadable walsaga message: {content!r}"[:500]) from e


class CommitTimes:
    """Turns wal2json commit timestamps ('2026-11-22 00:07:53.80986+00') into epoch
    seconds, epoch milliseconds (the Kafka record timestamp) and RFC 3339 text.

    Events of one transaction share their timestamp, so the last parse is kept;
    with one event per transaction every event brings a new one, so the parse
    is cheap: the whole seconds (date, time of day and zone) are converted once
    per second and cached, the fraction is added as digits. The RFC 3339 text
    is built only when asked for (CloudEvents' ``time``).
    """

    __slots__ = ("_head", "_iso", "_micros", "_ms", "_seconds", "_text", "_whole", "_zone")

    def __init__(self) -> None:
        self._text: str | None = None
        self._whole = 0  # epoch seconds of the last timestamp, whole
        self._micros = 0  # and its fraction, in microseconds
        self._ms = 0
        self._iso: str | None = None
        self._seconds: dict[str, int] = {}  # 'YYYY-MM-DD HH:MM:SS±zone' -> epoch seconds
        #: 'YYYY-MM-DD HH:MM:SS.' and the zone of the last timestamp: a next one
        #: with both (the same second, most often) only needs its fraction read.
        self._head: str | None = None
        self._zone = ""

    def _parse(self, commit_time: str) -> None:
        head = self._head
        if head is not None and commit_time.startswith(head) and commit_time.endswith(self._zone):
            digits = commit_time[20 : len(commit_time) - len(self._zone)]
            if 0 < len(digits) <= 6 and digits.isdigit():
                self._set(commit_time, self._whole, int(digits) * _SCALE[len(digits)])
                return
        # 'YYYY-MM-DD HH:MM:SS' (19 characters), an optional '.' and 1-6
        # digits, then the zone ('+00', '-03:30'). Anything else: the general parse.
        self._head = None
        if commit_time[19:20] == ".":
            zone = commit_time.find("+", 20)
            if zone < 0:
                zone = commit_time.find("-", 20)
            digits = commit_time[20:zone]
            ok = zone > 0 and 0 < len(digits) <= 6 and digits.isdigit()
            micros = int(digits) * _SCALE[len(digits)] if ok else -1
        else:
            zone, micros = 19, 0
        if micros < 0:
            moment = datetime.fromisoformat(commit_time)
            whole, micros = int(moment.replace(microsecond=0).timestamp()), moment.microsecond
        else:
            whole_text = commit_time[:19] + commit_time[zone:]
            found = self._seconds.get(whole_text)
            if found is None:
                found = int(datetime.fromisoformat(whole_text).timestamp())
                if len(self._seconds) >= 1024:
                    self._seconds.clear()
                self._seconds[whole_text] = found
            whole = found
            self._head = commit_time[:19] + "."
            self._zone = commit_time[zone:]
        self._set(commit_time, whole, micros)

    def _set(self, commit_time: str, whole: int, micros: int) -> None:
        self._whole = whole
        self._micros = micros
        self._ms = whole * 1000 + micros // 1000
        self._iso = None
        self._text = commit_time

    def epoch(self, commit_time: str) -> float:
        if commit_time != self._text:
            self._parse(commit_time)
        return self._whole + self._micros / 1e6

    def millis(self, commit_time: str | None) -> int:
        """Epoch milliseconds (0, "now" to librdkafka, when there is no commit time)."""
        if commit_time is None:
            return 0
        if commit_time != self._text:
            self._parse(commit_time)
        return self._ms

    def rfc3339(self, commit_time: str) -> str:
        if commit_time != self._text:
            self._parse(commit_time)
        if self._iso is None:
            moment = datetime.fromtimestamp(self._whole, UTC).replace(microsecond=self._micros)
            self._iso = moment.isoformat().replace("+00:00", "Z")
        return self._iso


#: Microseconds per unit of a fraction with this many digits.
_SCALE = (0, 100_000, 10_000, 1_000, 100, 10, 1)


def format_lsn(lsn: int) -> str:
    """Postgres's notation of a WAL position: '16/B374D848'."""
    return "%X/%X" % (lsn >> 32, lsn & 0xFFFFFFFF)  # noqa: UP031 (the fastest form)


def parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    if not low:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)
