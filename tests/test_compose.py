"""docker-compose.yml, checked without a container engine.

Nothing here starts a container. The file is read as Compose reads it (YAML,
merge keys, ``${VAR:-default}`` with no variable set) and checked against the
code it runs: every walsaga command is parsed by the real CLI with the
service's environment, configuration files are loaded through the real
loaders, ports and health checks are compared with what the processes listen
on, and the start order with what each process connects to. The set-up the
file performs (init scripts, ``walsaga deploy``, installs, sample rows) is run
against real Postgres databases made the way the compose file makes them.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any
from unittest import mock

import click
import psycopg
import pytest
import yaml
from click.testing import CliRunner
from confluent_kafka import Consumer, Producer
from psycopg import conninfo, sql

from participants.declarative import ParticipantConfig, build, load_participant_config
from participants.examples import order_service, travel
from relay.config import RelayConfig, load_relay_config
from relay.slot import check_source
from walsaga.cli import _COMMANDS as COMMANDS
from walsaga.cli import main

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCS = ROOT / "docs" / "compose.md"

#: Images pulled as they are: Docker Official Images, and the Apache Kafka
#: project's own image.
OFFICIAL_REPOSITORIES = frozenset({"postgres", "python", "apache/kafka"})
#: A tag that names a release (at least major.minor), optionally with a variant.
PINNED_TAG = re.compile(r"^\d+\.\d+(\.\d+)?(-[a-z0-9.]+)*$")
POSTGRES_PORT = 5432
INITDB_DIR = PurePosixPath("/docker-entrypoint-initdb.d")

COMPOSE_TOP_LEVEL = frozenset({"name", "services", "volumes", "networks", "configs", "secrets"})
COMPOSE_SERVICE_KEYS = frozenset(
    {
        "build",
        "command",
        "depends_on",
        "entrypoint",
        "environment",
        "healthcheck",
        "image",
        "init",
        "networks",
        "ports",
        "restart",
        "stop_grace_period",
        "user",
        "volumes",
        "working_dir",
    }
)
HEALTHCHECK_KEYS = frozenset({"test", "interval", "timeout", "retries", "start_period"})
CONDITIONS = frozenset({"service_started", "service_healthy", "service_completed_successfully"})


# -- reading the file as Compose does ------------------------------------------


_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\})")


def interpolate(text: str, env: Mapping[str, str] | None = None) -> str:
    """Compose's ``$$``, ``${VAR}``, ``${VAR-default}`` and ``${VAR:-default}``."""
    env = env or {}

    def value(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name, operator, default = m.group(2), m.group(3), m.group(4)
        if operator == ":-" and not env.get(name):
            return default
        if operator == "-" and name not in env:
            return default
        if name not in env:
            raise AssertionError(f"${{{name}}} has no default: `docker compose up` needs it set")
        return env[name]

    return _VARIABLE.sub(value, text)


@dataclass(frozen=True)
class Mount:
    source: str
    target: PurePosixPath
    read_only: bool

    @property
    def is_bind(self) -> bool:
        return self.source.startswith((".", "/"))

    @property
    def host_path(self) -> Path:
        return (ROOT / self.source).resolve()


@dataclass(frozen=True)
class Port:
    host_ip: str | None
    host: int
    container: int


@dataclass
class Service:
    name: str
    spec: dict[str, Any]

    @property
    def command(self) -> list[str]:
        raw = self.spec.get("command", [])
        assert isinstance(raw, list), f"{self.name}: write the command as a list (exec form)"
        return [interpolate(str(arg)) for arg in raw]

    @property
    def environment(self) -> dict[str, str]:
        raw = self.spec.get("environment") or {}
        if isinstance(raw, list):
            raw = dict(item.split("=", 1) for item in raw)
        return {str(k): interpolate("" if v is None else str(v)) for k, v in raw.items()}

    @property
    def raw_environment(self) -> dict[str, str]:
        """The environment before interpolation (where each value comes from)."""
        raw = self.spec.get("environment") or {}
        return {str(k): str(v) for k, v in raw.items()}

    @property
    def depends_on(self) -> dict[str, str]:
        raw = self.spec.get("depends_on") or {}
        if isinstance(raw, list):
            return dict.fromkeys(raw, "service_started")
        return {name: (v or {}).get("condition", "service_started") for name, v in raw.items()}

    @property
    def mounts(self) -> list[Mount]:
        mounts = []
        for entry in self.spec.get("volumes") or []:
            assert isinstance(entry, str), f"{self.name}: use the short volume syntax"
            source, target, *mode = entry.split(":")
            mounts.append(Mount(source, PurePosixPath(target), mode == ["ro"]))
        return mounts

    @property
    def ports(self) -> list[Port]:
        ports = []
        for entry in self.spec.get("ports") or []:
            parts = str(entry).split("/")[0].split(":")
            assert len(parts) in (2, 3), f"{self.name}: publish as [IP:]HOST:CONTAINER, not {entry}"
            ip = parts[0] if len(parts) == 3 else None
            ports.append(Port(ip, int(parts[-2]), int(parts[-1])))
        return ports

    @property
    def healthcheck(self) -> list[str] | None:
        check = self.spec.get("healthcheck")
        if not check or check.get("disable"):
            return None
        test = check["test"]
        assert isinstance(test, list) and test[0] == "CMD", f"{self.name}: use [CMD, ...]"
        return [str(arg) for arg in test[1:]]

    @property
    def image(self) -> str | None:
        return self.spec.get("image")

    @property
    def build(self) -> tuple[Path, Path] | None:
        build = self.spec.get("build")
        if build is None:
            return None
        if isinstance(build, str):
            build = {"context": build}
        context = (ROOT / build["context"]).resolve()
        return context, context / build.get("dockerfile", "Dockerfile")

    def host_path(self, container_path: str | Path) -> Path | None:
        """The repository file a path inside the container is mounted from."""
        path = PurePosixPath(container_path)
        for mount in self.mounts:
            if not mount.is_bind:
                continue
            if path == mount.target:
                return mount.host_path
            if mount.target in path.parents:
                return mount.host_path / path.relative_to(mount.target)
        return None

    @property
    def is_walsaga(self) -> bool:
        return bool(self.spec.get("command")) and self.command[0] == "walsaga"

    @property
    def is_postgres(self) -> bool:
        return "POSTGRES_DB" in self.environment

    @property
    def database(self) -> str:
        return self.environment["POSTGRES_DB"]

    def initdb_scripts(self) -> list[Path]:
        """What the Postgres image runs when it creates the database, in its order."""
        scripts = [m for m in self.mounts if m.target.parent == INITDB_DIR]
        return [m.host_path for m in sorted(scripts, key=lambda m: m.target.name)]


@dataclass
class Compose:
    data: dict[str, Any]
    services: dict[str, Service] = field(init=False)

    def __post_init__(self) -> None:
        self.services = {name: Service(name, spec) for name, spec in self.data["services"].items()}

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    @property
    def one_shots(self) -> set[str]:
        """Services others wait to have finished."""
        return {
            name
            for s in self.services.values()
            for name, condition in s.depends_on.items()
            if condition == "service_completed_successfully"
        }

    @property
    def long_running(self) -> list[Service]:
        return [s for s in self.services.values() if s.name not in self.one_shots]

    @property
    def databases(self) -> dict[str, Service]:
        return {s.name: s for s in self.services.values() if s.is_postgres}

    def waits_for(self, name: str) -> dict[str, str]:
        """Every service `name` starts after, directly or not, and the condition waited for
        (each service can meet only one: healthy, or completed)."""
        seen: dict[str, str] = {}
        todo = list(self[name].depends_on.items())
        while todo:
            other, condition = todo.pop()
            if other in seen:
                continue
            seen[other] = condition
            todo.extend(self[other].depends_on.items())
        return seen


class _StrictLoader(yaml.SafeLoader):
    """PyYAML, refusing a key given twice in one mapping as Compose does (PyYAML
    would keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [k.value for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
        twice = {k for k in keys if keys.count(k) > 1}
        if twice:
            raise yaml.constructor.ConstructorError(
                None, None, f"keys given twice: {sorted(twice)}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


@cache
def compose() -> Compose:
    return Compose(yaml.load(COMPOSE_FILE.read_text(), Loader=_StrictLoader))


@contextlib.contextmanager
def only_environment(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ as the container has it (click and the loaders read it)."""
    with mock.patch.dict(os.environ, dict(env), clear=True):
        yield


# -- what a walsaga service runs -------------------------------------------------


@dataclass
class Walsaga:
    """A walsaga service's command as the CLI parses it, and the configuration it loads."""

    service: Service
    command: str
    params: dict[str, Any]
    relay: RelayConfig | None = None
    participant: ParticipantConfig | None = None

    @property
    def dsns(self) -> list[str]:
        if self.relay is not None:
            return [s.dsn for s in self.relay.source]
        if self.participant is not None:
            return [self.participant.participant.dsn]
        return [d for d in (self.params.get("dsn"), self.params.get("customers_dsn")) if d]

    @property
    def bootstrap_servers(self) -> list[str]:
        kafka = self.relay or self.participant
        servers = (
            kafka.kafka["bootstrap.servers"] if kafka else self.params.get("bootstrap_servers")
        )
        return str(servers).split(",") if servers else []

    @property
    def http(self) -> tuple[str, int] | None:
        """Where the process serves HTTP (/healthz, /metrics, the API)."""
        if self.relay is not None:
            port = self.relay.relay.http_port
            return None if port is None else (self.relay.relay.http_host, port)
        if self.participant is not None:
            port = self.participant.participant.http_port
            return None if port is None else (self.participant.participant.http_host, port)
        if self.command == "order-service":
            return self.params["host"], self.params["port"]
        if self.command == "travel-service" and self.params["http_port"] is not None:
            return self.params["http_host"], self.params["http_port"]
        return None

    @property
    def option_envvars(self) -> set[str]:
        command = _command(self.command)
        names: set[str] = set()
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                names.add(envvar)
            elif envvar:
                names.update(envvar)
        return names


def _command(name: str) -> click.Command:
    command = main.get_command(click.Context(main, info_name="walsaga"), name)
    assert command is not None, f"walsaga has no command {name!r}"
    return command


def walsaga(service: Service) -> Walsaga:
    """Parse the service's command line with the real CLI, as its container would."""
    argv = service.command
    assert argv[0] == "walsaga", f"{service.name}: not a walsaga command: {argv}"
    name, args = argv[1], argv[2:]
    command = _command(name)
    parent = click.Context(main, info_name="walsaga")
    with only_environment(service.environment):
        try:
            ctx = command.make_context(name, list(args), parent=parent)
        except click.UsageError as e:
            raise AssertionError(f"{service.name}: `{shlex.join(argv)}`: {e}") from None
        leftover = [*ctx.args, *getattr(ctx, "_protected_args", [])]
        assert not leftover, f"{service.name}: `{shlex.join(argv)}` leaves {leftover} unparsed"
        result = Walsaga(service, name, dict(ctx.params))
        if name == "relay":
            result.relay = load_relay_config(
                _mounted(service, ctx.params["config_path"]), environ=service.environment
            )
        elif name == "participant":
            result.participant = load_participant_config(
                _mounted(service, ctx.params["config_path"])
            )
    return result


def _mounted(service: Service, path: Path | None) -> Path:
    assert path is not None, f"{service.name}: no config file given"
    host = service.host_path(path)
    assert host is not None, f"{service.name}: {path} is not mounted into the container"
    assert host.is_file(), f"{service.name}: {path} is mounted from {host}, which does not exist"
    return host


def walsaga_services() -> list[Service]:
    return [s for s in compose().services.values() if s.is_walsaga]


def by_name(services: list[Service]) -> Any:
    return pytest.mark.parametrize("service", services, ids=[s.name for s in services])


def dsn_parts(dsn: str) -> dict[str, str]:
    return {k: str(v) for k, v in conninfo.conninfo_to_dict(dsn).items()}


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """Listener name -> (host, port), of KAFKA_LISTENERS or KAFKA_ADVERTISED_LISTENERS."""
    found = {}
    for entry in value.split(","):
        name, _, address = entry.partition("://")
        found[name] = host_port(address)
    return found


def kafka_service() -> Service:
    [kafka] = [s for s in compose().services.values() if (s.image or "").startswith("apache/kafka")]
    return kafka


def listening_ports(service: Service) -> set[int]:
    """The TCP ports the service's process listens on."""
    if service.is_postgres:
        return {POSTGRES_PORT}
    if service is kafka_service():
        return {port for _, port in listeners(service.environment["KAFKA_LISTENERS"]).values()}
    if service.is_walsaga:
        http = walsaga(service).http
        return {http[1]} if http else set()
    return set()


# -- structure -------------------------------------------------------------------


def test_the_file_holds_only_what_compose_knows() -> None:
    data = compose().data
    unknown = {k for k in data if not k.startswith("x-")} - COMPOSE_TOP_LEVEL
    assert not unknown, f"unknown top-level keys: {unknown}"
    assert data["services"], "no services"
    for service in compose().services.values():
        unknown = set(service.spec) - COMPOSE_SERVICE_KEYS
        assert not unknown, f"{service.name}: unknown keys {unknown}"
        assert service.image or service.build, f"{service.name}: neither image nor build"
        if service.spec.get("healthcheck"):
            unknown = set(service.spec["healthcheck"]) - HEALTHCHECK_KEYS
            assert not unknown, f"{service.name}: unknown healthcheck keys {unknown}"


def test_docker_compose_accepts_the_file() -> None:
    # The Compose plugin validates without an engine, where it is installed.
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "compose", "version"], capture_output=True).returncode
    ):
        pytest.skip("the docker compose plugin is not installed")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_named_volumes_are_declared_and_none_is_left_unused() -> None:
    declared = set(compose().data.get("volumes") or {})
    used = {m.source for s in compose().services.values() for m in s.mounts if not m.is_bind}
    assert used - declared == set(), "volumes used but not declared"
    assert declared - used == set(), "volumes declared but never mounted"
    networks = set(compose().data.get("networks") or {})
    for service in compose().services.values():
        assert set(service.spec.get("networks") or ()) <= networks, service.name


