"""The relay's pure core: decoding, the acknowledgement window, routing, config."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import RelayConfig, load_relay_config
from relay.routing import UNROUTABLE_TOPIC, Router
from relay.wal2json import HEARTBEAT, CommitTimes, DecodeError, decode, format_lsn, parse_lsn
from relay.window import AckWindow, DeliveryError
from walsaga.errors import ConfigError


def insert_message(**overrides: str) -> bytes:
    row = {
        "id": "0190c2a4-7b7e-7c1a-9f00-1234567890ab",
        "aggregatetype": "order",
        "aggregateid": "42",
        "type": "OrderCreated",
        "payload": '{"total": 10, "note": "a \\"quoted\\" word"}',
        "headers": '{"saga_id": "s-1", "attempt": 2}',
        "created_at": "2026-11-22 00:07:53.808812+00",
        **overrides,
    }
    return orjson.dumps(
        {
            "action": "I",
            "xid": 727,
            "timestamp": "2026-11-22 00:07:53.80986+00",
            "schema": "walsaga",
            "table": "outbox",
            "columns": [{"name": k, "value": v} for k, v in row.items()],
        }
    )


def test_an_outbox_insert_decodes_to_an_event_with_its_payload_untouched() -> None:
    event = decode(insert_message())
    assert event is not None
    assert event is not HEARTBEAT
    assert (event.id, event.aggregatetype, event.aggregateid, event.type) == (  # type: ignore[union-attr]
        "0190c2a4-7b7e-7c1a-9f00-1234567890ab",
        "order",
        "42",
        "OrderCreated",
    )
    assert orjson.loads(event.payload) == {"total": 10, "note": 'a "quoted" word'}  # type: ignore[union-attr]
    assert event.headers == {"saga_id": "s-1", "attempt": 2}  # type: ignore[union-attr]
    assert event.xid == 727  # type: ignore[union-attr]


def test_columns_in_another_order_still_decode() -> None:
    msg = orjson.loads(insert_message())
    msg["columns"].reverse()
    event = decode(orjson.dumps(msg))
    assert event is not None
    assert event.aggregateid == "42"


def test_a_table_less_message_decodes_and_a_heartbeat_is_position_only() -> None:
    content = {
        "id": "e1",
        "aggregatetype": "trip",
        "aggregateid": "7",
        "type": "TripBooked",
        "payload": {"a": 1},
        "headers": {"saga_id": "t"},
    }
    msg = {"action": "M", "xid": 9, "transactional": True, "prefix": "walsaga",
           "content": orjson.dumps(content).decode()}  # fmt: skip
    event = decode(orjson.dumps(msg))
    assert event is not None
    assert event is not HEARTBEAT
    assert orjson.loads(event.payload) == {"a": 1}  # type: ignore[union-attr]
    beat = {"action": "M", "transactional": False, "prefix": "walsaga.heartbeat", "content": ""}
    assert decode(orjson.dumps(beat)) is HEARTBEAT
    other = {"action": "M", "transactional": True, "prefix": "someone-else", "content": "x"}
    assert decode(orjson.dumps(other)) is None


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        orjson.dumps({"action": "M", "prefix": "walsaga", "content": '{"id": "x"}'}),
        orjson.dumps({"action": "M", "prefix": "walsaga", "content": "{"}),
    ],
)
def test_malformed_events_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


def test_lsn_notation_round_trips() -> None:
    assert format_lsn(0x16B374D848) == "16/B374D848"
    assert parse_lsn("16/B374D848") == 0x16B374D848
    assert parse_lsn(format_lsn(123456789)) == 123456789


def test_commit_times_parse_wal2json_timestamps() -> None:
    times = CommitTimes()
    assert times.epoch("1970-01-01 00:00:01.5+00") == 1.5
    assert times.epoch("1970-01-01 01:00:00+01") == 0.0
    assert times.millis("2026-11-22 00:07:53.80986+00") == 1795306073809
    assert times.rfc3339("2026-11-22 00:07:53.80986+00") == "2026-11-22T00:07:53.809860Z"
    assert times.rfc3339("2026-11-22 01:07:53+01") == "2026-11-22T00:07:53Z"


def postgres_timestamp(moment: datetime) -> str:
    """`moment` as Postgres prints a timestamptz (what wal2json writes)."""
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    offset = moment.utcoffset()
    assert offset is not None
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, rest = divmod(abs(minutes), 60)
    return f"{text}{sign}{hours:02d}" + (f":{rest:02d}" if rest else "")


_ZONES = st.sampled_from([0, 60, -180, 330, 345, -570, 840, -720]).map(
    lambda m: timezone(timedelta(minutes=m))
)


@given(
    st.lists(
        st.tuples(
            st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1)),
            _ZONES,
            st.sampled_from([0, 1, 2, 3]),  # how many of the next ones share its second
        ),
        min_size=1,
        max_size=20,
    )
)
@settings(max_examples=300, deadline=None)
def test_commit_times_agree_with_the_general_parse(
    moments: list[tuple[datetime, timezone, int]],
) -> None:
    times = CommitTimes()  # one instance: its cache of whole seconds is exercised
    texts = []
    for naive, zone, repeats in moments:
        moment = naive.replace(tzinfo=zone)
        texts.append(postgres_timestamp(moment))
        for i in range(repeats):  # the same second, another fraction
            texts.append(postgres_timestamp(moment.replace(microsecond=(i * 370_001) % 1_000_000)))
    for text in texts:
        expected = datetime.fromisoformat(text)
        micros = int(expected.replace(microsecond=0).timestamp()) * 1_000_000 + expected.microsecond
        assert times.millis(text) == micros // 1000, text
        assert times.epoch(text) == pytest.approx(micros / 1e6, abs=1e-6), text
        iso = expected.astimezone(UTC).isoformat().replace("+00:00", "Z")
        assert times.rfc3339(text) == iso, text


def test_window_confirms_only_past_events_acknowledged_with_everything_before() -> None:
    window = AckWindow(100, max_group=1)
    a = window.event(110)
    b = window.event(120)
    c = window.event(130)
    window.seal()
    assert window.advance() == 100
    c.ack(None, None)  # out of order: a later partition acknowledged first
    assert window.advance() == 100
    a.ack(None, None)
    assert window.advance() == 110
    b.ack(None, None)
    assert window.advance() == 130


def test_position_only_messages_wait_for_the_events_before_them() -> None:
    window = AckWindow(100)
    window.position(150)
    assert window.advance() == 150
    group = window.event(160)
    window.position(170)  # heartbeat after an unacknowledged event
    window.position(500)  # keepalive
    assert window.advance() == 150
    group.ack(None, None)
    assert window.advance() == 500


def test_window_never_moves_backwards() -> None:
    window = AckWindow(1000)
    group = window.event(900)  # an interleaved transaction's earlier change
    group.ack(None, None)
    assert window.advance() == 1000


def test_a_delivery_error_stops_the_window() -> None:
    window = AckWindow(0)
    group = window.event(10)
    group.ack("Broker: Message size too large", None)
    with pytest.raises(DeliveryError):
        window.advance()


def test_router_follows_the_contract() -> None:
    event = decode(insert_message())
    router = Router("outbox.event.{aggregatetype}", "customers")
    topic, headers = router.route(event, 0x16B374D848)  # type: ignore[arg-type]
    assert topic == "outbox.event.order"
    assert headers == {
        "id": "0190c2a4-7b7e-7c1a-9f00-1234567890ab",
        "type": "OrderCreated",
        "aggregatetype": "order",
        "aggregateid": "42",
        "source": "customers",
        "lsn": "16/B374D848",
        "xid": "727",
        "saga_id": "s-1",
        "attempt": b"2",
    }


def test_a_row_header_cannot_replace_a_standard_one() -> None:
    event = decode(insert_message(headers='{"id": "forged", "saga_id": "s"}'))
    _, headers = Router("{aggregatetype}", "src").route(event, 1)  # type: ignore[arg-type]
    assert headers["id"] == "0190c2a4-7b7e-7c1a-9f00-1234567890ab"


def test_an_illegal_topic_goes_to_the_unroutable_topic_with_its_name() -> None:
    event = decode(insert_message(aggregatetype="bad topic/name"))
    topic, headers = Router("{aggregatetype}", "src").route(event, 1)  # type: ignore[arg-type]
    assert topic == UNROUTABLE_TOPIC
    assert headers["walsaga.unroutable"] == "bad topic/name"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


GOOD = """
[kafka]
"bootstrap.servers" = "127.0.0.1:9092"
[relay]
http_port = 9200
[[source]]
name = "customers"
dsn = "postgresql://relay@127.0.0.1/customers"
"""


def test_config_defaults_and_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    config = load_relay_config(
        path,
        environ={
            "WALSAGA_RELAY__HTTP_PORT": "9300",
            "WALSAGA_KAFKA__BOOTSTRAP_SERVERS": "kafka:29092",
            "WALSAGA_KAFKA__LINGER_MS": "5",
            "WALSAGA_SOURCE__CUSTOMERS__DSN": "postgresql://relay:secret@db/customers",
        },
    )
    assert config.relay.http_port == 9300
    assert config.relay.topic_template == "{aggregatetype}"
    # librdkafka takes every setting as text: pass-through values stay strings.
    assert config.kafka == {"bootstrap.servers": "kafka:29092", "linger.ms": "5"}
    assert config.source[0].dsn == "postgresql://relay:secret@db/customers"
    assert config.source[0].slot_name == "walsaga_customers"
    settings = config.producer_settings()
    assert settings["enable.idempotence"] is True
    assert settings["acks"] == "all"


def test_environment_values_are_text_unless_the_schema_says_otherwise(tmp_path: Path) -> None:
    # A secret that looks like a date, a number or a boolean stays the text it is.
    path = write(tmp_path, GOOD)
    config = load_relay_config(
        path,
        environ={
            "WALSAGA_SOURCE__CUSTOMERS__DSN": "2024-01-01",
            "WALSAGA_KAFKA__SASL_PASSWORD": "1e3",
            "WALSAGA_RELAY__TOPIC_TEMPLATE": "true",
            "WALSAGA_RELAY__FEEDBACK_INTERVAL_S": "0.5",
        },
    )
    assert config.source[0].dsn == "2024-01-01"
    assert config.kafka["sasl.password"] == "1e3"
    assert config.relay.topic_template == "true"
    assert config.relay.feedback_interval_s == 0.5


def test_a_bad_environment_value_names_its_variable(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as info:
        load_relay_config(path, environ={"WALSAGA_RELAY__HTTP_PORT": "high"})
    assert "relay.http_port (from WALSAGA_RELAY__HTTP_PORT)" in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("http_port = 9200", 'http_port = "high"'), "relay.http_port"),
        (GOOD.replace("http_port = 9200", "htp_port = 1"), "relay.htp_port: unknown key"),
        (GOOD.replace('"bootstrap.servers"', '"bootstrap"'), '"bootstrap.servers" is required'),
        (GOOD + "[relay\n", "not valid TOML"),
        (GOOD.replace('name = "customers"', 'name = "a b"'), "source['a b'].name"),
        (GOOD + '\n[[source]]\nname = "customers"\ndsn = "x"\n', "share the name 'customers'"),
        (GOOD.replace("[relay]", '[relay]\ntopic_template = "{table}"'), "unknown field"),
    ],
)
def test_bad_config_names_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_relay_config(path, environ={})
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_acks_cannot_be_weakened(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('"127.0.0.1:9092"', '"127.0.0.1:9092"\nacks = "1"'))
    with pytest.raises(ConfigError, match="acks"):
        load_relay_config(path, environ={})


def test_a_config_needs_a_source() -> None:
    with pytest.raises(Exception, match="source"):
        RelayConfig.model_validate({"kafka": {"bootstrap.servers": "x"}})


def expected_record(data: bytes, lsn: int, router: Router) -> object:
    """What the general path (decode, then route) makes of a message."""
    event = decode(data)
    if event is None or event is HEARTBEAT:
        return event
    topic, headers = router.route(event, lsn)  # type: ignore[arg-type]
    return topic, event.payload, event.aggregateid, headers, event.commit_time  # type: ignore[union-attr]


def reordered(data: bytes) -> bytes:
    msg = orjson.loads(data)
    msg["columns"].reverse()
    return orjson.dumps(msg)


@pytest.mark.parametrize(
    "data",
    [
        insert_message(),
        insert_message(headers="{}"),
        insert_message(headers='{"id": "forged", "n": 1, "flag": true, "nested": {"a": [1]}}'),
        insert_message(headers='{"none": null}'),
        insert_message(payload="null", aggregateid="ü-7"),
        insert_message(aggregatetype="bad topic/name"),
        reordered(insert_message()),
        orjson.dumps({"action": "M", "xid": 9, "transactional": True, "prefix": "walsaga",
                      "content": orjson.dumps({"id": "e1", "aggregatetype": "trip",
                                               "aggregateid": "7", "type": "TripBooked",
                                               "payload": {"a": 1}}).decode()}),
        orjson.dumps({"action": "M", "transactional": False, "prefix": "walsaga.heartbeat",
                      "content": ""}),
        orjson.dumps({"action": "M", "transactional": True, "prefix": "other", "content": "x"}),
        orjson.dumps({"action": "I", "xid": 1, "timestamp": "2026-11-22 00:07:53+00",
                      "schema": "public", "table": "orders", "columns": []}),
    ],
)  # fmt: skip
def test_the_hot_path_builds_the_same_record_as_decode_and_route(data: bytes) -> None:
    lsn = 0x16B374D848
    expected = expected_record(data, lsn, Router("{aggregatetype}", "customers"))
    assert Router("{aggregatetype}", "customers").record(data, lsn) == expected


def test_the_hot_path_follows_the_lsn_and_xid_of_each_message() -> None:
    router = Router("{aggregatetype}-{type}", "src")
    for lsn, xid in [(0x10, 5), (0x20, 5), (0x1_0000_0030, 6), (0x2_0000_0000, 7), (0x40, 5)]:
        msg = orjson.loads(insert_message())
        msg["xid"] = xid
        data = orjson.dumps(msg)
        record = router.record(data, lsn)
        assert record == expected_record(data, lsn, Router("{aggregatetype}-{type}", "src"))
        assert record[3]["lsn"] == format_lsn(lsn)  # type: ignore[index]
        assert record[3]["xid"] == str(xid)  # type: ignore[index]


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        insert_message(headers="[1, 2]"),
        insert_message(headers='"text"'),
        orjson.dumps({"action": "M", "prefix": "walsaga", "content": '{"id": "x"}'}),
    ],
)
def test_the_hot_path_rejects_what_decode_rejects(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)
    with pytest.raises(DecodeError):
        Router("{aggregatetype}", "src").record(data, 1)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    aggregatetype=st.text(min_size=1),
    aggregateid=st.text(),
    type_=st.text(),
    payload=json_values,
    headers=st.dictionaries(st.text(), json_values, max_size=4),
    lsn=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_the_hot_path_agrees_with_decode_and_route_on_any_row(
    aggregatetype: str, aggregateid: str, type_: str, payload: object, headers: object, lsn: int
) -> None:
    data = insert_message(
        aggregatetype=aggregatetype,
        aggregateid=aggregateid,
        type=type_,
        payload=orjson.dumps(payload).decode(),
        headers=orjson.dumps(headers).decode(),
    )
    template = "{aggregatetype}.{type}"
    expected = expected_record(data, lsn, Router(template, "s"))
    assert Router(template, "s").record(data, lsn) == expected


def test_sources_can_come_from_the_environment_alone() -> None:
    config = load_relay_config(
        None,
        environ={
            "WALSAGA_KAFKA__BOOTSTRAP_SERVERS": "kafka:9092",
            "WALSAGA_SOURCE__ORDERS__DSN": "postgresql://relay@db/orders",
            "WALSAGA_SOURCE__CUSTOMERS__DSN": "postgresql://relay@db/customers",
            "WALSAGA_SOURCE__CUSTOMERS__SLOT": "customers_slot",
        },
    )
    found = {s.name: (s.dsn, s.slot_name) for s in config.source}
    assert found == {
        "orders": ("postgresql://relay@db/orders", "walsaga_orders"),
        "customers": ("postgresql://relay@db/customers", "customers_slot"),
    }


def test_a_variable_naming_a_source_the_file_lacks_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="no \\[\\[source\\]\\] named 'ordrs'"):
        load_relay_config(path, environ={"WALSAGA_SOURCE__ORDRS__DSN": "x"})
