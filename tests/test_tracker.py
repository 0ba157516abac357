"""The saga tracker and `walsaga sagas`, against real Postgres and the broker: timelines of
both saga styles, stuck sagas, repeats that change nothing, and repairs of orchestrated
sagas (retry, abort, resolve)."""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer

from participants.message import Message
from participants.orchestrator import saga_log
from participants.timeline import (
    COMMAND,
    COMPENSATING,
    COMPENSATION,
    COMPLETED,
    EVENT,
    Correlation,
    LogEntry,
    Rules,
    SagaRules,
    entry_of,
    timeline,
    trace_id,
)
from participants.tracker_store import SagaFilter, parse_age
from tests.shop import TOPICS, running_shop
from tests.support import consume, wait_until
from tests.tracker_support import (
    ORDER_SAGA,
    Vault,
    running_tracker,
    running_vault,
    sagas_cli,
    tracked,
    tracker_toml,
    vault_config,
)

# -- the pure part ----------------------------------------------------------------

ORDER = SagaRules(
    "order",
    deadline_s=60,
    started_by=frozenset({"OrderCreated"}),
    completed_by=frozenset({"OrderApproved"}),
    compensated_by=frozenset({"OrderRejected"}),
    compensations=frozenset({"CreditReleased"}),
)
RULES = Rules(
    correlate_by=(Correlation("header", "saga_id"), Correlation("payload", "order.id")),
    sagas={"order": ORDER},
)
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def message(type_: str, headers: dict[str, str] | None = None, value: bytes = b"{}") -> Message:
    return Message(
        "t", 0, 1, "k", value, {"type": type_, "id": uuid.uuid4().hex, **(headers or {})}
    )


def test_records_are_correlated_by_header_then_by_payload_field() -> None:
    assert RULES.saga_id(message("X", {"saga_id": "s1"})) == "s1"
    assert RULES.saga_id(message("X", value=b'{"order": {"id": 42}}')) == "42"
    assert RULES.saga_id(message("X", value=b"not json")) is None
    assert RULES.saga_id(message("X", value=b'{"order": {"id": true}}')) is None


def test_an_entry_says_its_saga_type_kind_and_the_status_it_implies() -> None:
    created = entry_of(message("OrderCreated", {"saga_id": "s"}), RULES, T0)
    assert created is not None
    assert (created.saga_type, created.kind, created.status) == ("order", EVENT, "RUNNING")
    approved = entry_of(message("OrderApproved", {"saga_id": "s"}), RULES, T0)
    assert approved is not None and approved.status == COMPLETED and approved.ends
    released = entry_of(message("CreditReleased", {"saga_id": "s"}), RULES, T0)
    assert released is not None and (released.kind, released.status) == (COMPENSATION,
                                                                          COMPENSATING)  # fmt: skip
    command = entry_of(
        message("Take", {"saga_id": "s", "saga_type": "vault", "idempotency_key": "s/take/do"}),
        RULES,
        T0,
    )
    assert command is not None and (command.kind, command.saga_type) == (COMMAND, "vault")
    undo = entry_of(message("GiveBack", {"saga_id": "s", "compensates": "s/take/do"}), RULES, T0)
    assert undo is not None and undo.kind == COMPENSATION
    assert entry_of(message("Other"), RULES, T0) is None


def test_the_trace_id_is_read_from_a_valid_traceparent_only() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_id({"traceparent": tp}) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id({"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"}) is None
    assert trace_id({"traceparent": "garbage"}) is None
    assert trace_id({}) is None