def test_every_database_keeps_its_data_in_a_volume_of_its_own() -> None:
    owners: dict[str, str] = {}
    for db in compose().databases.values():
        [data] = [m for m in db.mounts if m.target == PurePosixPath("/var/lib/postgresql/data")]
        assert not data.is_bind
        assert data.source not in owners, f"{db.name} shares {data.source} with {owners}"
        owners[data.source] = db.name


def test_mounted_files_are_files_of_this_repository_mounted_read_only() -> None:
    for service in compose().services.values():
        for mount in service.mounts:
            if not mount.is_bind:
                continue
            assert mount.host_path.exists(), f"{service.name}: {mount.source} does not exist"
            assert ROOT in mount.host_path.parents, f"{service.name}: {mount.source} is outside"
            assert mount.read_only, f"{service.name}: mount {mount.source} read-only (:ro)"


# -- images ------------------------------------------------------------------------


def _repository_and_tag(image: str) -> tuple[str, str]:
    repository, _, tag = image.rpartition(":")
    return (repository, tag) if repository and "/" not in tag else (image, "latest")


def test_pulled_images_are_official_ones_with_pinned_tags() -> None:
    for service in compose().services.values():
        if service.build is not None:
            continue
        assert service.image, service.name
        repository, tag = _repository_and_tag(service.image)
        assert repository in OFFICIAL_REPOSITORIES, f"{service.name}: {repository} is not official"
        assert PINNED_TAG.match(tag), f"{service.name}: {service.image} is not a pinned release"


