"""The relay against a Postgres that accepts TCP connections only over TLS.

The certificates are made here with the ``openssl`` command line: a CA, a
server certificate for 127.0.0.1 and localhost signed by it, and a second,
unrelated CA. The cluster's ``pg_hba.conf`` allows TCP only as ``hostssl``.
A relay that verifies the server publishes as usual; one that does not use
TLS, or that trusts the wrong CA, stops with status 2 and says why on one
line, instead of retrying a connection that can never succeed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from participants.examples.embedded import LocalPostgres
from tests.support import (
    RelayProcess,
    consume,
    create_topics,
    headers_of,
    wait_until,
    write_events,
)
from walsaga import schema

# TCP only with TLS; the local socket stays open for the test's own set-up.
PG_HBA = """\
local    all          all                 trust
hostssl  all          all  127.0.0.1/32   trust
hostssl  all          all  ::1/128        trust
hostssl  replication  all  127.0.0.1/32   trust
"""


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> Path:
    """A self-signed CA certificate (and its key) in `directory`; returns the certificate."""
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
        "-subj", f"/CN=walsaga test {name}",
        cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.crt"


def make_server_certificate(directory: Path, ca: str) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and localhost, signed by CA `ca`."""
    (directory / "server.ext").write_text(
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "extendedKeyUsage = serverAuth\n"
        "basicConstraints = CA:FALSE\n"
    )
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
        cwd=directory,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.crt",
        cwd=directory,
    )  # fmt: skip
    return directory / "server.crt", directory / "server.key"


@dataclass
class TlsPostgres:
    cluster: LocalPostgres
    ca: Path  # the CA that signed the server's certificate
    other_ca: Path  # a CA that has nothing to do with it

    def dsn(self, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"{self.cluster.dsn('svc')}?{query}"


def _give_to_postgres(path: Path, mode: int) -> None:
    """Postgres runs as user postgres when we are root: its key must be its own, 0600."""
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(mode)


@pytest.fixture(scope="module")
def tls_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsPostgres]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line to make certificates")
    certs = tmp_path_factory.mktemp("tls")
    ca = make_ca(certs, "ca")
    other_ca = make_ca(certs, "other-ca")
    server_crt, server_key = make_server_certificate(certs, "ca")

    # The server runs as the unprivileged postgres user: it needs a directory
    # it can enter, unlike pytest's private ones.
    base = Path(tempfile.mkdtemp(prefix="walsaga-test-tls-"))
    base.chmod(0o755)
    server_files = base / "certs"
    server_files.mkdir()
    server_files.chmod(0o755)
    cert_file = Path(shutil.copy(server_crt, server_files / "server.crt"))
    key_file = Path(shutil.copy(server_key, server_files / "server.key"))
    _give_to_postgres(cert_file, 0o644)
    _give_to_postgres(key_file, 0o600)

    cluster = LocalPostgres(
        base / "cluster",
        durable=False,
        settings={"ssl": "on", "ssl_cert_file": str(cert_file), "ssl_key_file": str(key_file)},
    )
    cluster.start()
    try:
        cluster.create_database("svc")
        with psycopg.connect(cluster.dsn("svc")) as conn:
            schema.apply(conn, "core")
        # From now on TCP without TLS is refused.
        hba = cluster.datadir / "pg_hba.conf"
        hba.write_text(PG_HBA)
        with psycopg.connect(cluster.dsn("svc"), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        wait_until(
            lambda: refused(cluster.dsn("svc") + "?sslmode=disable"),
            timeout_s=30,
            what="pg_hba.conf reloaded",
        )
        yield TlsPostgres(cluster, ca, other_ca)
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


def refused(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.OperationalError:
        return True
    return False


def stop_line(log: str) -> str:
    """The line on which the relay says why it stopped."""
    lines = [line for line in log.splitlines() if "relay stopped" in line]
    assert len(lines) == 1, log[-3000:]
    return lines[0]


def test_a_relay_verifying_the_server_certificate_publishes(
    tmp_path: Path, tls_postgres: TlsPostgres, broker: str
) -> None:
    dsn = tls_postgres.dsn(sslmode="verify-full", sslrootcert=str(tls_postgres.ca))
    topic = f"order_{uuid.uuid4().hex[:8]}"
    create_topics(broker, [topic], partitions=2)
    with RelayProcess.start(tmp_path, bootstrap=broker, sources={"svc": dsn}) as relay:
        relay.wait_streaming("svc", timeout_s=60)
        ids = write_events(dsn, 20, aggregatetype=topic)
        records = consume(broker, [topic], until=lambda r: len(r) >= 20)
        assert sorted(headers_of(m)["id"] for m in records) == sorted(ids)
        with psycopg.connect(dsn) as conn:
            # Both of the relay's connections, the replication one included.
            encrypted = conn.execute(
                """
                SELECT a.backend_type, s.ssl FROM pg_stat_activity a
                JOIN pg_stat_ssl s USING (pid)
                WHERE a.datname = 'svc' AND a.pid <> pg_backend_pid()
                  AND a.backend_type IN ('client backend', 'walsender')
                """
            ).fetchall()
        assert ("walsender", True) in encrypted
        assert all(ssl for _, ssl in encrypted)
        assert relay.terminate() == 0


def test_a_relay_without_tls_is_refused_and_stops_saying_why(
    tmp_path: Path, tls_postgres: TlsPostgres, broker: str
) -> None:
    dsn = tls_postgres.dsn(sslmode="disable")
    with RelayProcess.start(tmp_path, bootstrap=broker, sources={"svc": dsn}) as relay:
        assert relay.wait_exit(timeout_s=60) == 2
        log = relay.read_log()
    line = stop_line(log)
    assert "no pg_hba.conf entry" in line
    assert "no encryption" in line
    assert "retrying" not in log


def test_a_relay_trusting_another_ca_stops_naming_the_certificate(
    tmp_path: Path, tls_postgres: TlsPostgres, broker: str
) -> None:
    dsn = tls_postgres.dsn(sslmode="verify-full", sslrootcert=str(tls_postgres.other_ca))
    with RelayProcess.start(tmp_path, bootstrap=broker, sources={"svc": dsn}) as relay:
        assert relay.wait_exit(timeout_s=60) == 2
        log = relay.read_log()
    line = stop_line(log)
    assert "certificate verify failed" in line
    assert "retrying" not in log
