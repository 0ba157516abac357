"""A W3C traceparent follows a saga across every hop, and the spans form one trace.

Against real Postgres, the relay process and the broker; the participants run
in this process with OpenTelemetry's SDK and an in-memory exporter, so the
spans each hop exported can be held against the Kafka records: every record of
a saga carries the same trace id, each hop a span of its own whose parent is
the span of the record that caused it.
"""

from __future__ import annotations

import json
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from participants.examples import orders
from participants.examples.travel import trip
from relay import deploy
from relay.capture import parse_spec
from tests.shop import TOPICS as SHOP_TOPICS
from tests.shop import running_shop
from tests.support import RelayProcess, consume, create_topics, headers_of
from tests.travel_support import TOPICS as TRAVEL_TOPICS
from tests.travel_support import running_travel
from walsaga import tracing

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """Spans exported by this process (OpenTelemetry's provider is set once per process)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    return _EXPORTER


def records_of(broker: str, topics: list[str], saga_id: str, until: Any) -> list[Any]:
    found = consume(
        broker,
        topics,
        until=lambda r: until([m for m in r if headers_of(m).get("saga_id") == saga_id]),
        timeout_s=90,
    )
    return [m for m in found if headers_of(m).get("saga_id") == saga_id]


def assert_one_trace(records: list[Any], root: tracing.TraceContext, exported: Any) -> None:
    """Every record in `root`'s trace; each hop's span a child of the span that sent
    the record it handled (its ``causation_id``)."""
    contexts = {}
    for record in records:
        headers = headers_of(record)
        context = tracing.from_headers(headers)
        assert context is not None, f"{headers.get('type')} has no traceparent"
        assert context.trace_id == root.trace_id, headers.get("type")
        contexts[headers["id"]] = (headers, context)
    by_span = {f"{s.context.span_id:016x}": s for s in exported.get_finished_spans()}
    hops = 0
    for headers, context in contexts.values():
        cause = headers.get("causation_id")
        if cause is None or cause not in contexts:
            # Written by the transaction that started the saga: the root's span.
            assert context.span_id == root.span_id, headers.get("type")
            continue
        cause_context = contexts[cause][1]
        assert context.span_id != cause_context.span_id, "each hop a span of its own"
        hop = by_span.get(context.span_id)
        assert hop is not None, f"no span exported for the hop that wrote {headers['type']}"
        assert hop.parent is not None
        assert f"{hop.parent.span_id:016x}" == cause_context.span_id, (
            f"{headers['type']}: its hop's parent is not the span of {contexts[cause][0]['type']}"
        )
        assert f"{hop.context.trace_id:032x}" == root.trace_id
        hops += 1
    assert hops >= 3, "the saga went through several hops"


@pytest.mark.parametrize("mode", ["orchestration", "choreography"])
def test_an_order_saga_is_one_trace_across_every_hop(
    tmp_path: Path,
    make_database: Any,
    broker: str,
    mode: orders.Mode,
    spans: InMemorySpanExporter,
) -> None:
    with running_shop(tmp_path, make_database, broker, mode) as shop:
        with (
            tracing.span("place order", None, kind="producer") as root,
            psycopg.connect(shop.orders_dsn) as conn,
        ):
            order_id = orders.create_order(
                conn, "c2", 10, mode=mode, orchestrator=shop.orchestrator, trace=root
            )
        assert shop.wait_settled([order_id]) == {order_id: "APPROVED"}
        ending = "OrderApproved" if mode == "choreography" else "CreditConfirmed"
        records = records_of(
            broker, SHOP_TOPICS, order_id,
            until=lambda r: any(headers_of(m).get("type") == ending for m in r),
        )  # fmt: skip
        assert_one_trace(records, root, spans)


def test_a_trip_saga_is_one_trace_across_every_hop(
    tmp_path: Path, make_database: Any, broker: str, spans: InMemorySpanExporter
) -> None:
    day = date.today() + timedelta(days=40)
    with running_travel(
        tmp_path,
        make_database,
        broker,
        flights={"TP1": 5},
        hotels={"H1": 5},
        car_classes={"C1": 5},
    ) as site:
        request = trip.TripRequest("ana", "TP1", "H1", day, day + timedelta(days=2), "C1")
        with tracing.span("book trip", None, kind="producer") as root, site.connect("trip") as conn:
            trip_id = trip.book_trip(conn, request, orchestrator=site.orchestrator, trace=root)
        assert site.wait_settled([trip_id])[trip_id].status == "CONFIRMED"
        records = records_of(
            broker, TRAVEL_TOPICS, trip_id,
            until=lambda r: sum(headers_of(m).get("type", "").endswith("Confirmed")
                                for m in r) >= 3,
        )  # fmt: skip
        assert_one_trace(records, root, spans)


SPEC = """
[[capture]]
table = "public.notes"
on = ["insert"]
event = "NoteWritten"
aggregate_type = "{topic}"
aggregate_id = "id"
mode = "{mode}"
"""


@pytest.mark.parametrize("mode", ["outbox", "message"])
def test_a_capture_trigger_carries_the_trace_the_transaction_set_and_none_otherwise(
    walsaga_db: str, broker: str, tmp_path: Path, mode: str
) -> None:
    topic = f"notes-{uuid.uuid4().hex[:6]}"
    create_topics(broker, [topic], partitions=1)
    with psycopg.connect(walsaga_db) as conn:
        conn.execute("CREATE TABLE public.notes (id int PRIMARY KEY, body text)")
        conn.commit()
        deploy.deploy(conn, parse_spec(SPEC.format(topic=topic, mode=mode), source="notes.toml"))
    relay = RelayProcess.start(tmp_path, bootstrap=broker, sources={"notes": walsaga_db})
    traced = tracing.new_span(None)
    with relay, psycopg.connect(walsaga_db) as conn:
        relay.wait_streaming("notes")
        conn.execute("INSERT INTO public.notes VALUES (1, 'untraced')")
        conn.commit()
        conn.execute("SELECT set_config('walsaga.traceparent', %s, true)", (traced.traceparent,))
        conn.execute("SELECT set_config('walsaga.tracestate', 'vendor=on', true)")
        conn.execute("INSERT INTO public.notes VALUES (2, 'traced')")
        conn.commit()
        conn.execute("INSERT INTO public.notes VALUES (3, 'after it')")  # a new transaction
        conn.commit()
        records = consume(broker, [topic], until=lambda r: len(r) >= 3)
    seen = {json.loads(r.value())["id"]: headers_of(r) for r in records}
    assert "traceparent" not in seen[1] and "tracestate" not in seen[1]
    assert seen[2]["traceparent"] == traced.traceparent
    assert seen[2]["tracestate"] == "vendor=on"
    assert "traceparent" not in seen[3]


def test_walsaga_publish_takes_the_transactions_trace_unless_given_one(
    walsaga_db: str,
) -> None:
    mine, theirs = tracing.new_span(None), tracing.new_span(None)
    with psycopg.connect(walsaga_db) as conn:
        conn.execute("SELECT set_config('walsaga.traceparent', %s, true)", (mine.traceparent,))
        conn.execute("SELECT walsaga.publish('t', 'k', 'A', '{}', '{}')")
        conn.execute(
            "SELECT walsaga.publish('t', 'k', 'B', '{}', %s::jsonb)",
            (json.dumps({"traceparent": theirs.traceparent}),),
        )
        conn.commit()
        conn.execute("SELECT walsaga.publish('t', 'k', 'C', '{}', '{}')")
        conn.commit()
        rows = dict(conn.execute("SELECT type, headers FROM walsaga.outbox").fetchall())
    assert rows["A"] == {"traceparent": mine.traceparent}
    assert rows["B"] == {"traceparent": theirs.traceparent}
    assert rows["C"] == {}


def test_traceparents_are_read_strictly() -> None:
    good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert tracing.parse(good) == tracing.TraceContext(
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01"
    )
    for bad in (
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    ):
        assert tracing.parse(bad) is None, bad
    child = tracing.new_span(tracing.parse(good, "a=b"))
    assert child.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert child.span_id != "00f067aa0ba902b7" and child.state == "a=b"