def _from_lines(dockerfile: Path) -> list[str]:
    return [
        line.split()[1]
        for line in dockerfile.read_text().splitlines()
        if line.upper().startswith("FROM ")
    ]


def test_built_images_start_from_official_images_with_pinned_tags() -> None:
    builds = {s.build for s in compose().services.values() if s.build is not None}
    assert len(builds) == 2, "the walsaga image and the Postgres image"
    for _context, dockerfile in builds:
        assert dockerfile.is_file(), f"{dockerfile} does not exist"
        bases = _from_lines(dockerfile)
        assert bases, f"{dockerfile} has no FROM line"
        for base in bases:
            repository, tag = _repository_and_tag(base)
            assert repository in OFFICIAL_REPOSITORIES, f"{dockerfile}: FROM {base}"
            assert PINNED_TAG.match(tag), f"{dockerfile}: FROM {base} is not a pinned release"


def test_built_images_have_a_name_so_every_service_shares_one_build() -> None:
    by_build: dict[tuple[Path, Path], set[str]] = {}
    for service in compose().services.values():
        if service.build is not None:
            assert service.image, f"{service.name}: name the image it builds"
            assert _repository_and_tag(service.image)[1] != "latest", service.name
            by_build.setdefault(service.build, set()).add(service.image)
    assert all(len(images) == 1 for images in by_build.values()), by_build


