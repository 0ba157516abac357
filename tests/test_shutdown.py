"""Every long-running command stops when asked, broker or not.

Each of `walsaga relay`, `participant`, `order-service`, `travel-service`,
`tracker` and `registration-service` (the notifier: handlers and effect
worker) runs against a database and a broker of the test's own. The broker dies before
the SIGTERM, or a moment after it (while the consumer or producer is being
closed); either way the process exits within its shutdown bound, counted from
the signal, and its last log line says how it ended. A second SIGTERM exits at
once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer

from participants.examples import orders
from participants.examples.embedded import EmbeddedBroker, free_port
from participants.examples.registration import saga as registration
from participants.examples.travel import car
from tests.support import WALSAGA, RelayProcess, create_topics, wait_until, write_events
from tests.tracker_support import tracker_toml
from walsaga import schema
from walsaga.config import write_toml
from walsaga.lifecycle import EXIT_FORCED

#: The shutdown bound every command is given here.
BOUND_S = 3.0
#: What the bound leaves out: the interpreter's own exit, a loaded machine.
MARGIN_S = 1.5

COMMANDS = [
    "relay",
    "participant",
    "order-service",
    "travel-service",
    "tracker",
    "registration-service",
]

#: The last line of a stop, by how it ended.
EXITED = {
    "relay": "relay exited",
    "participant": "exited",
    "order-service": "order service exited",
    "travel-service": "exited",
    "tracker": "exited",
    "registration-service": "exited",
}
FORCED = f"did not stop within {BOUND_S:g}s"
SECOND = "second signal: exiting now"


@dataclass
class Running:
    """One command under test, in a process of its own, its log in a file."""

    command: str
    proc: subprocess.Popen[bytes]
    log: Path
    #: Something for the process to be busy with when it stops (events in flight...).
    load: Callable[[], None] = lambda: None

    def read_log(self) -> str:
        return self.log.read_text(errors="replace")

    def last_line(self) -> str:
        lines = [line for line in self.read_log().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def signal(self, signum: int = signal.SIGTERM) -> float:
        """Send `signum`; return the moment it was sent."""
        sent = time.monotonic()
        self.proc.send_signal(signum)
        return sent

    def wait_exit(self, since: float) -> tuple[int, float]:
        """Wait for the exit (a generous while longer than the bound); return the
        status and the seconds from `since`."""
        try:
            status = self.proc.wait(BOUND_S + 30)
        except subprocess.TimeoutExpired:
            log = self.read_log()[-3000:]
            raise AssertionError(f"{self.command} did not exit:\n{log}") from None
        return status, time.monotonic() - since

    def wait_stopping(self) -> None:
        """Wait until the process has handled the first signal."""
        wait_until(lambda: "stopping" in self.read_log(), timeout_s=5, what="the stop begun")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _launch(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [WALSAGA, *args], stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ)
        )


def _wait_healthy(proc: subprocess.Popen[bytes], log: Path, port: int) -> None:
    def up() -> bool:
        assert proc.poll() is None, f"exited at start; log:\n{log.read_text()[-3000:]}"
        return _healthy(port)

    wait_until(up, timeout_s=90, interval_s=0.2, what=f"{log.stem} healthy")


def feed(broker: EmbeddedBroker, topic: str, dsn: str, count: int = 20) -> None:
    """Records for a consumer to handle (no handler takes their type: they are
    skipped), so that its stop has offsets to commit."""
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    for i in range(count):
        producer.produce(
            topic, key=str(i), value=b"{}", headers={"id": str(uuid.uuid4()), "type": "Noise"}
        )
    assert producer.flush(30) == 0

    def handled() -> bool:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*) FROM walsaga.inbox").fetchone()
        return row is not None and row[0] >= count

    wait_until(handled, timeout_s=60, what="records handled")


def start_relay(tmp_path: Path, make_database: Any, broker: EmbeddedBroker) -> Running:
    dsn = make_database("shop")
    with psycopg.connect(dsn) as conn:
        schema.apply(conn, "core")
    relay = RelayProcess.start(
        tmp_path,
        bootstrap=broker.bootstrap_servers,
        sources={"shop": dsn},
        relay={"shutdown_timeout_s": BOUND_S},
    )
    relay.wait_streaming("shop", timeout_s=60)
    write_events(dsn, 20)
    wait_until(lambda: relay.published("shop") >= 20, timeout_s=30, what="events published")

    def events_in_flight() -> None:
        # Events Kafka cannot acknowledge: the stop waits for them, up to its bound.
        write_events(dsn, 50, start=20)
        time.sleep(0.5)

    assert relay.proc is not None
    return Running("relay", relay.proc, relay.log, load=events_in_flight)


def start_participant(tmp_path: Path, make_database: Any, broker: EmbeddedBroker) -> Running:
    dsn = make_database("declared")
    with psycopg.connect(dsn) as conn:
        schema.apply(conn, "core")
    topic = f"shutdown-{uuid.uuid4().hex[:6]}"
    create_topics(broker.bootstrap_servers, [topic])
    port = free_port()
    config = write_toml(
        tmp_path / "handlers.toml",
        {
            "participant": {
                "name": f"declared-{uuid.uuid4().hex[:6]}",
                "dsn": dsn,
                "shutdown_timeout_s": BOUND_S,
                "http_host": "127.0.0.1",
                "http_port": port,
            },
            "kafka": {"bootstrap.servers": broker.bootstrap_servers},
            "handler": [{"topic": topic, "sql": "SELECT 1"}],
        },
    )
    log = tmp_path / "participant.log"
    proc = _launch(["participant", "--config", str(config)], log)
    _wait_healthy(proc, log, port)
    feed(broker, topic, dsn)
    return Running("participant", proc, log)


def start_order_service(tmp_path: Path, make_database: Any, broker: EmbeddedBroker) -> Running:
    dsn = make_database("orders")
    port = free_port()
    log = tmp_path / "order-service.log"
    proc = _launch(
        ["order-service", "--dsn", dsn, "--bootstrap-servers", broker.bootstrap_servers,
         "--mode", "orchestration", "--host", "127.0.0.1", "--port", str(port),
         "--shutdown-timeout", str(BOUND_S)],
        log,
    )  # fmt: skip
    _wait_healthy(proc, log, port)
    feed(broker, orders.CUSTOMER_TOPIC, dsn)
    return Running("order-service", proc, log)


def start_travel_service(tmp_path: Path, make_database: Any, broker: EmbeddedBroker) -> Running:
    dsn = make_database("car")
    port = free_port()
    log = tmp_path / "car-service.log"
    proc = _launch(
        ["travel-service", "--service", "car", "--dsn", dsn,
         "--bootstrap-servers", broker.bootstrap_servers, "--install",
         "--http-port", str(port), "--name", f"car-service-{uuid.uuid4().hex[:6]}",
         "--shutdown-timeout", str(BOUND_S)],
        log,
    )  # fmt: skip
    _wait_healthy(proc, log, port)
    feed(broker, car.COMMANDS, dsn)
    return Running("travel-service", proc, log)


def start_tracker(tmp_path: Path, make_database: Any, broker: EmbeddedBroker) -> Running:
    dsn = make_database("tracker")
    topic = f"shutdown-{uuid.uuid4().hex[:6]}"
    create_topics(broker.bootstrap_servers, [topic])
    port = free_port()
    config = tracker_toml(
        tmp_path / "tracker.toml", dsn=dsn, broker=broker.bootstrap_servers, topics=[topic],
        tracker={"shutdown_timeout_s": BOUND_S, "http_host": "127.0.0.1", "http_port": port},
    )  # fmt: skip
    log = tmp_path / "tracker.log"
    proc = _launch(["tracker", "--config", str(config)], log)
    _wait_healthy(proc, log, port)
    feed(broker, topic, dsn)
    return Running("tracker", proc, log)


def start_registration_service(
    tmp_path: Path, make_database: Any, broker: EmbeddedBroker
) -> Running:
    dsn = make_database("notifier")
    port = free_port()
    log = tmp_path / "notifier.log"
    proc = _launch(
        ["registration-service", "--service", "notifier", "--dsn", dsn,
         "--bootstrap-servers", broker.bootstrap_servers, "--install",
         "--http-port", str(port), "--shutdown-timeout", str(BOUND_S)],
        log,
    )  # fmt: skip
    _wait_healthy(proc, log, port)
    feed(broker, registration.NOTIFIER_COMMANDS, dsn)
    return Running("registration-service", proc, log)


STARTERS = {
    "relay": start_relay,
    "participant": start_participant,
    "order-service": start_order_service,
    "travel-service": start_travel_service,
    "tracker": start_tracker,
    "registration-service": start_registration_service,
}


@pytest.fixture(params=COMMANDS)
def running(
    request: pytest.FixtureRequest, tmp_path: Path, make_database: Any, own_broker: EmbeddedBroker
) -> Iterator[Running]:
    started = STARTERS[request.param](tmp_path, make_database, own_broker)
    try:
        yield started
    finally:
        if started.proc.poll() is None:
            started.proc.kill()
            started.proc.wait(10)


def kill_broker(broker: EmbeddedBroker) -> None:
    os.kill(broker.pid, signal.SIGKILL)
    broker.stop()  # reaps it


def assert_stopped_within_the_bound(running: Running, status: int, took_s: float) -> None:
    last = running.last_line()
    log = running.read_log()[-4000:]
    assert took_s <= BOUND_S + MARGIN_S, f"{running.command} took {took_s:.1f}s:\n{log}"
    if status == 0:
        assert EXITED[running.command] in last, f"last line: {last!r}\n{log}"
    else:
        assert status == EXIT_FORCED, f"status {status}:\n{log}"
        assert FORCED in last, f"last line: {last!r}\n{log}"


@pytest.mark.slow
def test_with_the_broker_gone_sigterm_stops_within_the_bound(
    running: Running, own_broker: EmbeddedBroker
) -> None:
    kill_broker(own_broker)
    running.load()
    time.sleep(1)  # the clients notice
    sent = running.signal()
    status, took_s = running.wait_exit(sent)
    assert_stopped_within_the_bound(running, status, took_s)
    # The clients retry every 100 ms or so; the log says so a few times, not
    # once per attempt (a line per client kind, and one per participant).
    refused = [line for line in running.read_log().splitlines() if "Connection refused" in line]
    assert len(refused) <= 8, "\n".join(refused)


@pytest.mark.slow
def test_a_broker_lost_during_the_stop_does_not_hold_it_past_the_bound(
    running: Running, own_broker: EmbeddedBroker
) -> None:
    # A broker that stops answering, then dies while the client waits for it
    # (offsets being committed, events being acknowledged).
    own_broker.pause()
    running.load()
    sent = running.signal()
    running.wait_stopping()
    time.sleep(0.3)
    kill_broker(own_broker)
    status, took_s = running.wait_exit(sent)
    assert_stopped_within_the_bound(running, status, took_s)


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once(running: Running, own_broker: EmbeddedBroker) -> None:
    # Without a broker the first stop takes most of its bound (a consumer that
    # cannot commit, events that cannot be acknowledged).
    kill_broker(own_broker)
    running.load()
    running.signal()
    running.wait_stopping()
    assert running.proc.poll() is None, f"already stopped:\n{running.read_log()[-3000:]}"
    second = running.signal()
    status, took_s = running.wait_exit(second)
    assert status == EXIT_FORCED, running.read_log()[-3000:]
    assert took_s <= 1.0, f"took {took_s:.1f}s after the second signal"
    assert SECOND in running.last_line(), running.read_log()[-3000:]