def test_the_timeline_merges_records_and_the_log_and_finds_who_reacted() -> None:
    def at(s: float) -> datetime:
        return T0 + timedelta(seconds=s)

    take = message("Take", {"saga_id": "s", "source": "sagas", "idempotency_key": "s/take/do"})
    taken = message("Taken", {"saga_id": "s", "source": "vault"})
    entries = [
        entry_of(take, RULES, at(1)),
        entry_of(dataclasses.replace(take, headers={**take.headers, "id": "again"}), RULES, at(3)),
        entry_of(taken, RULES, at(4)),
    ]  # fmt: skip
    log = [
        LogEntry(1, at(0.5), "COMMAND", "take", {"key": "s/take/do", "type": "Take"}),
        LogEntry(2, at(2), "RETRY", "take", {"attempt": 2}),
        LogEntry(3, at(2.5), "COMMAND", "take", {"key": "s/take/do", "type": "Take"}),
        LogEntry(4, at(5), "REPLY", "take", {"message_id": taken.id, "outcome": "success"}),
        LogEntry(5, at(6), "COMPENSATING", "check", {"reason": "no"}),
    ]
    lines = timeline([e for e in entries if e], log, orchestrator_lane="sagas")
    assert [line.title for line in lines] == ["Take", "retry", "Take", "Taken", "compensating"]
    first, _, again, reply, compensating = lines
    assert (first.lane, first.target) == ("sagas", "vault")
    assert "resent (2. send)" in again.note
    assert (reply.lane, reply.target, reply.outcome) == ("vault", "sagas", "success")
    assert compensating.compensation and not first.compensation


def test_ages_and_filters_are_checked() -> None:
    assert parse_age("90s") == timedelta(seconds=90)
    assert parse_age("1h") == timedelta(hours=1)
    assert parse_age("2d") == timedelta(days=2)
    with pytest.raises(ValueError, match="number and a unit"):
        parse_age("soon")
    with pytest.raises(ValueError, match="status 'lost'"):
        SagaFilter(status="lost")


# -- choreography ---------------------------------------------------------------------


def timeline_snapshot(dsn: str) -> tuple[Any, ...]:
    with psycopg.connect(dsn) as conn:
        events = conn.execute(
            "SELECT saga_id, event_id, at, type, kind FROM walsaga.saga_event ORDER BY 1, 2"
        ).fetchall()
        sagas = conn.execute(
            "SELECT id, saga_type, status, started_at, ended_at, events, last_type "
            "FROM walsaga.tracked_saga ORDER BY id"
        ).fetchall()
    return events, sagas