def test_the_walsaga_image_installs_this_checkout_and_runs_as_an_unprivileged_user() -> None:
    dockerfile = ROOT / "Dockerfile"
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    copied = [
        source
        for line in lines
        if line.startswith("COPY ") and "--from" not in line
        for source in line.split()[1:-1]
        if not source.startswith("--")
    ]
    for source in copied:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    for needed in ("pyproject.toml", "README.md", "sql/", "walsaga/", "relay/", "participants/"):
        assert needed in copied, f"the image needs {needed} to install the package"
    installs = [
        m
        for line in lines
        if (m := re.match(r"""RUN pip install "?\.(\[([a-z,]+)\])?"?(\s|$)""", line))
    ]
    assert installs, "the image does not install this checkout"
    extras = set((installs[0].group(2) or "").split(","))
    # Every walsaga command compose runs finds its optional dependencies in the image.
    for service in walsaga_services():
        extra = COMMANDS[service.command[1]][1]
        assert extra is None or extra in extras, (
            f"{service.name} runs walsaga {service.command[1]}, which needs "
            f"pip install '.[{extra}]' in the Dockerfile"
        )
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER: the processes would run as root"
    assert users[-1] not in ("root", "0")
    assert "walsaga-healthcheck" in (ROOT / "Dockerfile").read_text()


def test_the_postgres_image_adds_wal2json_built_for_its_major_version() -> None:
    [(_context, dockerfile)] = {s.build for s in compose().databases.values()}
    [base] = _from_lines(dockerfile)
    major = _repository_and_tag(base)[1].split(".")[0]
    assert _repository_and_tag(base)[0] == "postgres"
    assert f"postgresql-{major}-wal2json" in dockerfile.read_text()


