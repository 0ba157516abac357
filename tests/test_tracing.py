"""A W3C traceparent follows a saga across every hop, and the spans form one trace.

Against real Postgres, the relay process and the broker; the participants run
in this process with OpenTelemetry's SDK and an in-memory exporter, so the
spans each hop exported can be held against the Kafka records: every record of
a saga carries the same trace id, each hop a span of its own whose parent is
the span of the record that caused it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from participants.effects.http import HttpCall, HttpRequest
from participants.effects.model import Effect
from participants.examples import orders
from participants.examples.embedded import free_port
from participants.examples.registration import intake
from participants.examples.registration import saga as registration
from participants.examples.registration.serving import Served
from participants.examples.travel import trip
from relay import deploy
from relay.capture import parse_spec
from tests.registration_support import running_registration, submission
from tests.shop import TOPICS as SHOP_TOPICS
from tests.shop import running_order_service, running_shop
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
    """The saga's records once `until` holds and the record each was caused by has
    arrived too (partitions of several topics are read at different paces: the
    last record may come before its cause), or three seconds after `until`."""
    satisfied: list[float] = []

    def done(records: list[Any]) -> bool:
        own = [m for m in records if headers_of(m).get("saga_id") == saga_id]
        if not until(own):
            return False
        satisfied.append(time.monotonic())
        mine = [headers_of(m) for m in own]
        causes = {h["causation_id"] for h in mine if h.get("causation_id")}
        return causes <= {h.get("id") for h in mine} or time.monotonic() - satisfied[0] > 3.0

    found = consume(broker, topics, until=done, timeout_s=90)
    return [m for m in found if headers_of(m).get("saga_id") == saga_id]


def assert_one_trace(
    records: list[Any],
    root: tracing.TraceContext,
    exported: Any,
    *,
    min_hops: int = 3,
    elsewhere: bool = False,
) -> None:
    """Every record in `root`'s trace; each hop's span a child of the span that sent
    the record it handled (its ``causation_id``), directly or through the hops in
    between that wrote no record (an effect worker's call).

    The records the saga's first transaction wrote carry `root`'s span. With
    `elsewhere`, hops whose spans were exported by another process are only
    checked to be spans of their own.
    """
    contexts = {}
    for record in records:
        headers = headers_of(record)
        context = tracing.from_headers(headers)
        assert context is not None, f"{headers.get('type')} has no traceparent"
        assert context.trace_id == root.trace_id, headers.get("type")
        contexts[headers["id"]] = (headers, context)
    by_span = {f"{s.context.span_id:016x}": s for s in exported.get_finished_spans()}

    def ancestors(span_id: str) -> list[str]:
        found = []
        hop = by_span.get(span_id)
        while hop is not None and hop.parent is not None and len(found) < 4:
            found.append(f"{hop.parent.span_id:016x}")
            hop = by_span.get(found[-1])
        return found

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
        if hop is None and elsewhere:
            continue
        assert hop is not None, f"no span exported for the hop that wrote {headers['type']}"
        assert f"{hop.context.trace_id:032x}" == root.trace_id
        assert cause_context.span_id in ancestors(context.span_id), (
            f"{headers['type']}: its hop descends not from the span of {contexts[cause][0]['type']}"
        )
        hops += 1
    assert hops >= min_hops, f"the saga went through {hops} hops here, expected {min_hops}"


def first_span(records: list[Any]) -> tracing.TraceContext:
    """The context of the records the saga's first transaction wrote (no cause among them)."""
    ids = {headers_of(r)["id"] for r in records}
    first = {
        tracing.from_headers(headers_of(r))
        for r in records
        if headers_of(r).get("causation_id") not in ids
    }
    assert len(first) == 1, f"the first transaction's records carry one span: {first}"
    found = first.pop()
    assert found is not None
    return found


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


#: The client's span: the trace an HTTP request comes with.
CLIENT = tracing.TraceContext(
    "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", state="shop=1"
)
THEIRS = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"


@pytest.mark.parametrize("mode", ["orchestration", "choreography"])
def test_an_order_placed_over_http_continues_the_requests_trace(
    tmp_path: Path,
    make_database: Any,
    broker: str,
    mode: str,
    spans: InMemorySpanExporter,
) -> None:
    """`walsaga order-service` (a process of its own) takes the request's traceparent:
    the saga's records all carry its trace id, the request a span of the service's
    own, and the customer service (here) continues it hop by hop."""
    with running_order_service(tmp_path, make_database, broker, mode) as (_, service):  # type: ignore[arg-type]
        answer = httpx.post(
            f"{service.url}/orders?wait=30",
            json={"customer_id": "c2", "total": "10.00"},
            headers=CLIENT.headers(),
        )
        assert answer.status_code == 200, answer.text
        order_id = answer.json()["id"]
        assert answer.json()["status"] == "APPROVED"
        untraced = httpx.post(f"{service.url}/orders", json={"customer_id": "c2", "total": "1"})
        other_id = untraced.json()["id"]
        ending = "OrderApproved" if mode == "choreography" else "CreditConfirmed"
        records = records_of(
            broker, SHOP_TOPICS, order_id,
            until=lambda r: any(headers_of(m).get("type") == ending for m in r),
        )  # fmt: skip
        others = records_of(broker, SHOP_TOPICS, other_id, until=lambda r: len(r) >= 1)
    root = first_span(records)
    assert root.trace_id == CLIENT.trace_id
    assert root.span_id != CLIENT.span_id, "the request is a span of the service's own"
    assert all(headers_of(r).get("tracestate") == "shop=1" for r in records)
    assert_one_trace(records, root, spans, min_hops=1, elsewhere=True)
    # A request without one starts a trace of its own.
    started = tracing.from_headers(headers_of(others[0]))
    assert started is not None and started.trace_id != CLIENT.trace_id


def test_a_registration_submitted_over_http_is_one_trace_through_its_effects(
    tmp_path: Path, make_database: Any, broker: str, spans: InMemorySpanExporter
) -> None:
    """Intake's HTTP request, the saga's commands and replies, and the effect workers'
    calls to the identity provider and the mail server: one trace, hop by hop."""
    with (
        running_registration(tmp_path, make_database, broker) as site,
        Served(
            intake.create_app(site.dsns["intake"], site.orchestrator), port=free_port()
        ) as served,
    ):
        answer = httpx.post(
            f"{served.url}/registrations?wait=60",
            json=submission(7),
            headers=CLIENT.headers(),
            timeout=70,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "REGISTERED"
        registration_id = answer.json()["id"]
        records = records_of(
            broker, list(registration.TOPICS), registration_id,
            until=lambda r: any(headers_of(m).get("type") == "RegistrationCompleted" for m in r),
        )  # fmt: skip
    root = first_span(records)
    server = {f"{s.context.span_id:016x}": s for s in spans.get_finished_spans()}[root.span_id]
    assert server.name == "POST /registrations"
    assert server.parent is not None and f"{server.parent.span_id:016x}" == CLIENT.span_id
    types = {headers_of(r)["type"] for r in records}
    assert {"UserCreated", "WelcomeSent", "RegistrationCompleted"} <= types
    assert_one_trace(records, root, spans, min_hops=4)
    effects = [s for s in spans.get_finished_spans() if s.name.startswith("effect ")]
    assert {s.name for s in effects} >= {"effect create_user", "effect send_welcome"}
    assert all(f"{s.context.trace_id:032x}" == CLIENT.trace_id for s in effects
               if s.attributes and str(s.attributes.get("walsaga.effect.key", "")).startswith(
                   registration_id))  # fmt: skip


def test_an_effect_call_carries_the_trace_to_the_provider() -> None:
    """The HTTP request an effect worker sends has the effect's traceparent, unless
    the target's template sets one."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b'{"id": "u1"}'[:11])

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/users"
    hop = tracing.new_span(CLIENT)
    effect = Effect("1", "create_user", "r1/create-user", {"email": "a@b.c"},
                    {"saga_id": "r1", **hop.headers()}, "r1", "PENDING", 0,
                    datetime.now(UTC))  # fmt: skip
    try:
        HttpCall(HttpRequest("POST", url))(effect, 5.0)
        HttpCall(HttpRequest("POST", url, {"Traceparent": THEIRS}))(effect, 5.0)
        untraced = Effect("2", "create_user", "r2/create-user", {}, {"saga_id": "r2"}, "r2",
                          "PENDING", 0, datetime.now(UTC))  # fmt: skip
        HttpCall(HttpRequest("POST", url))(untraced, 5.0)
    finally:
        server.shutdown()
        server.server_close()
    assert seen[0]["traceparent"] == hop.traceparent
    assert seen[0]["tracestate"] == "shop=1"
    assert seen[1]["traceparent"] == THEIRS
    assert "traceparent" not in seen[2]


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


def test_a_hop_without_a_tracer_provider_still_gets_a_span_of_its_own() -> None:
    """With OpenTelemetry's API installed but no SDK configured (a process that
    exports nothing), the API hands back the parent's ids; the hop must not."""
    script = (
        "from walsaga import tracing\n"
        f"parent = tracing.parse({CLIENT.traceparent!r}, 'shop=1')\n"
        "with tracing.span('hop', parent) as hop:\n"
        "    print(hop.traceparent, hop.state)\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    hop = tracing.parse(found[0], found[1])
    assert hop is not None and hop.trace_id == CLIENT.trace_id and hop.state == "shop=1"
    assert hop.span_id != CLIENT.span_id