@pytest.mark.slow
def test_a_choreography_is_tracked_end_to_end_and_repeats_change_no_timeline(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    tracker_dsn = make_database("tracker")
    config = tracker_toml(tmp_path / "tracker.toml", dsn=tracker_dsn, broker=broker,
                          topics=TOPICS, sagas=[{**ORDER_SAGA, "deadline_s": 60}])  # fmt: skip
    with (
        running_shop(tmp_path, make_database, broker, "choreography") as shop,
        running_tracker(config) as tracker,
    ):
        approved = [shop.order("c2", 10) for _ in range(4)]
        rejected = [shop.order("c1", 500) for _ in range(2)]
        shop.wait_settled(approved + rejected)
        wait_until(
            lambda: all((tracked(tracker_dsn, i) or {}).get("status") == "COMPLETED"
                        for i in approved)
            and all((tracked(tracker_dsn, i) or {}).get("status") == "COMPENSATED"
                    for i in rejected),
            timeout_s=60, what="the tracker to see every saga end",
        )  # fmt: skip
        listed = sagas_cli(config, "list", "--status", "completed")
        assert {s["id"] for s in listed["sagas"]} >= set(approved)
        assert listed["counts"]["completed"] >= 4 and listed["counts"]["compensated"] >= 2
        shown = sagas_cli(config, "show", approved[0])
        assert shown["status"] == "COMPLETED" and shown["type"] == "order"
        types = [line["title"] for line in shown["timeline"]]
        assert types[0] == "OrderCreated" and types[-1] == "OrderApproved"
        assert {"CreditReserved", "OrderAccepted", "CreditConfirmed"} <= set(types)
        assert set(shown["lanes"]) == {"orders", "customers"}
        created = shown["timeline"][0]
        assert (created["from"], created["to"]) == ("orders", "customers")
        assert created["record"]["lsn"] and created["record"]["topic"] == "order"

        # Every record of the shop's topics once more, ids unchanged: no timeline moves,
        # and no saga is counted as ended again.
        before = timeline_snapshot(tracker_dsn)
        registry = tracker.participant.metrics.registry
        ended = {"saga_type": "order", "outcome": "COMPLETED"}
        counted = registry.get_sample_value("walsaga_tracker_sagas_ended_total", ended)
        with psycopg.connect(tracker_dsn) as conn:
            completed = conn.execute(
                "SELECT count(*) FROM walsaga.tracked_saga "
                "WHERE saga_type = 'order' AND status = 'COMPLETED'"
            ).fetchone()
        assert completed is not None and counted == completed[0] >= len(approved)
        mine = set(approved + rejected)
        records = [
            r for r in consume(broker, TOPICS, until=lambda r: False, timeout_s=8)
            if (dict(r.headers() or []).get("saga_id") or b"").decode() in mine
        ]  # fmt: skip
        assert len(records) >= 4 * len(approved)
        producer = Producer({"bootstrap.servers": broker})
        for r in records:
            producer.produce(r.topic(), r.value(), r.key(), headers=r.headers())
        assert producer.flush(30) == 0
        handled = tracker.participant.metrics.handled
        name = tracker.participant.name
        wait_until(
            lambda: handled.labels(name, "duplicate")._value.get() >= len(records),
            timeout_s=60,
            what="the tracker to take every repeat",
        )
        assert timeline_snapshot(tracker_dsn) == before
        assert registry.get_sample_value("walsaga_tracker_sagas_ended_total", ended) == counted


@pytest.mark.slow
def test_a_traced_record_that_arrives_alone_is_recorded_with_its_trace(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    # A record alone in its batch is claimed and its trace set in one statement:
    # the tracker must record it all the same (a registration refused at intake
    # has that one record and nothing else to show it by).
    tracker_dsn = make_database("tracker")
    config = tracker_toml(tmp_path / "tracker.toml", dsn=tracker_dsn, broker=broker,
                          topics=["order"], sagas=[ORDER_SAGA])  # fmt: skip
    producer = Producer({"bootstrap.servers": broker})
    with running_tracker(config):
        for _ in range(3):
            saga, trace = str(uuid.uuid4()), uuid.uuid4().hex
            parent = f"00-{trace}-{uuid.uuid4().hex[:16]}-01"
            headers = [("id", str(uuid.uuid4()).encode()), ("type", b"OrderCreated"),
                       ("saga_id", saga.encode()), ("traceparent", parent.encode())]  # fmt: skip
            producer.produce("order", b"{}", saga.encode(), headers=headers)
            assert producer.flush(30) == 0
            wait_until(lambda saga=saga: tracked(tracker_dsn, saga), timeout_s=30,  # type: ignore[misc]
                       what="the lone record recorded")  # fmt: skip
            with psycopg.connect(tracker_dsn) as conn:
                shown = conn.execute("SELECT trace_id, last_type, status FROM walsaga.tracked_saga "
                                     "WHERE id = %s", (saga,)).fetchone()  # fmt: skip
            assert shown == (trace, "OrderCreated", "RUNNING")


@pytest.mark.slow
def test_a_choreography_whose_reply_never_comes_is_stuck_after_its_deadline(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    tracker_dsn = make_database("tracker")
    config = tracker_toml(tmp_path / "tracker.toml", dsn=tracker_dsn, broker=broker,
                          topics=TOPICS, sagas=[{**ORDER_SAGA, "deadline_s": 8}])  # fmt: skip
    with (
        running_shop(tmp_path, make_database, broker, "choreography") as shop,
        running_tracker(config) as tracker,
    ):
        shop.stop_participant("customer-service")  # nobody answers OrderCreated
        ordered = time.monotonic()
        waiting = shop.order("c2", 10)
        wait_until(lambda: tracked(tracker_dsn, waiting), timeout_s=30, what="the saga seen")
        running = sagas_cli(config, "list", "--status", "running")["sagas"]
        assert waiting in {s["id"] for s in running}
        stuck = wait_until(
            lambda: sagas_cli(config, "list", "--status", "stuck")["sagas"],
            timeout_s=30,
            interval_s=0.5,
            what="the saga listed as stuck",
        )
        assert time.monotonic() - ordered >= 8, "not before its deadline"
        assert [s["id"] for s in stuck] == [waiting]
        assert stuck[0]["stuck"] and stuck[0]["last_type"] == "OrderCreated"
        first = sagas_cli(config, "list")["sagas"][0]
        assert first["id"] == waiting, "stuck sagas are listed first"
        wait_until(
            lambda: (
                tracker.participant.metrics.registry.get_sample_value(
                    "walsaga_tracker_sagas_stuck", {"saga_type": "order"}
                )
                == 1
            ),
            timeout_s=10,
            what="the stuck gauge",
        )
        # The customer service comes back and answers: no longer stuck, it ends.
        shop.start_participant("customer-service")
        shop.wait_settled([waiting])
        wait_until(lambda: (tracked(tracker_dsn, waiting) or {}).get("status") == "COMPLETED",
                   timeout_s=60, what="the saga to end")  # fmt: skip
        assert sagas_cli(config, "list", "--status", "stuck")["sagas"] == []


# -- orchestration and repairs -----------------------------------------------------------


@pytest.fixture
def vault(
    tmp_path: Path, make_database: Any, broker: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Vault]:
    with running_vault(tmp_path, make_database, broker, monkeypatch) as found:
        yield found


@pytest.mark.slow
def test_a_failed_compensation_is_retried_once_the_fault_is_gone(
    tmp_path: Path, make_database: Any, broker: str, vault: Vault
) -> None:
    config = vault_config(tmp_path, make_database, broker, vault)
    saga = f"jammed-{uuid.uuid4().hex[:6]}"
    vault.refusals[saga] = 1000  # the compensation keeps failing
    with running_tracker(config):
        vault.begin(saga)
        vault.wait_status(saga, "FAILED")
        wait_until(
            lambda: (
                [s["id"] for s in sagas_cli(config, "list", "--status", "failed")["sagas"]]
                == [saga]
            ),
            timeout_s=30,
            what="the tracker to list the FAILED saga",
        )
        shown = sagas_cli(config, "show", saga)
        assert shown["status"] == "FAILED" and shown["orchestrated"]["orchestrator"]
        assert "did not succeed after 2 attempts" in shown["reason"]
        compensations = [line for line in shown["timeline"] if line["compensation"]]
        assert any(line["title"] == "GiveBack" for line in compensations)

        vault.refusals[saga] = 0  # the fault is gone
        done = sagas_cli(config, "retry", saga, "--by", "alice@ops")
        assert (done["before"], done["after"], done["by"]) == ("FAILED", "COMPENSATING",
                                                               "alice@ops")  # fmt: skip
        vault.wait_status(saga, "COMPENSATED")
        assert saga not in vault.taken(), "what the saga took was given back"
        with psycopg.connect(vault.saga_dsn) as conn:
            kinds = [(k, d.get("by")) for k, _, d in saga_log(conn, saga)]
        assert ("RETRIED", "alice@ops") in kinds
        assert kinds[-1][0] == "COMPENSATED"
        wait_until(
            lambda: sagas_cli(config, "show", saga)["summary"]["status"] == "COMPENSATED",
            timeout_s=30,
            what="the tracker to see it compensated",
        )
        titles = [line["title"] for line in sagas_cli(config, "show", saga)["timeline"]]
        assert "SagaRetried" in titles, "the repair is announced through the outbox"


@pytest.mark.slow
def test_repairs_that_do_not_apply_are_refused_with_a_clear_message(
    tmp_path: Path, make_database: Any, broker: str, vault: Vault
) -> None:
    import subprocess

    from tests.support import WALSAGA

    config = vault_config(tmp_path, make_database, broker, vault)
    done = f"done-{uuid.uuid4().hex[:6]}"
    vault.checks[done] = "ok"
    vault.begin(done)
    vault.wait_status(done, "COMPLETED")

    def refused(*args: str) -> str:
        out = subprocess.run([WALSAGA, "sagas", *args, "--config", str(config)],
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert out.returncode == 2, out
        assert "Traceback" not in out.stderr
        return out.stderr

    assert f"saga {done} is COMPLETED: there is nothing to retry" in refused("retry", done)
    assert "cannot abort (it has ended)" in refused("abort", done)
    assert "nothing to resolve" in refused("resolve", done, "--note", "x")
    assert "no saga 'nope' in any orchestrator's database" in refused("retry", "nope")
    assert "Missing option '--note'" in refused("resolve", done)


@pytest.mark.slow
def test_abort_compensates_a_running_saga_and_resolve_ends_a_failed_one(
    tmp_path: Path, make_database: Any, broker: str, vault: Vault
) -> None:
    config = vault_config(tmp_path, make_database, broker, vault)
    waiting, jammed = f"waiting-{uuid.uuid4().hex[:6]}", f"jammed-{uuid.uuid4().hex[:6]}"
    vault.checks[waiting] = "ignore"  # its check is never answered: it runs on
    vault.refusals[jammed] = 1000
    with running_tracker(config) as tracker:
        vault.begin(waiting)
        vault.begin(jammed)
        with psycopg.connect(vault.saga_dsn) as conn:
            wait_until(lambda: any(k == "COMMAND" and s == "check"
                                   for k, s, _ in saga_log(conn, waiting)),
                       timeout_s=30, what="the check to be sent")  # fmt: skip
        assert vault.status(waiting) == "RUNNING"
        done = sagas_cli(config, "abort", waiting, "--note", "customer called", "--by", "bob")
        assert (done["before"], done["after"]) == ("RUNNING", "COMPENSATING")
        vault.wait_status(waiting, "COMPENSATED")
        assert waiting not in vault.taken()
        with psycopg.connect(vault.saga_dsn) as conn:
            aborted = [d for k, _, d in saga_log(conn, waiting) if k == "ABORTED"]
            state = conn.execute("SELECT reason FROM walsaga.saga WHERE id = %s",
                                 (waiting,)).fetchone()  # fmt: skip
        assert aborted == [{"by": "bob", "note": "customer called"}]
        assert state is not None and state[0] == "aborted by bob: customer called"

        vault.wait_status(jammed, "FAILED")
        done = sagas_cli(config, "resolve", jammed, "--note", "returned by hand", "--by", "carol")
        assert (done["before"], done["after"]) == ("FAILED", "RESOLVED")
        with psycopg.connect(vault.saga_dsn) as conn:
            resolved = [d for k, _, d in saga_log(conn, jammed) if k == "RESOLVED"]
        assert resolved == [{"by": "carol", "note": "returned by hand", "was": "FAILED"}]
        wait_until(lambda: (tracked(tracker.config.tracker.dsn, jammed) or {}).get("status")
                   == "RESOLVED", timeout_s=30, what="the tracker to mirror RESOLVED")  # fmt: skip
        listed = sagas_cli(config, "list", "--status", "resolved")["sagas"]
        assert [s["id"] for s in listed] == [jammed]
        assert listed[0]["style"] == "orchestration"


@pytest.mark.slow
def test_an_orchestrated_order_is_shown_step_by_step_in_a_terminal(
    tmp_path: Path, make_database: Any, broker: str
) -> None:
    import subprocess

    from participants.examples.operations import tracker_config
    from tests.support import WALSAGA

    with running_shop(tmp_path, make_database, broker, "orchestration") as shop:
        config = tracker_config(tmp_path / "tracker.toml", tracker_dsn=make_database("tracker"),
                                dsns={"orders": shop.orders_dsn, "customers": shop.customers_dsn},
                                bootstrap_servers=broker)  # fmt: skip
        with running_tracker(config) as tracker:
            refused = shop.order("c1", 500)
            shop.wait_settled([refused])
            wait_until(lambda: (tracked(tracker.config.tracker.dsn, refused) or {}).get("status")
                       == "COMPENSATED", timeout_s=60, what="the saga mirrored")  # fmt: skip

            def cli(*args: str) -> str:
                command = [WALSAGA, "sagas", *args, "--config", str(config)]
                done = subprocess.run(command, capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, done.stderr
                return done.stdout

            shown, listed = cli("show", refused), cli("list")
    print(shown, listed, sep="\n")
    text = shown
    assert f"saga {refused}" in text
    assert "create-order (orchestrated by orders)" in text
    assert "status    COMPENSATED" in text
    assert re.search(r"orders → customers\s+ReserveCredit step reserve-credit", text)
    assert re.search(r"customers → orders\s+CreditLimitExceeded", text)
    assert "↺ compensating" in text and "↺ compensated" in text
    assert "services  orders · customers" in text
    assert re.search(rf"COMPENSATED\s+create-order\s+{refused}", listed)
