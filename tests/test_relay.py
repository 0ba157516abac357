"""The relay end to end: real Postgres with wal2json, a real broker, `walsaga relay`."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import tomllib
import uuid
from collections import defaultdict
from pathlib import Path

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from participants.examples.embedded import EmbeddedBroker, LocalPostgres, free_port
from relay.wal2json import parse_lsn
from tests.support import (
    WALSAGA,
    RelayProcess,
    consume,
    create_topics,
    headers_of,
    relay_toml,
    wait_until,
    write_events,
)
from walsaga import schema
from walsaga.config import write_toml


def topic_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def test_events_arrive_once_each_in_order_per_aggregate_with_contract_headers(
    tmp_path: Path, walsaga_db: str, broker: str
) -> None:
    orders, trips = topic_name("order"), topic_name("trip")
    create_topics(broker, [orders, trips], partitions=4)
    count = 20_000
    with RelayProcess.start(tmp_path, bootstrap=broker, sources={"orders": walsaga_db}) as relay:
        relay.wait_streaming("orders")
        ids = write_events(walsaga_db, count, aggregatetype=orders, aggregates=37, per_txn=50)
        with psycopg.connect(walsaga_db) as conn:
            # Rolled back: must publish nothing.
            with conn.transaction(force_rollback=True):
                write_events(walsaga_db, 0)
                conn.execute("SELECT walsaga.publish(%s, 'ghost', 'Ghost', '{}')", (orders,))
            # Table-less events, with and without the outbox.
            row = conn.execute(
                "SELECT walsaga.emit(%s, 't1', 'TripBooked', %s, %s)",
                (trips, '{"legs": 2}', '{"saga_id": "t"}'),
            ).fetchone()
            assert row is not None
            emitted = str(row[0])
        records = consume(broker, [orders, trips], until=lambda r: len(r) >= count + 1)
        assert relay.terminate() == 0

    by_id = defaultdict(list)
    for msg in records:
        by_id[headers_of(msg)["id"]].append(msg)
    assert set(by_id) == {*ids, emitted}, "every event exactly once, nothing else"
    assert all(len(v) == 1 for v in by_id.values())

    last_n: dict[str, int] = {}
    for msg in sorted(records, key=lambda m: (m.partition(), m.offset())):
        if msg.topic() != orders:
            continue
        payload = json.loads(msg.value())
        agg = msg.key().decode()
        assert payload["agg"] == agg
        assert payload["n"] > last_n.get(agg, -1), "per-aggregate order kept"
        last_n[agg] = payload["n"]
    assert len({m.partition() for m in records if m.topic() == orders}) == 4

    sample = by_id[ids[123]][0]
    headers = headers_of(sample)
    assert set(headers) == {"id", "type", "aggregatetype", "aggregateid", "source", "lsn", "xid",
                            "saga_id"}  # fmt: skip
    assert headers["type"] == "Counted"
    assert headers["aggregatetype"] == orders
    assert headers["aggregateid"] == sample.key().decode()
    assert headers["source"] == "orders"
    assert headers["saga_id"] == "s"
    assert "/" in headers["lsn"]
    assert headers["xid"].isdigit()
    trip = by_id[emitted][0]
    assert trip.topic() == trips
    assert json.loads(trip.value()) == {"legs": 2}
    assert headers_of(trip)["saga_id"] == "t"


def test_sigterm_flushes_confirms_and_exits_zero(
    tmp_path: Path, walsaga_db: str, broker: str
) -> None:
    topic = topic_name("order")
    with RelayProcess.start(tmp_path, bootstrap=broker, sources={"orders": walsaga_db}) as relay:
        relay.wait_streaming("orders")
        write_events(walsaga_db, 500, aggregatetype=topic)
        with psycopg.connect(walsaga_db, autocommit=True) as conn:
            end = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
            wait_until(lambda: relay.published("orders") >= 500, timeout_s=30)
            assert relay.terminate() == 0
            caught_up, active = conn.execute(
                "SELECT confirmed_flush_lsn >= %s, active FROM pg_replication_slots "
                "WHERE slot_name = 'walsaga_orders'",
                end,
            ).fetchone()  # type: ignore[misc]
        assert caught_up, "everything published was confirmed before exit"
        assert not active
        assert "stopped" in relay.read_log()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"/metrics has no {name}{labels}"
    return samples[key]


def test_health_and_metrics_are_served(tmp_path: Path, walsaga_db: str, broker: str) -> None:
    topic = topic_name("order")
    create_topics(broker, [topic], partitions=2)
    launched = time.time()
    with RelayProcess.start(tmp_path, bootstrap=broker, sources={"orders": walsaga_db}) as relay:
        relay.wait_streaming("orders")
        write_events(walsaga_db, 10, aggregatetype=topic)
        records = consume(broker, [topic], until=lambda r: len(r) >= 10)
        last_lsn = max(parse_lsn(headers_of(m)["lsn"]) for m in records)

        def scrape() -> Samples:
            return parse_metrics(relay.metrics())

        # What Kafka acknowledged is counted, and the position confirmed follows.
        wait_until(
            lambda: sample(scrape(), "walsaga_relay_events_published_total", source="orders") >= 10,
            timeout_s=30,
        )
        wait_until(
            lambda: sample(scrape(), "walsaga_relay_confirmed_lsn", source="orders") >= last_lsn,
            timeout_s=30,
            what=f"the confirmed position to reach {last_lsn}",
        )
        wait_until(
            lambda: sample(scrape(), "walsaga_relay_in_flight", source="orders") == 0, timeout_s=30
        )
        samples = scrape()
        report = relay.health()
        with psycopg.connect(walsaga_db, autocommit=True) as conn:
            [(wal_end,)] = conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchall()
        now = time.time()

    source = {"source": "orders"}
    assert sample(samples, "walsaga_relay_events_published_total", **source) == 10
    assert sample(samples, "walsaga_relay_bytes_published_total", **source) == sum(
        len(m.key() or b"") + len(m.value() or b"") for m in records
    )
    assert sample(samples, "walsaga_relay_streaming", **source) == 1
    assert sample(samples, "walsaga_relay_halted", **source) == 0
    assert sample(samples, "walsaga_relay_stream_restarts_total", **source) == 0
    assert last_lsn <= sample(samples, "walsaga_relay_confirmed_lsn", **source) <= wal_end
    assert 0 <= sample(samples, "walsaga_relay_slot_lag_bytes", **source) < 1 << 30
    errors = {k: v for k, v in samples.items() if k[0] == "walsaga_relay_errors_total"}
    assert not any(errors.values()), errors

    # One latency observation per batch of acknowledged events.
    count = sample(samples, "walsaga_relay_commit_to_ack_seconds_count", **source)
    total = sample(samples, "walsaga_relay_commit_to_ack_seconds_sum", **source)
    assert 1 <= count <= 10
    assert 0 < total < 30 * count
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == "walsaga_relay_commit_to_ack_seconds_bucket"
        and dict(labels)["source"] == "orders"
    )
    assert len(buckets) > 10
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), "buckets are cumulative"
    assert buckets[-1] == (float("inf"), count)

    # The standard process metrics are the relay process's own.
    assert launched - 5 <= sample(samples, "process_start_time_seconds") <= now
    assert sample(samples, "process_resident_memory_bytes") > 10 * 1024 * 1024
    assert sample(samples, "process_cpu_seconds_total") > 0
    assert sample(samples, "process_open_fds") > 0
    assert any(name == "python_info" for name, _ in samples)

    assert report is not None
    assert report["status"] == "ok"
    assert report["sources"]["orders"]["slot"] == "walsaga_orders"
    assert report["sources"]["orders"]["commit_to_ack_ms"]["p50"] is not None


def test_outbox_rows_are_removed_after_the_retention_and_replay_republishes(
    tmp_path: Path, walsaga_db: str, broker: str
) -> None:
    topic = topic_name("order")
    with RelayProcess.start(
        tmp_path,
        bootstrap=broker,
        sources={"orders": walsaga_db},
        relay={"outbox_retention_s": 0, "cleanup_interval_s": 0.2},
    ) as relay:
        relay.wait_streaming("orders")
        ids = write_events(walsaga_db, 200, aggregatetype=topic)
        with psycopg.connect(walsaga_db, autocommit=True) as conn:
            wait_until(
                lambda: conn.execute("SELECT count(*) FROM walsaga.outbox").fetchone() == (0,),
                timeout_s=30,
                what="published rows removed",
            )
        relay.terminate()
    assert len(consume(broker, [topic], until=lambda r: len(r) >= 200)) == 200

    # With a retention, rows stay and `relay replay` can publish them again.
    replayed = topic_name("replayed")
    config = relay_toml(tmp_path / "replay.toml", bootstrap=broker, sources={"orders": walsaga_db})
    write_events(walsaga_db, 30, aggregatetype=replayed)
    with psycopg.connect(walsaga_db, autocommit=True) as conn:
        ids = [str(r[0]) for r in conn.execute(
            "SELECT id FROM walsaga.outbox WHERE aggregatetype = %s ORDER BY created_at",
            (replayed,),
        )]  # fmt: skip
    out = subprocess.run(
        [WALSAGA, "relay", "replay", "--config", str(config), "--source", "orders",
         "--from-id", ids[10]],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "20 events" in out.stdout
    records = consume(broker, [replayed], until=lambda r: len(r) >= 20, timeout_s=20)
    assert sorted(headers_of(m)["id"] for m in records) == sorted(ids[10:])
    assert all(headers_of(m)["walsaga.replay"] == "1" for m in records)


def test_setup_problems_stop_the_relay_with_what_to_do(
    tmp_path: Path, empty_db: str, walsaga_db: str, broker: str
) -> None:
    # Schema not deployed.
    with RelayProcess.start(
        tmp_path, bootstrap=broker, sources={"legacy": empty_db}, name="a"
    ) as relay:
        assert relay.wait_exit() == 2
        assert "walsaga deploy --dsn" in relay.read_log()

    # A role without the REPLICATION attribute.
    role = f"norepl_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(walsaga_db, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
    dsn = psycopg.conninfo.make_conninfo(walsaga_db, user=role)
    with RelayProcess.start(tmp_path, bootstrap=broker, sources={"svc": dsn}, name="b") as relay:
        assert relay.wait_exit() == 2
        assert "lacks the REPLICATION attribute" in relay.read_log()


def test_a_bad_config_names_the_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[kafka]\n"bootstrap.servers" = "x"\n[relay]\nhttp_prt = 1\n'
                      '[[source]]\nname = "a"\ndsn = "b"\n')  # fmt: skip
    out = subprocess.run([WALSAGA, "relay", "--config", str(config)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert f"{config}: relay.http_prt: unknown key" in out.stderr
    assert "Traceback" not in out.stderr


def test_wal_level_and_missing_wal2json_are_reported(tmp_path: Path, broker: str) -> None:
    base = Path(tempfile.mkdtemp(prefix="walsaga-test-pg-"))
    base.chmod(0o755)
    cases = [
        ("replica", {"wal_level": "replica"}, "wal_level=logical"),
        ("nolib", {"dynamic_library_path": "/nonexistent"}, "wal2json output plugin is not"),
    ]
    try:
        for name, settings, expected in cases:
            cluster = LocalPostgres(base / name, durable=False, settings=settings)
            cluster.start()
            try:
                dsn = cluster.create_database("svc")
                with psycopg.connect(dsn) as conn:
                    schema.apply(conn, "core")
                with RelayProcess.start(
                    tmp_path, bootstrap=broker, sources={"svc": dsn}, name=name
                ) as relay:
                    assert relay.wait_exit() == 2
                    assert expected in relay.read_log()
            finally:
                cluster.stop(mode="immediate")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_an_unreachable_broker_is_awaited_and_then_used(tmp_path: Path, walsaga_db: str) -> None:
    port = free_port()
    topic = topic_name("order")
    with RelayProcess.start(
        tmp_path, bootstrap=f"127.0.0.1:{port}", sources={"orders": walsaga_db}
    ) as relay:
        wait_until(lambda: "waiting for kafka" in relay.read_log(), timeout_s=30)
        assert relay.state("orders") == "waiting"
        ids = write_events(walsaga_db, 100, aggregatetype=topic)
        with EmbeddedBroker(port=port) as late:
            relay.wait_streaming("orders", timeout_s=60)
            # The topic exists once its first record is in: a consumer that
            # subscribed before would be told it does not exist.
            wait_until(lambda: relay.published("orders") >= 100, timeout_s=60)
            records = consume(late.bootstrap_servers, [topic], until=lambda r: len(r) >= 100)
            assert sorted(headers_of(m)["id"] for m in records) == sorted(ids)
            assert relay.terminate() == 0


def test_a_vanished_slot_is_reported_never_silently_recreated(
    tmp_path: Path, walsaga_db: str, broker: str
) -> None:
    with RelayProcess.start(tmp_path, bootstrap=broker, sources={"orders": walsaga_db}) as relay:
        relay.wait_streaming("orders")
        assert relay.terminate() == 0
    with psycopg.connect(walsaga_db, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot('walsaga_orders')")
    relay.launch()
    assert relay.wait_exit() == 3
    assert "has disappeared" in relay.read_log()
    assert "walsaga relay replay" in relay.read_log()
    out = subprocess.run(
        [WALSAGA, "relay", "reset-slot", "--config", str(relay.config), "--source", "orders"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    relay.launch()
    relay.wait_streaming("orders")
    assert relay.terminate() == 0


def test_a_slot_made_at_deploy_keeps_events_written_before_the_relay_first_runs(
    tmp_path: Path, empty_db: str, broker: str
) -> None:
    out = subprocess.run(
        [WALSAGA, "deploy", "--dsn", empty_db, "--with", "saga", "--slot", "walsaga_early"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "saga: applied version" in out.stdout
    assert "slot walsaga_early: created" in out.stdout
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT to_regclass('walsaga.saga') IS NOT NULL").fetchone() == (True,)
    topic = topic_name("early")
    create_topics(broker, [topic], partitions=2)
    ids = write_events(empty_db, 40, aggregatetype=topic)  # no relay yet
    config = relay_toml(tmp_path / "early.toml", bootstrap=broker, sources={"early": empty_db})
    data = tomllib.loads(config.read_text())
    data["source"][0]["slot"] = "walsaga_early"
    write_toml(config, data)
    relay = RelayProcess(config, tmp_path / "early.log", http_port=0)
    relay.launch()
    try:
        records = consume(broker, [topic], until=lambda r: len(r) >= 40, timeout_s=60)
        assert sorted(headers_of(m)["id"] for m in records) == sorted(ids)
        # A healthy slot is not reset by accident.
        assert relay.terminate() == 0
        refused = subprocess.run(
            [WALSAGA, "relay", "reset-slot", "--config", str(config)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode != 0
        assert "is healthy" in refused.stderr
    finally:
        relay.kill()


def test_an_event_on_an_idle_relay_leaves_without_waiting_for_linger(
    tmp_path: Path, walsaga_db: str, broker: str
) -> None:
    # linger.ms batches under load; an event alone (a saga's next step) should
    # not wait for it, unless linger_when_idle asks for that.
    topic = topic_name("idle")
    create_topics(broker, [topic], partitions=1)
    p50 = {}
    for linger_when_idle in (False, True):
        name = f"relay-{linger_when_idle}"
        with RelayProcess.start(
            tmp_path,
            bootstrap=broker,
            sources={"orders": walsaga_db},
            name=name,
            kafka={"linger.ms": 400},
            relay={"linger_when_idle": linger_when_idle},
        ) as relay:
            relay.wait_streaming("orders")
            for n in range(1, 6):  # one at a time: nothing in flight when each is read
                write_events(walsaga_db, 1, aggregatetype=topic)

                def published(n: int = n) -> bool:
                    report = relay.health()
                    sources = report["sources"] if report is not None else {}
                    return bool(sources) and sources["orders"]["events_published"] >= n

                wait_until(published, timeout_s=30, what=f"event {n} acknowledged")
            report = relay.health()
            assert report is not None
            p50[linger_when_idle] = report["sources"]["orders"]["commit_to_ack_ms"]["p50"]
    assert p50[False] < 200, p50
    assert p50[True] >= 400, p50
