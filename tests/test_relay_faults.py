"""The relay under faults: kill -9, broker outage, Postgres restart, idle slot,
standby takeover, a huge transaction. Nothing may be lost; repeats keep their id."""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from participants.examples.embedded import LocalPostgres
from tests.conftest import PgServer
from tests.support import (
    RelayProcess,
    background_writer,
    consume,
    create_topics,
    headers_of,
    wait_until,
    write_events,
)
from walsaga import schema

pytestmark = pytest.mark.slow


def topic_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def ids_in(records: list) -> Counter[str]:  # type: ignore[type-arg]
    return Counter(headers_of(m)["id"] for m in records)


def test_kill_9_at_random_moments_loses_nothing(
    tmp_path: Path, walsaga_db: str, broker: str
) -> None:
    topic = topic_name("order")
    create_topics(broker, [topic], partitions=3)
    rng = random.Random(7)
    relay = RelayProcess.start(tmp_path, bootstrap=broker, sources={"orders": walsaga_db})
    try:
        relay.wait_streaming("orders")
        with background_writer(walsaga_db, aggregatetype=topic, per_txn=5) as ids:
            for _ in range(8):
                time.sleep(rng.uniform(0.2, 1.2))
                relay.kill()
                time.sleep(rng.uniform(0.0, 0.3))
                relay.launch()
                relay.wait_streaming("orders", timeout_s=30)
            time.sleep(0.5)
        written = list(ids)
        records = consume(broker, [topic], until=lambda r: set(ids_in(r)) >= set(written))
        assert relay.terminate() == 0
    finally:
        relay.kill()
    seen = ids_in(records)
    assert set(seen) == set(written), "every committed event was published"
    repeats = sum(seen.values()) - len(seen)
    print(f"kill -9 x8: {len(written)} events, {repeats} repeats ({repeats / len(written):.1%})")
    # Repeats are allowed (at-least-once) but only from the unacknowledged
    # window: usually under 1% here. A relay that did not confirm between kills
    # would send everything again after each one, about four times the events
    # over eight kills. On a loaded machine a restarted relay can be killed
    # again before Kafka acknowledged anything, and sends its window a second
    # time (a third of the events, seen once).
    assert repeats < len(written), f"{repeats} repeats for {len(written)} events"
    values = {}
    for m in records:
        values.setdefault(headers_of(m)["id"], set()).add(m.value())
    assert all(len(v) == 1 for v in values.values()), "a repeat carries the same event"


def test_a_paused_broker_loses_nothing_and_flow_resumes(
    tmp_path: Path, walsaga_db: str, own_broker: object
) -> None:
    broker = own_broker  # an EmbeddedBroker of this test only
    topic = topic_name("order")
    with RelayProcess.start(
        tmp_path,
        bootstrap=broker.bootstrap_servers,  # type: ignore[attr-defined]
        sources={"orders": walsaga_db},
    ) as relay:
        relay.wait_streaming("orders")
        first = write_events(walsaga_db, 300, aggregatetype=topic)
        broker.pause()  # type: ignore[attr-defined]
        try:
            during = write_events(walsaga_db, 300, aggregatetype=topic, start=300)
            time.sleep(3)
        finally:
            broker.resume()  # type: ignore[attr-defined]
        after = write_events(walsaga_db, 300, aggregatetype=topic, start=600)
        expected = set(first + during + after)
        records = consume(
            broker.bootstrap_servers,  # type: ignore[attr-defined]
            [topic],
            until=lambda r: set(ids_in(r)) >= expected,
            timeout_s=90,
        )
        assert set(ids_in(records)) == expected
        assert relay.terminate() == 0


def test_a_postgres_restart_mid_stream_loses_nothing(
    tmp_path: Path, pg_server: PgServer, make_database: object, broker: str
) -> None:
    if pg_server.cluster is None:
        pytest.skip("needs a cluster the tests can restart")
    dsn: str = make_database()  # type: ignore[operator]
    with psycopg.connect(dsn) as conn:
        from walsaga import schema

        schema.apply(conn, "core")
    topic = topic_name("order")
    with RelayProcess.start(tmp_path, bootstrap=broker, sources={"orders": dsn}) as relay:
        relay.wait_streaming("orders")
        before = write_events(dsn, 500, aggregatetype=topic)
        pg_server.cluster.restart()
        after = write_events(dsn, 500, aggregatetype=topic, start=500)
        expected = set(before + after)
        records = consume(broker, [topic], until=lambda r: set(ids_in(r)) >= expected, timeout_s=90)
        assert set(ids_in(records)) == expected
        relay.wait_streaming("orders", timeout_s=30)
        assert relay.terminate() == 0
        assert "stream interrupted, retrying" in relay.read_log()


@pytest.fixture
def own_cluster() -> Iterator[LocalPostgres]:
    """A Postgres cluster of the test's own. A slot's restart position cannot
    pass the oldest transaction open anywhere in its cluster, so a transaction
    another test left open on the shared cluster would hold it."""
    base = Path(tempfile.mkdtemp(prefix="walsaga-test-pg-"))
    base.chmod(0o755)  # the cluster runs as another user when started as root
    cluster = LocalPostgres(base / "pg", durable=False)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


