"""In JSON mode every line a walsaga process writes is one JSON object.

walsaga's own loggers, the standard library's (uvicorn's among them) and
librdkafka's all go through the same renderer: a log collector never meets a
line it cannot parse.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from participants.examples import customers, orders
from participants.examples.embedded import free_port
from tests.shop import TOPICS, OrderServiceProcess
from tests.support import RelayProcess, own_group, wait_until


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "the process logged nothing"
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return parsed


def test_the_order_service_logs_only_json_lines(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    dsn = make_database("orders")
    with psycopg.connect(dsn) as conn:
        orders.install(conn)
    service = OrderServiceProcess(
        ["--dsn", dsn, "--bootstrap-servers", broker, "--mode", "orchestration",
         "--log-format", "json", "--log-level", "info"],
        tmp_path / "order-service.log",
        free_port(),
        group=own_group(broker, "order-service", TOPICS),  # it stops while it joins
    )  # fmt: skip
    service.launch()
    try:
        service.wait_healthy()
    finally:
        assert service.terminate() == 0
    records = json_lines(service.read_log())
    loggers = {r.get("logger") for r in records}
    assert any(name and name.startswith("uvicorn") for name in loggers), loggers
    assert any(r.get("event", "").startswith("order service exited") for r in records)


def test_the_relay_logs_kafka_and_its_own_lines_as_json(tmp_path: Path, walsaga_db: str) -> None:
    # A broker that is not there: librdkafka has plenty to say.
    relay = RelayProcess.start(
        tmp_path,
        bootstrap=f"127.0.0.1:{free_port()}",
        sources={"svc": walsaga_db},
        relay={"log_format": "json"},
    )
    with relay:
        wait_until(lambda: "waiting for kafka" in relay.read_log(), timeout_s=30)
        time.sleep(1)
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_exit(30)
    records = json_lines(relay.read_log())
    assert any(r.get("logger") == "walsaga.kafka" for r in records), "librdkafka's lines"
    assert any(r.get("event") == "relay exited" for r in records)


def test_a_participant_logs_only_json_lines(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    from tests.test_forgiving import Process

    dsn = make_database("customers")
    with psycopg.connect(dsn) as conn:
        customers.install(conn, {"c1": 10.0})
    process = Process(
        ["participant", "--config", str(customers.HANDLERS)],
        tmp_path / "customer-service.log",
        {
            "WALSAGA_PARTICIPANT__DSN": dsn,
            # A group of its own: stopped while it joins, a consumer leaves the
            # embedded broker's group unable to assign anyone after it.
            "WALSAGA_PARTICIPANT__NAME": f"customer-service-{uuid.uuid4().hex[:6]}",
            "WALSAGA_KAFKA__BOOTSTRAP_SERVERS": broker,
            "WALSAGA_PARTICIPANT__LOG_FORMAT": "json",
        },
    )
    process.launch()
    wait_until(lambda: "consuming" in process.log.read_text(), timeout_s=60)
    assert process.proc is not None
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(30) == 0
    records = json_lines(process.log.read_text())
    assert any(r.get("event") == "exited" for r in records)