def test_every_database_runs_with_logical_decoding_and_room_for_the_relay() -> None:
    relay = walsaga(compose()["relay"]).relay
    assert relay is not None
    for db in compose().databases.values():
        argv = db.command
        assert argv[0] == "postgres"
        settings = dict(argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "-c")
        assert settings.get("wal_level") == "logical", db.name
        slots = sum(dsn_parts(s.dsn)["host"] == db.name for s in relay.source)
        # One slot per source, and one more for a relay standing by or a replay.
        assert int(settings["max_replication_slots"]) >= slots + 1, db.name
        assert int(settings["max_wal_senders"]) >= slots + 1, db.name


# -- health checks and start order ----------------------------------------------


def test_every_long_running_service_has_a_health_check_and_restarts() -> None:
    for service in compose().long_running:
        assert service.healthcheck, f"{service.name}: no health check"
        assert service.spec.get("restart") in ("unless-stopped", "always"), service.name


def test_one_shot_services_neither_restart_forever_nor_claim_health() -> None:
    assert compose().one_shots, "no set-up services"
    for name in compose().one_shots:
        service = compose()[name]
        assert service.spec.get("restart", "no") in ("no", "on-failure"), name
        assert service.healthcheck is None, name


def test_depends_on_waits_for_services_that_can_meet_the_condition() -> None:
    services = compose().services
    for service in services.values():
        for other, condition in service.depends_on.items():
            assert other in services, f"{service.name} depends on unknown {other}"
            assert condition in CONDITIONS, f"{service.name}: condition {condition}"
            assert condition != "service_started", (
                f"{service.name}: started is not ready; wait for {other} to be healthy"
            )
            if condition == "service_healthy":
                assert services[other].healthcheck, f"{service.name}: {other} has no health check"
        assert service.name not in compose().waits_for(service.name), f"{service.name}: a cycle"


def test_services_start_after_everything_they_connect_to_is_ready() -> None:
    kafka = kafka_service().name
    for service in walsaga_services():
        run = walsaga(service)
        waits = compose().waits_for(service.name)
        for dsn in run.dsns:
            host = dsn_parts(dsn)["host"]
            assert host in compose().databases, f"{service.name}: {host} is not a database"
            assert waits.get(host) == "service_healthy", f"{service.name} before {host} is ready"
        for server in run.bootstrap_servers:
            assert host_port(server)[0] == kafka, f"{service.name}: {server} is not {kafka}"
            assert waits.get(kafka) == "service_healthy", f"{service.name} before Kafka is ready"


def test_the_schema_is_deployed_before_anything_uses_a_database() -> None:
    deployed = {}
    for service in walsaga_services():
        run = walsaga(service)
        if run.command == "deploy":
            deployed[dsn_parts(run.params["dsn"])["host"]] = service.name
    assert set(deployed) == set(compose().databases), "a database without its walsaga deploy"
    for service in walsaga_services():
        run = walsaga(service)
        if run.command == "deploy":
            continue
        for dsn in run.dsns:
            init = deployed[dsn_parts(dsn)["host"]]
            assert service.depends_on.get(init) == "service_completed_successfully", (
                f"{service.name} may start before {init} has deployed the schema"
            )


def test_services_write_events_only_once_the_relay_streams_every_database() -> None:
    # A replication slot only sees what is written after it exists.
    relay = compose()["relay"]
    assert relay.healthcheck and "--sources-streaming" in relay.healthcheck
    sources = {dsn_parts(dsn)["host"] for dsn in walsaga(relay).dsns}
    for service in walsaga_services():
        run = walsaga(service)
        if run.command in ("deploy", "relay"):
            continue
        assert any(dsn_parts(d)["host"] in sources for d in run.dsns), service.name
        assert service.depends_on.get("relay") == "service_healthy", (
            f"{service.name} may write events before the relay's slots exist"
        )


# -- walsaga commands and their configuration ---------------------------------------


@by_name(walsaga_services())
def test_the_command_is_one_the_cli_accepts_with_its_environment(service: Service) -> None:
    run = walsaga(service)
    assert run.command in {"deploy", "relay", "participant", "order-service", "travel-service"}


@by_name(walsaga_services())
def test_every_walsaga_variable_reaches_a_setting(service: Service) -> None:
    run = walsaga(service)
    for var in service.environment:
        if not var.startswith("WALSAGA_"):
            continue
        if var in run.option_envvars:
            continue
        assert "__" in var and run.command in ("relay", "participant"), (
            f"{service.name}: {var} is read by nothing `walsaga {run.command}` has"
        )
    # The loaders refuse unknown keys; librdkafka refuses unknown properties.
    if run.relay is not None:
        Producer({**run.relay.producer_settings(), "bootstrap.servers": "", "log_level": 3})
    if run.participant is not None:
        consumer = build(run.participant).consumer_settings()
        Consumer({**consumer, "bootstrap.servers": "", "log_level": 3}).close()


