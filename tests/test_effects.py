"""External effects: the decisions (pure), the HTTP templates, the declared form,
and the worker against real Postgres and the example's identity provider."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from participants.effects import (
    Done,
    Effect,
    EffectRetry,
    EffectWorker,
    HttpCall,
    HttpLookup,
    HttpRequest,
    InDoubt,
    NotDone,
    Refused,
    Resolution,
    Target,
    after_call,
    after_lookup,
    request_effect,
    store,
)
from participants.effects.config import load_effects_config
from participants.effects.decision import CALL_NOW, on_takeover
from participants.effects.http import render_value
from participants.examples.embedded import free_port
from participants.examples.registration.provider import Faults, Users, create_app
from participants.examples.registration.serving import Served
from tests.support import WALSAGA, wait_until
from walsaga import schema
from walsaga.config import write_toml
from walsaga.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _call(effect: Effect, timeout_s: float) -> Done:
    return Done()


def target(resolution: Resolution = Resolution.LOOKUP, **kw: Any) -> Target:
    lookup = _call if resolution is Resolution.LOOKUP else None
    retry = kw.pop("retry", EffectRetry(min_s=1.0, max_s=8.0, give_up_after_s=60.0))
    return Target(
        "t", _call, resolution, lookup=lookup, timeout_s=2.0, settle_s=5.0, retry=retry, **kw
    )


def effect(**kw: Any) -> Effect:
    base: dict[str, Any] = {
        "id": "e1",
        "target": "t",
        "key": "s1/create-user/do",
        "payload": {"email": "a@b.c", "n": 3, "user": {"id": "u 1"}},
        "headers": {"saga_id": "s1"},
        "aggregate_id": "s1",
        "status": "PENDING",
        "attempts": 1,
        "created_at": datetime.now(UTC),
    }
    return Effect(**{**base, **kw})


# -- decisions (pure) -----------------------------------------------------------------


def test_done_and_refused_end_the_effect_at_once() -> None:
    done = after_call(Done({"id": 7}), target(), attempts=1, age_s=0)
    assert (done.status, done.result, done.outcome) == ("DONE", {"id": 7}, "done")
    refused = after_call(Refused("taken", "HTTP 409"), target(), attempts=1, age_s=0)
    assert (refused.status, refused.reason, refused.code) == ("REFUSED", "taken", "HTTP 409")


def test_not_done_is_retried_with_growing_backoff_then_fails_with_the_reason() -> None:
    rng = random.Random(1)
    delays = [
        after_call(NotDone("refused"), target(), attempts=n, age_s=0, rng=rng).delay_s
        for n in range(1, 7)
    ]
    assert all(0.5 <= d <= 8.0 for d in delays)
    assert delays[-1] > delays[0]
    late = after_call(NotDone("connection refused"), target(), attempts=9, age_s=59)
    assert late.status == "FAILED"
    assert late.reason == "gave up after 9 attempts over 59s: connection refused"
    waited = after_call(
        NotDone("busy", retry_after_s=20, answered=True), target(), attempts=1, age_s=0
    )
    assert (waited.status, waited.delay_s) == ("PENDING", 20)


def test_an_unknown_outcome_is_never_retried_blindly() -> None:
    # A lookup is trusted only once the provider is surely done with the request.
    timed_out = after_call(InDoubt("no answer"), target(), attempts=1, age_s=0)
    assert (timed_out.status, timed_out.delay_s) == ("IN_DOUBT", 5.0)
    server_error = after_call(InDoubt("HTTP 500", answered=True), target(), attempts=1, age_s=0)
    assert server_error.status == "IN_DOUBT" and server_error.delay_s < 5.0
    # Out of time, still in doubt: it stays in doubt rather than fail unknowingly.
    late = after_call(InDoubt("no answer"), target(), attempts=20, age_s=600)
    assert late.status == "IN_DOUBT"
    # With a key the provider honours, calling again is the resolution; a call
    # that reached nobody settles nothing.
    keyed = target(Resolution.KEY)
    assert (
        after_call(NotDone("refused"), keyed, attempts=2, age_s=600, was_in_doubt=True).status
        == "IN_DOUBT"
    )
    assert (
        after_call(
            NotDone("HTTP 400", answered=True), keyed, attempts=2, age_s=600, was_in_doubt=True
        ).status
        == "FAILED"
    )
    # Without any way to tell, the target says which risk it takes.
    assert after_call(InDoubt("x"), target(Resolution.FAIL), attempts=1, age_s=0).status == "FAILED"
    assert after_call(InDoubt("x"), target(Resolution.RESEND), attempts=1, age_s=0).status == (
        "IN_DOUBT"
    )
    assert on_takeover(target(Resolution.FAIL)) is not None
    assert on_takeover(target()) is None


def test_a_lookup_settles_the_doubt() -> None:
    found = after_lookup(Done({"id": "u1"}), target(), attempts=1, age_s=3)
    assert (found.status, found.result, found.outcome) == ("DONE", {"id": "u1"}, "lookup_found")
    assert after_lookup(NotDone("404"), target(), attempts=1, age_s=3) is CALL_NOW
    gone = after_lookup(NotDone("404"), target(), attempts=4, age_s=61)
    assert gone.status == "FAILED" and "no trace" in (gone.reason or "")
    unsure = after_lookup(InDoubt("down"), target(), attempts=1, age_s=3)
    assert (unsure.status, unsure.outcome) == ("IN_DOUBT", "lookup_failed")


def test_an_answer_cut_short_is_in_doubt_not_an_empty_lookup() -> None:
    # A provider that dies while answering: the status line and the headers
    # arrive, then the connection closes before the body it announced.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_halfway() -> None:
        for part in (b"", b'{"id": "u-1", "ema'):
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 120\r\n\r\n" + part)  # fmt: skip

    thread = threading.Thread(target=answer_halfway, daemon=True)
    thread.start()
    lookup = HttpLookup(HttpRequest("GET", f"http://127.0.0.1:{port}/users/external/r-1"))
    try:
        for _ in range(2):  # nothing of the body, then part of it
            result = lookup(effect(), 2.0)
            assert isinstance(result, InDoubt), result
            assert "broke off" in result.error
            assert after_lookup(result, target(), attempts=1, age_s=3) is not CALL_NOW
    finally:
        thread.join(5)
        server.close()


# -- templates and the declared form --------------------------------------------------


def test_templates_take_the_effects_values_typed_in_bodies_quoted_in_urls() -> None:
    e = effect()
    body = render_value(
        {
            "email": "{payload.email}",
            "n": "{payload.n}",
            "key": "{key}",
            "text": "n={payload.n} {{literal}}",
        },
        e,
        {},
    )
    assert body == {"email": "a@b.c", "n": 3, "key": "s1/create-user/do", "text": "n=3 {literal}"}
    method, url, headers, raw = HttpRequest(
        "delete", "{vars.base}/users/{payload.user.id}", {"X-Saga": "{header.saga_id}"}
    ).render(e, {"base": "http://h:1/api"})
    assert (method, url, headers, raw) == (
        "DELETE",
        "http://h:1/api/users/u%201",
        {"X-Saga": "s1"},
        None,
    )
    with pytest.raises(ValueError, match="unknown placeholder"):
        HttpRequest("GET", "http://h/{nope}")


def test_an_effect_file_must_say_how_unknown_outcomes_are_resolved(tmp_path: Path) -> None:
    good = {
        "effects": {"name": "w", "dsn": "postgresql:///x"},
        "vars": {"base": "http://h"},
        "effect": [
            {
                "name": "create",
                "url": "{vars.base}/users",
                "lookup": {"url": "{vars.base}/users/{key}"},
            }
        ],
    }
    config = load_effects_config(write_toml(tmp_path / "ok.toml", good))
    [created] = config.targets()
    assert created.resolution is Resolution.LOOKUP
    del good["effect"][0]["lookup"]  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"effect\[.create.\]: .*unknown outcome"):
        load_effects_config(write_toml(tmp_path / "bad.toml", good))
    good["effect"][0]["unknown_outcome"] = "resend"  # type: ignore[index]
    good["effect"][0]["on_done"] = "INSERT INTO t VALUES (:nope)"  # type: ignore[index]
    with pytest.raises(ConfigError, match="unknown parameter :nope"):
        load_effects_config(write_toml(tmp_path / "bad.toml", good)).targets()


def test_the_effect_files_in_the_docs_load(tmp_path: Path) -> None:
    """docs/external-effects.md's effect files (tests/test_docs.py knows no such kind)."""
    text = (ROOT / "docs" / "external-effects.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S) if "[[effect]]" in b]
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"block{i}.toml"
        path.write_text(block)
        assert load_effects_config(path).targets()


# -- the worker, against Postgres and the provider ------------------------------------


@pytest.fixture
def effects_db(make_database: Any) -> str:
    dsn: str = make_database("effects")
    with psycopg.connect(dsn) as conn, conn.transaction():
        schema.apply(conn, "core")
        schema.apply(conn, "effects")
        conn.execute("CREATE TABLE accounts (registration_id text PRIMARY KEY, user_id text)")
    return dsn


@pytest.fixture
def provider() -> Any:
    faults = Faults(hang_s=1.5, max_request_s=1.0)
    users = Users()
    with Served(create_app(users, faults, seed=3), port=free_port()) as served:
        served.faults = faults  # type: ignore[attr-defined]
        served.users = users  # type: ignore[attr-defined]
        yield served


def create_user(base: str, *, resolution: Resolution = Resolution.LOOKUP, **kw: Any) -> Target:
    request = HttpRequest(
        "POST",
        "{vars.base}/users",
        body={"email": "{payload.email}", "name": "{payload.name}", "external_key": "{key}"},
    )
    keyed = resolution is Resolution.KEY
    call = HttpCall(
        request, variables={"base": base}, idempotency_header="Idempotency-Key" if keyed else None
    )
    lookup = HttpLookup(
        HttpRequest("GET", "{vars.base}/users/external/{key}"), variables={"base": base}
    )

    def saved(conn: psycopg.Connection[Any], e: Effect, result: Any) -> None:
        conn.execute("INSERT INTO accounts VALUES (%s, %s)", (e.payload["name"], result["id"]))

    settings: dict[str, Any] = {
        "timeout_s": 0.5,
        "settle_s": 1.2,
        "topic": "identity",
        "done_event": "UserCreated",
        "failed_event": "UserCreationFailed",
        "on_done": saved,
        "retry": EffectRetry(min_s=0.05, max_s=0.3, give_up_after_s=30),
    }
    return Target(
        "create_user", call, resolution, lookup=lookup if not keyed else None, **{**settings, **kw}
    )


def request_users(dsn: str, n: int, *, prefix: str = "u") -> list[str]:
    keys = []
    with psycopg.connect(dsn) as conn, conn.transaction():
        for i in range(n):
            key = f"saga-{prefix}{i}/create-user/do"
            request_effect(
                conn,
                "create_user",
                key,
                {"email": f"{prefix}{i}@example.com", "name": f"{prefix}{i}"},
                headers={"saga_id": f"saga-{prefix}{i}"},
            )
            keys.append(key)
    return keys


def ended(dsn: str) -> dict[str, tuple[str, int, Any, str | None]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT idempotency_key, status, attempts, result, reason FROM walsaga.effect"
        ).fetchall()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


def wait_ended(dsn: str, count: int, timeout_s: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        found = ended(dsn)
        done = len(found) == count and all(
            v[0] in ("DONE", "REFUSED", "FAILED") for v in found.values()
        )
        return found if done else None

    return wait_until(check, timeout_s=timeout_s, interval_s=0.1)  # type: ignore[no-any-return]


def outbox(dsn: str) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(  # type: ignore[return-value]
            "SELECT type, aggregateid, payload, headers FROM walsaga.outbox ORDER BY created_at"
        ).fetchall()


class Workers:
    """Effect workers in threads of this process."""

    def __init__(self, dsn: str, targets: list[Target], count: int = 1, **kw: Any) -> None:
        self.workers = [
            EffectWorker(f"w{i}", dsn=dsn, targets=targets, poll_interval_s=0.05, **kw)
            for i in range(count)
        ]
        self.threads = [threading.Thread(target=w.run, daemon=True) for w in self.workers]

    def __enter__(self) -> Workers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self.workers:
            worker.stop()
        for thread in self.threads:
            thread.join(30)

    def calls(self, outcome: str) -> float:
        return sum(
            w.metrics.calls.labels("create_user", outcome)._value.get() for w in self.workers
        )


def test_the_worker_performs_records_and_announces_each_effect_once(
    effects_db: str, provider: Any
) -> None:
    keys = request_users(effects_db, 5)
    with psycopg.connect(effects_db) as conn, conn.transaction():
        # A second request with the same key changes nothing.
        request_effect(conn, "create_user", keys[0], {"email": "other@example.com", "name": "x"})
        conn.execute(
            "INSERT INTO walsaga.outbox (aggregatetype, aggregateid, type) "
            "VALUES ('seed', 'seed', 'Seed')"
        )
    with Workers(effects_db, [create_user(provider.url)]) as workers:
        found = wait_ended(effects_db, 5)
        assert {v[0] for v in found.values()} == {"DONE"}
        assert workers.calls("done") == 5
        registry = workers.workers[0].metrics.registry
        wait_until(
            lambda: (
                registry.get_sample_value(
                    "walsaga_effect_oldest_pending_seconds", {"target": "create_user"}
                )
                == 0
            ),
            timeout_s=10,
        )
        assert (
            registry.get_sample_value(
                "walsaga_effect_call_seconds_count", {"target": "create_user"}
            )
            == 5
        )
    users = provider.users.all()
    assert sorted(u["email"] for u in users) == [f"u{i}@example.com" for i in range(5)]
    events = [e for e in outbox(effects_db) if e[0] == "UserCreated"]
    assert len(events) == 5
    first = next(e for e in events if e[3]["effect_key"] == keys[0])
    assert first[1] == "saga-u0" and first[3]["saga_id"] == "saga-u0"
    assert first[2]["result"]["email"] == "u0@example.com" and first[2]["name"] == "u0"
    with psycopg.connect(effects_db) as conn:
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (5,)


def test_a_business_refusal_is_a_failure_event_without_retry(
    effects_db: str, provider: Any
) -> None:
    provider.users.create("u0@example.com", "taken", None)
    request_users(effects_db, 2)
    with Workers(effects_db, [create_user(provider.url)]):
        found = wait_ended(effects_db, 2)
    statuses = {k.split("/")[0]: v for k, v in found.items()}
    assert statuses["saga-u0"][:2] == ("REFUSED", 1)
    assert statuses["saga-u0"][3] == "u0@example.com is registered already"
    failed = [e for e in outbox(effects_db) if e[0] == "UserCreationFailed"]
    assert len(failed) == 1
    assert failed[0][2]["refused"] is True and failed[0][2]["code"] == "HTTP 409"


@pytest.mark.parametrize("resolution", [Resolution.LOOKUP, Resolution.KEY])
def test_unknown_outcomes_are_resolved_before_any_retry(
    effects_db: str, provider: Any, resolution: Resolution
) -> None:
    """The provider creates the user, then answers 500 or not at all: a blind retry
    would create it again (its addresses are unique: a 409 would refuse a
    registration that succeeded)."""
    provider.faults.update({"error_after_rate": 0.3, "timeout_rate": 0.3, "error_rate": 0.1})
    request_users(effects_db, 20)
    with Workers(effects_db, [create_user(provider.url, resolution=resolution)]) as workers:
        found = wait_ended(effects_db, 20, timeout_s=120)
        assert {v[0] for v in found.values()} == {"DONE"}, found
        assert workers.calls("in_doubt") >= 3
        if resolution is Resolution.LOOKUP:
            assert workers.calls("lookup_found") >= 1
    users = provider.users.all()
    assert len(users) == 20, "one user per effect"
    with psycopg.connect(effects_db) as conn:
        saved = dict(conn.execute("SELECT registration_id, user_id FROM accounts").fetchall())
    assert saved == {u["name"]: u["id"] for u in users}
    assert len([e for e in outbox(effects_db) if e[0] == "UserCreated"]) == 20


def test_workers_share_the_queue_and_a_dead_workers_call_is_resolved(
    effects_db: str, provider: Any
) -> None:
    keys = request_users(effects_db, 60)
    # A worker leased one and marked it sent, then died: its lease runs out.
    with psycopg.connect(effects_db) as conn:
        [(leased, _)] = store.lease(
            conn, worker="dead", targets=["create_user"], limit=1, lease_s=5
        )
        sent = store.mark_sent(conn, leased, worker="dead", lease_s=0.5)
        assert sent is not None
    provider.users.create(sent.payload["email"], sent.payload["name"], sent.key)
    with Workers(effects_db, [create_user(provider.url)], count=3, concurrency=2) as workers:
        found = wait_ended(effects_db, 60, timeout_s=120)
        assert {v[0] for v in found.values()} == {"DONE"}
        per_worker = [
            w.metrics.calls.labels("create_user", "done")._value.get() for w in workers.workers
        ]
        assert sum(per_worker) == 59 and all(n > 0 for n in per_worker), per_worker
        assert workers.calls("lookup_found") == 1
    assert found[sent.key][1] == 1, "the dead worker's attempt was not sent again"
    assert len(provider.users.all()) == 60 and len(keys) == 60


def test_a_provider_out_of_reach_is_retried_then_the_effect_fails_with_the_reason(
    effects_db: str,
) -> None:
    request_users(effects_db, 1)
    nowhere = f"http://127.0.0.1:{free_port()}"
    quick = create_user(nowhere, retry=EffectRetry(min_s=0.05, max_s=0.2, give_up_after_s=1.0))
    with Workers(effects_db, [quick]):
        [(status, attempts, _, reason)] = wait_ended(effects_db, 1).values()
    assert status == "FAILED" and attempts >= 3
    assert reason.startswith("gave up after") and "cannot connect" in reason
    [failed] = [e for e in outbox(effects_db) if e[0] == "UserCreationFailed"]
    assert failed[2]["refused"] is False and failed[2]["code"] == "GAVE_UP"


def test_walsaga_effects_runs_a_declared_file_for_a_legacy_service(
    effects_db: str, provider: Any, tmp_path: Path
) -> None:
    """No code: a SQL function requests the effect, the file declares the call,
    its on_done statement writes the service's table."""
    port = free_port()
    config = write_toml(
        tmp_path / "effects.toml",
        {
            "effects": {
                "name": "legacy",
                "dsn": effects_db,
                "poll_interval_s": 0.1,
                "http_port": port,
                "http_host": "127.0.0.1",
            },
            "vars": {"provider": provider.url},
            "effect": [
                {
                    "name": "create_user",
                    "url": "{vars.provider}/users",
                    "body": {
                        "email": "{payload.email}",
                        "name": "{payload.name}",
                        "external_key": "{key}",
                    },
                    "lookup": {"url": "{vars.provider}/users/external/{key}"},
                    "topic": "identity",
                    "done_event": "UserCreated",
                    "failed_event": "CreationFailed",
                    "on_done": "INSERT INTO accounts VALUES (:payload.name, :result.id)",
                    "on_failed": "INSERT INTO accounts VALUES (:payload.name, :code)",
                }
            ],
        },
    )
    with psycopg.connect(effects_db) as conn, conn.transaction():
        conn.execute(
            "SELECT walsaga.request_saga_effect('create_user', 's1', 'create-user', "
            '\'{"email": "ada@example.com", "name": "ada"}\')'
        )
        conn.execute(
            "SELECT walsaga.request_saga_effect('create_user', 's2', 'create-user', "
            '\'{"email": "no-at-sign", "name": "bad"}\')'
        )
    proc = subprocess.Popen(
        [WALSAGA, "effects", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        found = wait_ended(effects_db, 2)
        metrics = wait_until(lambda: _get(f"http://127.0.0.1:{port}/metrics"), timeout_s=10)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    assert found["s1/create-user"][0] == "DONE"
    assert found["s2/create-user"][:2] == ("REFUSED", 1)
    with psycopg.connect(effects_db) as conn:
        rows = dict(conn.execute("SELECT registration_id, user_id FROM accounts").fetchall())
        status = conn.execute("SELECT status FROM walsaga.effect_status('s1/create-user')")
        assert status.fetchone() == ("DONE",)
    assert rows["bad"] == "HTTP 422" and rows["ada"].startswith("u-")
    types = {(e[0], e[3]["saga_id"]) for e in outbox(effects_db)}
    assert types == {("UserCreated", "s1"), ("CreationFailed", "s2")}
    assert 'walsaga_effect_calls_total{outcome="done",target="create_user"} 1.0' in metrics
    assert 'walsaga_effects_ended_total{status="REFUSED",target="create_user"} 1.0' in metrics


def _get(url: str) -> str | None:
    try:
        answer = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    return answer.text if answer.status_code == 200 else None


def test_the_effects_component_installs_alongside_the_others(make_database: Any) -> None:
    dsn = make_database("effects")
    out = subprocess.run(
        [WALSAGA, "effects", "--config", "/nonexistent.toml"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "no such file" in out.stderr
    with psycopg.connect(dsn) as conn, conn.transaction():
        applied = schema.apply(conn, "core") + schema.apply(conn, "effects")
        assert [m.component for m in applied][-1] == "effects"
        assert schema.apply(conn, "effects") == []
        row = conn.execute("SELECT walsaga.request_effect('t', 'k', '{}'::jsonb)").fetchone()
        again = conn.execute("SELECT walsaga.request_effect('t', 'k', '{\"x\": 1}'::jsonb)")
        assert row == again.fetchone()
        payload = conn.execute("SELECT payload, aggregate_id FROM walsaga.effect").fetchone()
        assert payload == ({}, "k")
