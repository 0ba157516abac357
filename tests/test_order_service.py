"""The order service over HTTP: `walsaga order-service` as a process, with the relay,
the broker and the legacy customer service, in both variants of the saga."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from participants.examples.embedded import free_port
from participants.examples.order_service import ApiError, WebhookPolicy, parse_wait
from tests.shop import OrderServiceProcess, Shop, running_order_service
from tests.support import wait_until

MODES = ["choreography", "orchestration"]


# -- helpers ---------------------------------------------------------------------------


@dataclass
class Call:
    answered: int
    headers: dict[str, str]
    body: Any


class WebhookReceiver:
    """A client's webhook endpoint: answers the calls with `answers` in turn (the
    last one repeats) and records them."""

    def __init__(self, answers: list[int], port: int | None = None) -> None:
        self.answers = answers
        self.port = port or free_port()
        self.calls: list[Call] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/orders"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = receiver.answers[min(len(receiver.calls), len(receiver.answers) - 1)]
                receiver.calls.append(
                    Call(status, {k.lower(): v for k, v in self.headers.items()}, json.loads(body))
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def post_order(
    service: OrderServiceProcess, body: Any, *, wait: float | str | None = None
) -> httpx.Response:
    params = {"wait": str(wait)} if wait is not None else {}
    return httpx.post(f"{service.url}/orders", params=params, json=body, timeout=90)


def get_order(service: OrderServiceProcess, order_id: str) -> httpx.Response:
    return httpx.get(f"{service.url}/orders/{order_id}", timeout=10)


def sse_events(stream: httpx.Response) -> Iterator[tuple[str, Any]]:
    """(event, data) of each server-sent event until the stream ends."""
    event = "message"
    data: list[str] = []
    for line in stream.iter_lines():
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue  # keep-alive comment
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


def waiting_requests(service: OrderServiceProcess) -> int:
    return int(httpx.get(f"{service.url}/healthz", timeout=5).json()["waiting_requests"])


def restart(service: OrderServiceProcess, tmp_path: Path, name: str) -> OrderServiceProcess:
    again = service.again(tmp_path / f"{name}.log")
    again.launch()
    again.wait_healthy()
    return again


def settle(shop: Shop, service: OrderServiceProcess, ids: list[str]) -> dict[str, Any]:
    """Every order of `ids` as GET answers it once none is PENDING."""

    def settled() -> dict[str, Any] | None:
        found = {i: get_order(service, i).json() for i in ids}
        return found if all(o["status"] != "PENDING" for o in found.values()) else None

    return wait_until(settled, timeout_s=120, interval_s=0.2, what="orders settled")  # type: ignore[no-any-return]


# -- the pure parts ----------------------------------------------------------------------


def test_wait_is_a_number_of_seconds_capped_at_the_maximum() -> None:
    assert parse_wait(None, max_wait_s=60) is None
    assert parse_wait("2.5", max_wait_s=60) == 2.5
    assert parse_wait("0", max_wait_s=60) == 0
    assert parse_wait("3600", max_wait_s=60) == 60
    for bad in ("soon", "", "-1", "nan", "inf"):
        with pytest.raises(ApiError) as refused:
            parse_wait(bad, max_wait_s=60)
        assert refused.value.status == 400 and refused.value.error == "invalid_wait"


def test_webhook_retries_back_off_and_stop_after_the_last_attempt() -> None:
    policy = WebhookPolicy(max_attempts=5, backoff_s=1.0, backoff_max_s=4.0)
    waits = [policy.retry_in_s(attempt) for attempt in range(1, 6)]
    assert waits[-1] is None
    first, second, third, fourth = (w for w in waits[:-1] if w is not None)
    assert 0.8 <= first <= 1.0 and 1.6 <= second <= 2.0
    assert 3.2 <= third <= 4.0 and 3.2 <= fourth <= 4.0  # capped


# -- end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_orders_are_approved_within_credit_and_rejected_beyond_it(
    tmp_path: Path, make_database: Any, broker: str, mode: str
) -> None:
    with running_order_service(tmp_path, make_database, broker, mode) as (shop, service):  # type: ignore[arg-type]
        approved = post_order(service, {"customer_id": "c1", "total": 60}, wait=30)
        assert approved.status_code == 200
        order = approved.json()
        assert order["status"] == "APPROVED" and order["reason"] is None
        assert order["customer_id"] == "c1" and order["total"] == 60
        assert approved.headers["location"] == f"/orders/{order['id']}"
        assert get_order(service, order["id"]).json() == order

        too_much = post_order(service, {"customer_id": "c1", "total": 50}, wait=30)  # 60 + 50 > 100
        assert too_much.status_code == 200
        assert too_much.json()["status"] == "REJECTED"
        assert "credit limit exceeded" in too_much.json()["reason"]

        # Without a customer directory, the customer service is the one to say.
        unknown = post_order(service, {"customer_id": "nobody", "total": 10}, wait=30)
        assert unknown.status_code == 200
        assert unknown.json()["status"] == "REJECTED"
        assert "unknown customer nobody" in unknown.json()["reason"]

        # Without wait: accepted at once, then polled. Totals may be decimal strings.
        accepted = post_order(service, {"customer_id": "c2", "total": "12.34"})
        assert accepted.status_code == 202
        assert accepted.json()["status"] == "PENDING" and accepted.json()["total"] == 12.34
        location = accepted.headers["location"]
        polled = wait_until(
            lambda: (r := httpx.get(service.url + location).json())["status"] != "PENDING" and r,
            timeout_s=30,
            what="order settled",
        )
        assert polled == {**accepted.json(), "status": "APPROVED"}
        shop.assert_consistent()

        assert httpx.get(f"{service.url}/healthz").json()["mode"] == mode
        metrics = httpx.get(f"{service.url}/metrics").text
        assert f'walsaga_orders_created_total{{mode="{mode}"}} 4.0' in metrics
        assert 'walsaga_participant_messages_total{outcome="handled"' in metrics


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_client_learns_the_outcome_by_waiting_polling_events_or_webhook(
    tmp_path: Path, make_database: Any, broker: str, mode: str
) -> None:
    with (
        running_order_service(tmp_path, make_database, broker, mode) as (shop, service),  # type: ignore[arg-type]
        WebhookReceiver([500, 200]) as hook,
    ):
        # Orders stay PENDING while the customer service is away.
        shop.stop_participant("customer-service")
        started = time.monotonic()
        answer = post_order(
            service, {"customer_id": "c1", "total": 30, "webhook_url": hook.url}, wait=1
        )
        assert answer.status_code == 202, "the wait ran out before the saga ended"
        assert 1 <= time.monotonic() - started < 5
        pending = answer.json()
        assert pending["status"] == "PENDING"
        assert get_order(service, pending["id"]).json() == pending

        with concurrent.futures.ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60) as client:
            waiting = pool.submit(post_order, service, {"customer_id": "c2", "total": 40}, wait=60)
            events_url = f"{service.url}/orders/{pending['id']}/events"
            with client.stream("GET", events_url) as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                events = sse_events(stream)
                assert next(events) == ("status", pending)
                wait_until(
                    lambda: waiting_requests(service) >= 2, timeout_s=10, what="both clients wait"
                )
                shop.start_participant("customer-service")
                event, final = next(events)
                assert event == "status"
                assert final == {**pending, "status": "APPROVED"}
                assert list(events) == [], "the stream ends with the saga"
            waited = waiting.result(60)
        assert waited.status_code == 200
        assert waited.json()["status"] == "APPROVED" and waited.json()["customer_id"] == "c2"
        assert get_order(service, pending["id"]).json() == final

        # A reconnecting EventSource is told there is nothing more.
        again = httpx.get(events_url, headers={"Last-Event-ID": "APPROVED"}, timeout=10)
        assert again.status_code == 204

        # The webhook: refused once, called again, accepted; then left alone.
        wait_until(lambda: len(hook.calls) >= 2, timeout_s=30, what="webhook called twice")
        time.sleep(3)
        assert [c.answered for c in hook.calls] == [500, 200]
        assert all(c.body == final for c in hook.calls)
        assert len({c.headers["walsaga-delivery"] for c in hook.calls}) == 1
        assert hook.calls[0].headers["content-type"] == "application/json"


def test_bad_requests_get_clear_4xx_answers(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    with running_order_service(
        tmp_path, make_database, broker, "choreography", customer_directory=True
    ) as (shop, service):
        orders_url = f"{service.url}/orders"
        good = {"customer_id": "c1", "total": 10}
        refused_bodies: list[tuple[Any, int, str, str | None]] = [
            # body, status, error, field named in the details
            (b'{"customer_id": "c1", "total": ', 400, "malformed_json", None),
            (b"", 400, "malformed_json", None),
            (b"[]", 422, "invalid_order", "body"),
            ({"total": 10}, 422, "invalid_order", "customer_id"),
            ({"customer_id": "c1"}, 422, "invalid_order", "total"),
            ({"customer_id": 42, "total": 10}, 422, "invalid_order", "customer_id"),
            ({"customer_id": " ", "total": 10}, 422, "invalid_order", "customer_id"),
            ({"customer_id": "c1", "total": "ten"}, 422, "invalid_order", "total"),
            ({"customer_id": "c1", "total": True}, 422, "invalid_order", "total"),
            ({"customer_id": "c1", "total": -5}, 422, "invalid_order", "total"),
            ({"customer_id": "c1", "total": 0}, 422, "invalid_order", "total"),
            ({"customer_id": "c1", "total": 10.001}, 422, "invalid_order", "total"),
            ({**good, "webhook_url": "not a url"}, 422, "invalid_order", "webhook_url"),
            ({**good, "coupon": "FREE"}, 422, "invalid_order", "coupon"),
            ({"customer_id": "nobody", "total": 10}, 422, "unknown_customer", "customer_id"),
        ]
        for body, status, error, field in refused_bodies:
            if isinstance(body, bytes):
                answer = httpx.post(orders_url, content=body, timeout=10)
            else:
                answer = httpx.post(orders_url, json=body, timeout=10)
            assert answer.status_code == status, (body, answer.text)
            assert answer.headers["content-type"] == "application/json"
            refusal = answer.json()
            assert refusal["error"] == error, (body, refusal)
            assert refusal["message"]
            if field is not None:
                assert field in [d["field"] for d in refusal["details"]], (body, refusal)
                assert field in refusal["message"] or error == "unknown_customer"

        for wait in ("soon", "-1", "nan", ""):
            answer = httpx.post(orders_url, params={"wait": wait}, json=good, timeout=10)
            assert answer.status_code == 400, (wait, answer.text)
            assert answer.json()["error"] == "invalid_wait"
            assert "wait" in answer.json()["message"]

        for path in ("/orders/no-such-order", "/orders/no-such-order/events"):
            answer = httpx.get(service.url + path, timeout=10)
            assert answer.status_code == 404
            assert answer.json() == {
                "error": "unknown_order",
                "message": "no order 'no-such-order'",
            }
        assert httpx.get(f"{service.url}/nowhere").json()["error"] == "not_found"
        not_allowed = httpx.delete(orders_url)
        assert not_allowed.status_code == 405
        assert not_allowed.json()["error"] == "method_not_allowed"

        with psycopg.connect(shop.orders_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone() == (0,), (
                "no refused request left an order behind"
            )
        answer = post_order(service, good, wait=30)
        assert answer.status_code == 200 and answer.json()["status"] == "APPROVED"


@pytest.mark.slow
def test_sigterm_answers_waiting_clients_and_exits_cleanly(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    with running_order_service(tmp_path, make_database, broker, "choreography") as (
        shop,
        service,
    ):
        shop.stop_participant("customer-service")
        streamed = post_order(service, {"customer_id": "c1", "total": 20}).json()
        events: list[tuple[str, Any]] = []

        def follow() -> None:
            url = f"{service.url}/orders/{streamed['id']}/events"
            with httpx.stream("GET", url, timeout=60) as stream:
                events.extend(sse_events(stream))

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(post_order, service, {"customer_id": "c2", "total": 40}, wait=60)
            following = pool.submit(follow)
            wait_until(
                lambda: waiting_requests(service) >= 2, timeout_s=10, what="both clients wait"
            )
            stopping = time.monotonic()
            assert service.terminate() == 0
            assert time.monotonic() - stopping < 15
            answer = waiting.result(5)
            following.result(5)
        assert answer.status_code == 202 and answer.json()["status"] == "PENDING"
        assert events == [("status", streamed)], "the stream ended, the order still pending"

        # Nothing is lost: after a restart both orders settle.
        service = restart(service, tmp_path, "order-service-2")
        try:
            shop.start_participant("customer-service")
            final = settle(shop, service, [streamed["id"], answer.json()["id"]])
            assert {o["status"] for o in final.values()} == {"APPROVED"}
            assert service.terminate() == 0
        finally:
            service.kill()


@pytest.mark.slow
def test_a_waiting_client_is_answered_across_a_lost_notification_connection(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    with running_order_service(tmp_path, make_database, broker, "orchestration") as (
        shop,
        service,
    ):
        shop.stop_participant("customer-service")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post_order, service, {"customer_id": "c1", "total": 40}, wait=60)
            wait_until(lambda: waiting_requests(service) >= 1, timeout_s=10, what="a client waits")
            with psycopg.connect(shop.orders_dsn, autocommit=True) as conn:
                cut = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
                ).fetchone()
            assert cut == (1,)
            shop.start_participant("customer-service")
            answer = waiting.result(60)
        assert answer.status_code == 200 and answer.json()["status"] == "APPROVED"
        assert httpx.get(f"{service.url}/healthz").json()["listening"] is True


@pytest.mark.slow
def test_webhook_delivery_survives_a_restart_of_the_service(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    hook = WebhookReceiver([200])  # not listening yet: calls are refused
    with running_order_service(tmp_path, make_database, broker, "orchestration") as (
        shop,
        service,
    ):
        answer = post_order(
            service, {"customer_id": "c1", "total": 25, "webhook_url": hook.url}, wait=30
        )
        final = answer.json()
        assert final["status"] == "APPROVED"

        def refused() -> bool:
            with psycopg.connect(shop.orders_dsn) as conn:
                row = conn.execute(
                    "SELECT attempts, last_error FROM webhook_deliveries WHERE order_id = %s",
                    (final["id"],),
                ).fetchone()
            return row is not None and row[0] >= 1 and row[1] is not None

        wait_until(refused, timeout_s=30, what="a refused webhook call")
        assert service.terminate() == 0

        with hook:
            service = restart(service, tmp_path, "order-service-2")
            try:
                wait_until(lambda: hook.calls, timeout_s=30, what="the webhook called")
                time.sleep(2)
                assert len(hook.calls) == 1
                assert hook.calls[0].body == final
            finally:
                service.kill()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_many_orders_at_once_over_http_never_over_commit_a_customer(
    tmp_path: Path, make_database: Any, broker: str, mode: str
) -> None:
    limit = 500.0
    credit = {f"k{i}": limit for i in range(4)}
    amounts = [40, 75, 120, 15, 60, 90]
    jobs = [{"customer_id": f"k{i % 4}", "total": amounts[i % len(amounts)]} for i in range(120)]

    async def order_all(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(jobs))
        async with httpx.AsyncClient(base_url=url, timeout=90, limits=limits) as client:
            return await asyncio.gather(
                *(client.post("/orders", params={"wait": "60"}, json=job) for job in jobs)
            )

    with running_order_service(tmp_path, make_database, broker, mode, credit=credit) as (  # type: ignore[arg-type]
        shop,
        service,
    ):
        answers = asyncio.run(order_all(service.url))
        assert {a.status_code for a in answers} <= {200, 202}
        ids = [a.json()["id"] for a in answers]
        assert len(set(ids)) == len(jobs)
        final = settle(shop, service, ids)
        assert {o["status"] for o in final.values()} <= {"APPROVED", "REJECTED"}
        for a in answers:
            if a.status_code == 200:
                assert a.json() == final[a.json()["id"]], "the wait answered the final order"

        approved: dict[str, float] = defaultdict(float)
        for order in final.values():
            if order["status"] == "APPROVED":
                approved[order["customer_id"]] += order["total"]
        assert approved, "some orders fit"
        assert all(total <= limit for total in approved.values()), approved
        assert any(o["status"] == "REJECTED" for o in final.values()), "some do not"
        shop.assert_consistent()