def test_an_idle_outbox_on_a_busy_cluster_keeps_the_slot_moving(
    tmp_path: Path, own_cluster: LocalPostgres, broker: str
) -> None:
    walsaga_db = own_cluster.create_database("orders")
    with psycopg.connect(walsaga_db) as conn:
        schema.apply(conn, "core")
    other = own_cluster.create_database("other")
    with RelayProcess.start(
        tmp_path,
        bootstrap=broker,
        sources={"orders": walsaga_db},
        relay={"heartbeat_interval_s": 1.0},
    ) as relay:
        relay.wait_streaming("orders")
        with (
            psycopg.connect(walsaga_db, autocommit=True) as conn,
            psycopg.connect(other, autocommit=True) as busy,
        ):
            conn.execute("CREATE TABLE legacy (id serial PRIMARY KEY, body text)")
            busy.execute("CREATE TABLE noise (id serial PRIMARY KEY, body text)")

            def retained() -> tuple[int, int]:
                """WAL not yet confirmed, and WAL the server keeps for the slot."""
                row = conn.execute(
                    "SELECT pg_current_wal_lsn() - confirmed_flush_lsn, "
                    "pg_current_wal_lsn() - restart_lsn FROM pg_replication_slots "
                    "WHERE slot_name = 'walsaga_orders'"
                ).fetchone()
                assert row is not None
                return int(row[0]), int(row[1])

            written = 0
            lags = []
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline:
                # Writes in the same database (not the outbox) and in another one.
                conn.execute("INSERT INTO legacy (body) SELECT repeat('x', 500) "
                             "FROM generate_series(1, 2000)")  # fmt: skip
                busy.execute("INSERT INTO noise (body) SELECT repeat('y', 500) "
                              "FROM generate_series(1, 2000)")  # fmt: skip
                written += 2 * 2000 * 500
                lags.append((*retained(), written))
                time.sleep(0.2)
        # The slot follows the WAL: what it holds back stays far below what was
        # written. Postgres moves restart_lsn only at its running-transactions
        # records (every 15 s, later on a loaded machine), so the kept WAL grows
        # with every write between two of them, then drops. A slot that never
        # moves keeps more than was written (WAL is larger than the rows' text).
        print("written", written, "lags", lags)
        assert written > 100_000_000
        late = lags[len(lags) // 2 :]
        assert max(unconfirmed for unconfirmed, _, _ in late) < 5_000_000, lags
        moving = lags[len(lags) // 4 :]
        assert min(kept / so_far for _, kept, so_far in moving) < 0.5, lags
        assert relay.terminate() == 0


def test_a_standby_takes_over_within_seconds_and_nothing_is_lost(
    tmp_path: Path, walsaga_db: str, broker: str
) -> None:
    topic = topic_name("order")
    sources = {"orders": walsaga_db}
    a = RelayProcess.start(tmp_path, bootstrap=broker, sources=sources, name="a")
    b = RelayProcess.start(tmp_path, bootstrap=broker, sources=sources, name="b")
    try:
        wait_until(
            lambda: {a.state("orders"), b.state("orders")} == {"streaming", "standby"},
            timeout_s=30,
            what="one streaming, one standing by",
        )
        active, standby = (a, b) if a.state("orders") == "streaming" else (b, a)
        with background_writer(walsaga_db, aggregatetype=topic) as ids:
            time.sleep(1.0)
            active.kill()
            killed_at = time.monotonic()
            standby.wait_streaming("orders", timeout_s=15)
            takeover_s = time.monotonic() - killed_at
            time.sleep(1.0)
        written = list(ids)
        records = consume(broker, [topic], until=lambda r: set(ids_in(r)) >= set(written))
        assert set(ids_in(records)) == set(written)
        assert takeover_s < 5, f"takeover took {takeover_s:.1f}s"
        assert standby.terminate() == 0
    finally:
        a.kill()
        b.kill()


def test_a_million_event_transaction_keeps_memory_bounded(
    tmp_path: Path, walsaga_db: str, broker: str
) -> None:
    topic = topic_name("bulk")
    create_topics(broker, [topic], partitions=4)
    count = 1_000_000
    with RelayProcess.start(tmp_path, bootstrap=broker, sources={"bulk": walsaga_db}) as relay:
        relay.wait_streaming("bulk")
        with psycopg.connect(walsaga_db) as conn:
            conn.execute(
                """
                INSERT INTO walsaga.outbox (aggregatetype, aggregateid, type, payload)
                SELECT %s, (i %% 1000)::text, 'Bulk',
                       jsonb_build_object('n', i, 'pad', repeat('p', 100))
                FROM generate_series(1, %s) AS i
                """,
                (topic, count),
            )
        wait_until(
            lambda: relay.published("bulk") >= count,
            timeout_s=300,
            interval_s=0.5,
            what="a million events published",
        )
        peak_kb = next(
            int(line.split()[1])
            for line in Path(f"/proc/{relay.pid}/status").read_text().splitlines()
            if line.startswith("VmHWM:")
        )
        assert relay.terminate() == 0
    assert peak_kb < 200 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
