"""Fixtures shared by the whole suite: real Postgres clusters and a real broker.

By default the suite starts its own servers (a throwaway Postgres cluster with
wal2json, the embedded Tansu broker). Point it at existing ones instead with:

- ``WALSAGA_TEST_PG_DSN``: a superuser DSN of a Postgres server with
  ``wal_level=logical`` and wal2json; each test gets a fresh database there;
- ``WALSAGA_TEST_KAFKA``: bootstrap servers of a Kafka-protocol broker
  (Apache Kafka included).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo, sql

from participants.examples.embedded import EmbeddedBroker, LocalPostgres
from walsaga import schema


@dataclass
class PgServer:
    """A Postgres server the tests may create databases on."""

    admin_dsn: str
    cluster: LocalPostgres | None = None

    def dsn(self, dbname: str) -> str:
        return conninfo.make_conninfo(self.admin_dsn, dbname=dbname)

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str, *, timeout_s: float = 10.0) -> None:
        """Drop `name` and its replication slots. A slot still in use (the
        walsender of a relay just killed has yet to notice) has its walsender
        ended first: a slot left behind keeps the database from being dropped
        and its name from being used by the next test's relay."""
        deadline = time.monotonic() + timeout_s
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            while True:
                slots = conn.execute(
                    "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s",
                    (name,),
                ).fetchall()
                for slot, active_pid in slots:
                    if active_pid is not None:
                        conn.execute("SELECT pg_terminate_backend(%s)", (active_pid,))
                        continue
                    with contextlib.suppress(psycopg.errors.ObjectInUse):
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                if not slots or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    external = os.environ.get("WALSAGA_TEST_PG_DSN")
    if external:
        yield PgServer(external)
        return
    # pytest's own temporary folders are private to us; the unprivileged
    # Postgres user needs one it can enter.
    base = Path(tempfile.mkdtemp(prefix="walsaga-test-pg-"))
    base.chmod(0o755)
    cluster = LocalPostgres(base / "cluster", durable=False)
    try:
        cluster.start()
        yield PgServer(cluster.dsn(), cluster)
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


_db_counter = itertools.count()


@pytest.fixture
def make_database(pg_server: PgServer) -> Iterator[object]:
    """Factory: a fresh, empty database per call, dropped after the test."""
    created: list[str] = []

    def make(prefix: str = "t") -> str:
        name = f"{prefix}_{next(_db_counter)}_{uuid.uuid4().hex[:6]}"
        created.append(name)
        return pg_server.create_database(name)

    yield make
    for name in created:
        with contextlib.suppress(psycopg.Error):
            pg_server.drop_database(name)


@pytest.fixture
def empty_db(make_database: object) -> str:
    """DSN of a fresh database without the walsaga schema."""
    return make_database()  # type: ignore[operator, no-any-return]


@pytest.fixture
def walsaga_db(make_database: object) -> str:
    """DSN of a fresh database with the walsaga core schema deployed."""
    dsn: str = make_database()  # type: ignore[operator]
    with psycopg.connect(dsn) as conn:
        schema.apply(conn, "core")
    return dsn


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap servers of a Kafka-protocol broker."""
    external = os.environ.get("WALSAGA_TEST_KAFKA")
    if external:
        yield external
        return
    with EmbeddedBroker() as embedded:
        yield embedded.bootstrap_servers


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of the test's own, for tests that pause or stop it."""
    if os.environ.get("WALSAGA_TEST_KAFKA"):
        pytest.skip("needs a broker process of its own to pause")
    with EmbeddedBroker(logfile=tmp_path / "broker.log") as embedded:
        yield embedded