def test_the_relay_reads_every_database_once_as_the_role_the_init_services_create() -> None:
    relay_service = compose()["relay"]
    relay = walsaga(relay_service).relay
    assert relay is not None
    databases = compose().databases
    hosts = [dsn_parts(s.dsn)["host"] for s in relay.source]
    assert sorted(hosts) == sorted(databases), "every database once, and only those"
    roles = set()
    for service in walsaga_services():
        run = walsaga(service)
        if run.command == "deploy":
            roles.add(run.params["relay_role"])
            secret = service.raw_environment[run.params["relay_password_env"]]
            assert secret == relay_service.raw_environment["PGPASSWORD"], (
                f"{service.name} gives the relay role another password than the relay uses"
            )
    [role] = roles
    for source in relay.source:
        parts = dsn_parts(source.dsn)
        assert parts["dbname"] == databases[parts["host"]].database, source.name
        assert parts["user"] == role, source.name
        assert int(parts.get("port", POSTGRES_PORT)) == POSTGRES_PORT, source.name


def test_legacy_services_deploy_the_capture_spec_that_goes_with_their_handlers() -> None:
    specs: dict[str, Path] = {}
    for service in walsaga_services():
        run = walsaga(service)
        if run.command == "deploy" and run.params["spec_path"] is not None:
            host = _mounted(service, run.params["spec_path"])
            specs[dsn_parts(run.params["dsn"])["host"]] = host
    assert specs, "no capture spec deployed"
    for service in walsaga_services():
        run = walsaga(service)
        if run.participant is None:
            continue
        handlers = service.host_path(run.params["config_path"])
        assert handlers is not None
        db = dsn_parts(run.participant.participant.dsn)["host"]
        assert specs.get(db) == handlers.parent / "capture.toml", (
            f"{service.name}: its database {db} gets no capture spec, or another one"
        )


def test_legacy_schemas_are_created_with_the_database() -> None:
    # The capture specs name their tables: deploy fails if they are not there.
    for service in walsaga_services():
        run = walsaga(service)
        if run.command != "deploy" or run.params["spec_path"] is None:
            continue
        db = compose().databases[dsn_parts(run.params["dsn"])["host"]]
        spec = _mounted(service, run.params["spec_path"])
        assert spec.parent / "schema.sql" in db.initdb_scripts(), db.name


def test_each_service_reads_its_own_database() -> None:
    owners: dict[str, str] = {}
    for service in walsaga_services():
        run = walsaga(service)
        if run.command in ("deploy", "relay"):
            continue
        [dsn] = run.dsns
        host = dsn_parts(dsn)["host"]
        assert host not in owners, f"{service.name} and {owners.get(host)} share {host}"
        owners[host] = service.name
        assert dsn_parts(dsn)["dbname"] == compose().databases[host].database, service.name


# -- ports ----------------------------------------------------------------------------


def test_published_ports_are_ports_the_services_listen_on_for_everyone() -> None:
    published = 0
    for service in compose().services.values():
        for port in service.ports:
            published += 1
            assert port.container in listening_ports(service), (
                f"{service.name}: publishes {port.container}, listens on "
                f"{sorted(listening_ports(service))}"
            )
            if service.is_walsaga:
                host, _ = walsaga(service).http or ("", 0)
                assert host == "0.0.0.0", f"{service.name} listens on {host} only"
    assert published, "nothing published"


def test_the_order_api_is_published() -> None:
    run = walsaga(compose()["order-service"])
    assert run.command == "order-service"
    assert run.http is not None
    assert run.http[1] in {p.container for p in compose()["order-service"].ports}


def test_host_ports_are_each_published_once() -> None:
    seen = [(p.host_ip, p.host) for s in compose().services.values() for p in s.ports]
    assert len(seen) == len(set(seen))


def test_health_checks_ask_what_the_service_listens_on() -> None:
    for service in compose().long_running:
        test = service.healthcheck
        assert test is not None
        if service.is_postgres:
            assert test[0] == "pg_isready", service.name
            args = dict(zip(test[1::2], test[2::2], strict=False))
            assert args["-d"] == service.database, service.name
            # Over TCP: the socket answers while the init scripts still run.
            assert args["-h"] == "127.0.0.1", service.name
        elif service.is_walsaga:
            assert test[0] == "walsaga-healthcheck", service.name
            [url] = [arg for arg in test[1:] if arg.startswith("http")]
            http = walsaga(service).http
            assert http is not None, f"{service.name} serves no HTTP to check"
            assert url == f"http://127.0.0.1:{http[1]}/healthz", service.name
        elif service is kafka_service():
            server = test[test.index("--bootstrap-server") + 1]
            assert host_port(server)[1] in listening_ports(service)
        else:
            raise AssertionError(f"{service.name}: a health check this test does not know")


def test_kafka_runs_in_kraft_mode_and_advertises_what_its_clients_reach() -> None:
    kafka = kafka_service()
    env = kafka.environment
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env.get("CLUSTER_ID"), "KRaft needs a cluster id"
    bound = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == (
        f"{env['KAFKA_NODE_ID']}@{kafka.name}:{bound[controller][1]}"
    )
    assert controller not in advertised
    assert set(advertised) <= set(bound)
    for name, (_, port) in advertised.items():
        assert bound[name][1] == port, name
    # Services on the compose network bootstrap from the inter-broker listener.
    internal = advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    assert internal == (kafka.name, bound[env["KAFKA_INTER_BROKER_LISTENER_NAME"]][1])
    for service in walsaga_services():
        for server in walsaga(service).bootstrap_servers:
            assert host_port(server) == internal, service.name
    # Clients on the host are sent to the advertised address: it must be the published one.
    for port in kafka.ports:
        [(name, address)] = [(n, a) for n, a in advertised.items() if a[1] == port.container]
        assert address == ("localhost", port.host), name
    single = "1"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == single
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == single


# -- secrets ---------------------------------------------------------------------------


def _has_password(text: str) -> bool:
    return bool(re.search(r"postgres(ql)?://[^/@\s]*:[^/@\s]*@|password\s*=", text))


def test_passwords_are_in_no_command_line_and_no_mounted_file() -> None:
    for service in compose().services.values():
        for arg in service.command:
            assert not _has_password(arg), f"{service.name}: a password in argv: {arg}"
        for mount in service.mounts:
            if mount.is_bind and mount.host_path.is_file():
                assert not _has_password(mount.host_path.read_text()), mount.source
        for var, value in service.raw_environment.items():
            if "PASSWORD" in var and not var.endswith("_ENV"):
                assert value.startswith("${"), f"{service.name}: {var} is not set from outside"


# -- the health check script -------------------------------------------------------------


def _healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "docker/healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def serving(status: int, body: bytes) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/healthz"
    finally:
        server.shutdown()
        server.server_close()


def test_the_health_check_passes_on_200_and_fails_otherwise() -> None:
    healthcheck = _healthcheck_module()
    with serving(200, b'{"consuming": true}') as url:
        assert healthcheck.main([url]) == 0
    with serving(503, b'{"consuming": false}') as url:
        assert healthcheck.main([url]) == 1
    with serving(200, b"{}") as url:
        pass
    # The server is gone: nothing answers.
    assert healthcheck.main([url, "--timeout", "1"]) == 1


def test_the_relay_counts_as_healthy_only_once_every_source_streams(
    capsys: pytest.CaptureFixture[str],
) -> None:
    healthcheck = _healthcheck_module()
    starting = b'{"status": "ok", "sources": {"orders": {"state": "streaming"},'
    starting += b' "trip": {"state": "starting"}}}'
    with serving(200, starting) as url:
        assert healthcheck.main([url]) == 0
        assert healthcheck.main([url, "--sources-streaming"]) == 1
    assert "trip (starting)" in capsys.readouterr().err
    streaming = b'{"sources": {"orders": {"state": "streaming"}, "trip": {"state": "standby"}}}'
    with serving(200, streaming) as url:
        assert healthcheck.main([url, "--sources-streaming"]) == 0
    with serving(200, b'{"sources": {}}') as url:
        assert healthcheck.main([url, "--sources-streaming"]) == 1


# -- the set-up, on real Postgres ---------------------------------------------------------


def _run_sql(dsn: str, path: Path) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(path.read_text())  # type: ignore[arg-type]


def _cli_args(service: Service, args: list[str]) -> list[str]:
    """The command line with container paths replaced by the files they are mounted from."""
    return [str(service.host_path(a) or a) if a.startswith("/") else a for a in args]


def test_the_set_up_works_on_databases_made_the_way_compose_makes_them(
    make_database: Any, pg_server: Any
) -> None:
    c = compose()
    relay = walsaga(c["relay"]).relay
    assert relay is not None
    role = dsn_parts(relay.source[0].dsn)["user"]
    with psycopg.connect(pg_server.admin_dsn) as admin:
        if admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            pytest.skip(f"role {role} exists on this server already")
    # The image creates the database, then runs its init scripts in order.
    dsn = {}
    for db in c.databases.values():
        dsn[db.name] = make_database(f"compose_{db.database}")
        for script in db.initdb_scripts():
            _run_sql(dsn[db.name], script)
    try:
        for name in sorted(c.one_shots):
            service = c[name]
            if not service.is_walsaga:
                continue
            run = walsaga(service)
            assert run.command == "deploy", name
            env = {**service.environment, "WALSAGA_DSN": dsn[dsn_parts(run.params["dsn"])["host"]]}
            result = CliRunner().invoke(main, _cli_args(service, service.command[1:]), env=env)
            assert result.exit_code == 0, f"{name}: {result.output}"

        # The services install what they need as they start.
        for service in walsaga_services():
            run = walsaga(service)
            if run.command == "travel-service":
                assert run.params["install_first"], f"{service.name} would find no tables"
                with psycopg.connect(dsn[dsn_parts(run.params["dsn"])["host"]]) as conn:
                    travel.install(run.params["service"], conn)
            elif run.command == "order-service":
                order_service.ensure_installed(dsn[dsn_parts(run.params["dsn"])["host"]])

        # travel-inventory: each file into the database it is named after.
        inventory = c["travel-inventory"]
        [folder] = [m for m in inventory.mounts if m.is_bind]
        script = folder.host_path / "load.sh"
        assert inventory.command == ["sh", str(folder.target / "load.sh")]
        assert '-h "$db-db" -d "$db"' in script.read_text()
        waits = c.waits_for(inventory.name)
        loads = sorted(folder.host_path.glob("*.sql"))
        assert [p.stem for p in loads] == ["car", "flight", "hotel"], loads
        for path in loads:
            host = f"{path.stem}-db"
            assert c[host].database == path.stem
            assert host in waits, f"travel-inventory may run before {host} is up"
            _run_sql(dsn[host], path)
            _run_sql(dsn[host], path)  # runs on every `up`

        # The relay can start on every database, as the role it logs in as.
        for source in relay.source:
            host = dsn_parts(source.dsn)["host"]
            password = c["relay"].environment["PGPASSWORD"]
            as_relay = conninfo.make_conninfo(dsn[host], user=role, password=password)
            with psycopg.connect(as_relay, autocommit=True) as conn:
                check_source(conn, source)

        counts = {
            "customers-db": "SELECT count(*) FROM customers",
            "flight-db": "SELECT count(*) FROM flights",
            "hotel-db": "SELECT count(*) FROM hotels",
            "car-db": "SELECT count(*) FROM car_classes",
        }
        for host, query in counts.items():
            with psycopg.connect(dsn[host]) as conn:
                row = conn.execute(query).fetchone()  # type: ignore[arg-type]
                assert row is not None and row[0] > 0, f"{host}: no sample rows"
    finally:
        for db_dsn in dsn.values():
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(db_dsn, autocommit=True) as conn,
            ):
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


# -- the docs ----------------------------------------------------------------------------


def test_the_docs_describe_every_service() -> None:
    text = DOCS.read_text()
    for name in compose().services:
        assert f"| `{name}` |" in text, f"docs/compose.md does not describe {name}"


def test_the_docs_send_requests_to_the_published_ports() -> None:
    text = DOCS.read_text()
    published = {p.host for s in compose().services.values() for p in s.ports}
    used = {int(port) for port in re.findall(r"curl [^\n]*?http://127\.0\.0\.1:(\d+)", text)}
    assert used, "no addresses in the docs"
    assert used <= published, f"the docs use ports nothing publishes: {used - published}"


def test_the_docs_book_trips_the_sample_inventory_can_sell() -> None:
    text = DOCS.read_text()
    [snippet] = re.findall(r"```python\n(.*?)```", text, re.S)
    compile(snippet, "docs/compose.md", "exec")
    folder = ROOT / "docker" / "travel-inventory"
    inventory = " ".join(p.read_text() for p in folder.glob("*.sql"))
    assert inventory, f"no inventory in {folder}"
    for key in ("flight_id", "hotel_id", "car_class"):
        values = re.findall(rf'{key}="([^"]+)"', snippet)
        assert values, f"the docs' booking names no {key}"
        for value in values:
            assert f"'{value}'" in inventory, f"the docs book {value}, which is not for sale"
    customers = (ROOT / "docker" / "initdb" / "customers.sql").read_text()
    ordering = set(re.findall(r'"customer_id": "([^"]+)"', text))
    assert "nobody" in ordering, "the docs show no order for an unknown customer"
    assert "'nobody'" not in customers, "the unknown customer of the docs exists"
    known = ordering - {"nobody"}
    assert known, "the docs order for no known customer"
    for customer in known:
        assert f"'{customer}'" in customers, f"the docs order for unknown {customer}"
