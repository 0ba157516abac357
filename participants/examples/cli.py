"""Commands of the example services and the demo (``walsaga order-service``,
``walsaga travel-service``, ``walsaga demo``); installed with the ``examples``
and ``demo`` extras.

The services reach Kafka with the same settings as the relay: a ``[kafka]``
table in the file given with ``--config`` (any librdkafka setting: SASL, TLS...)
and ``WALSAGA_KAFKA__*`` variables; ``--bootstrap-servers`` is a shortcut for
``"bootstrap.servers"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import click
import psycopg
from pydantic import BaseModel, ConfigDict, Field

from participants.cli import run_until_signalled
from participants.examples.travel.services import SERVICES
from walsaga import logs
from walsaga.cli import fail
from walsaga.config import load
from walsaga.errors import ConfigError, WalsagaError, from_psycopg


class KafkaConfig(BaseModel):
    """A file with a ``[kafka]`` table (other tables are left to other programs)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kafka: dict[str, Any] = Field(default_factory=dict)


def kafka_settings(config_path: Path | None, bootstrap_servers: str | None) -> dict[str, Any]:
    """librdkafka settings from ``--config`` and ``WALSAGA_KAFKA__*`` (bootstrap servers needed)."""
    kafka = dict(load(config_path, KafkaConfig).kafka)
    if bootstrap_servers:
        kafka["bootstrap.servers"] = bootstrap_servers
    if not kafka.get("bootstrap.servers"):
        raise ConfigError(
            "no Kafka bootstrap servers: give --bootstrap-servers, "
            'WALSAGA_KAFKA__BOOTSTRAP_SERVERS, or "bootstrap.servers" in [kafka] of --config'
        )
    return kafka


_KAFKA_CONFIG = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A TOML file whose [kafka] table holds librdkafka settings (SASL, TLS...); "
    "WALSAGA_KAFKA__* variables work too.",
)


_SHUTDOWN_TIMEOUT = click.option(
    "--shutdown-timeout",
    "shutdown_timeout_s",
    type=click.FloatRange(min=0, min_open=True, max=300),
    envvar="WALSAGA_SHUTDOWN_TIMEOUT_S",
    default=5.0,
    show_default=True,
    help="The longest a stop after SIGTERM or SIGINT may take, in seconds; past it the "
    "process exits anyway (what it did not commit is delivered again after the restart) "
    "(env WALSAGA_SHUTDOWN_TIMEOUT_S).",
)


@click.command("travel-service")
@click.option(
    "--service",
    type=click.Choice(SERVICES),
    required=True,
    help="Which service of the travel booking example to run.",
)
@click.option("--dsn", required=True, help="The service's own database.")
@click.option(
    "--bootstrap-servers",
    envvar="WALSAGA_BOOTSTRAP_SERVERS",
    help="Kafka bootstrap servers (env WALSAGA_BOOTSTRAP_SERVERS); or [kafka] in --config.",
)
@_KAFKA_CONFIG
@click.option(
    "--install",
    "install_first",
    is_flag=True,
    help="Create the service's tables and walsaga objects first (idempotent).",
)
@click.option(
    "--name",
    default=None,
    help="Participant name: its consumer group and inbox consumer. [default: SERVICE-service]",
)
@click.option("--http-port", type=int, default=None, help="Serve /healthz and /metrics.")
@click.option("--http-host", default="127.0.0.1", show_default=True)
@_SHUTDOWN_TIMEOUT
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def travel_service(
    service: str,
    dsn: str,
    bootstrap_servers: str | None,
    config_path: Path | None,
    install_first: bool,
    name: str | None,
    http_port: int | None,
    http_host: str,
    shutdown_timeout_s: float,
    log_level: str,
) -> None:
    """Run one service of the travel booking example (docs/travel.md)."""

    from participants.examples import travel

    logs.configure(log_level, "console")
    which = cast(travel.ServiceName, service)
    settings: dict[str, Any] = {"shutdown_timeout_s": shutdown_timeout_s}
    if name:
        settings["name"] = name
    try:
        kafka = kafka_settings(config_path, bootstrap_servers)
        if install_first:
            with psycopg.connect(dsn) as conn:
                travel.install(which, conn)
        participant = travel.service(
            which,
            dsn=dsn,
            bootstrap_servers=kafka.pop("bootstrap.servers"),
            kafka=kafka,
            **settings,
        )
    except psycopg.Error as e:
        fail(from_psycopg(e, f"{service} service"))
    except WalsagaError as e:
        fail(e)
    http = (http_host, http_port) if http_port is not None else None
    raise SystemExit(run_until_signalled(participant, http=http))


@click.command("order-service")
@click.option(
    "--dsn",
    envvar="WALSAGA_DSN",
    required=True,
    help="The order service's database (env WALSAGA_DSN).",
)
@click.option(
    "--bootstrap-servers",
    envvar="WALSAGA_BOOTSTRAP_SERVERS",
    help="Kafka bootstrap servers (env WALSAGA_BOOTSTRAP_SERVERS); or [kafka] in --config.",
)
@_KAFKA_CONFIG
@click.option(
    "--mode",
    type=click.Choice(["choreography", "orchestration"]),
    envvar="WALSAGA_MODE",
    required=True,
    help="Which variant of the create-order saga runs (env WALSAGA_MODE).",
)
@click.option("--host", envvar="WALSAGA_HOST", default="127.0.0.1", show_default=True)
@click.option("--port", envvar="WALSAGA_PORT", type=int, default=8080, show_default=True)
@click.option(
    "--customers-dsn",
    envvar="WALSAGA_CUSTOMERS_DSN",
    help="Read-only customer directory: unknown customers get 422 at once "
    "(without it, their orders end REJECTED by the saga).",
)
@click.option(
    "--max-wait",
    "max_wait_s",
    type=click.FloatRange(min=0),
    envvar="WALSAGA_MAX_WAIT_S",
    default=60.0,
    show_default=True,
    help="Longest ?wait= a request may ask for, in seconds.",
)
@click.option(
    "--max-backlog",
    envvar="WALSAGA_MAX_BACKLOG",
    type=click.IntRange(min=0),
    default=2000,
    show_default=True,
    help="Pending orders (sagas under way) past which new orders get 503 with Retry-After; "
    "0 admits everything.",
)
@click.option(
    "--workers",
    envvar="WALSAGA_WORKERS",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Consumer threads for replies and events (each takes some of the partitions).",
)
@_SHUTDOWN_TIMEOUT
@click.option(
    "--log-level",
    envvar="WALSAGA_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--log-format",
    envvar="WALSAGA_LOG_FORMAT",
    type=click.Choice(["console", "json"]),
    default="console",
    show_default=True,
)
def order_service(
    dsn: str,
    bootstrap_servers: str | None,
    config_path: Path | None,
    mode: str,
    host: str,
    port: int,
    customers_dsn: str | None,
    max_wait_s: float,
    max_backlog: int,
    workers: int,
    shutdown_timeout_s: float,
    log_level: str,
    log_format: str,
) -> None:
    """Run the example order service: its HTTP API (orders, events, webhooks,
    /healthz, /metrics) and its part in the create-order saga."""
    from participants.examples import order_service as service

    logs.configure(log_level, log_format)
    try:
        kafka = kafka_settings(config_path, bootstrap_servers)
    except WalsagaError as e:
        fail(e)
    settings = service.OrderServiceSettings(
        dsn=dsn,
        bootstrap_servers=kafka.pop("bootstrap.servers"),
        kafka=kafka,
        mode="orchestration" if mode == "orchestration" else "choreography",
        customers_dsn=customers_dsn,
        max_wait_s=max_wait_s,
        max_backlog=max_backlog,
        workers=workers,
        shutdown_timeout_s=shutdown_timeout_s,
    )
    try:
        installed = service.ensure_installed(dsn)
    except WalsagaError as e:
        fail(e)
    if installed:
        click.echo(f"installed: {', '.join(installed)}", err=True)
    failure = service.serve(settings, host=host, port=port, log_level=log_level)
    if failure is not None:
        fail(failure)


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".walsaga/demo"),
    show_default=True,
    help="Where the demo keeps its clusters and logs (delete it any time the demo is not running).",
)
@click.option(
    "--mode",
    type=click.Choice(["orchestration", "choreography"]),
    default="orchestration",
    show_default=True,
    help="Which variant of the order saga to run.",
)
@click.option("--orders", "n_orders", type=click.IntRange(min=0), default=60, show_default=True)
@click.option("--trips", "n_trips", type=click.IntRange(min=0), default=15, show_default=True)
@click.option("--port", type=int, default=8080, show_default=True, help="Order service port.")
@click.option("--serve", is_flag=True, help="Keep everything running until Ctrl-C.")
@click.option(
    "--keep/--fresh",
    default=False,
    show_default=True,
    help="Reuse the databases of the last run (credit already taken stays taken), "
    "or start from empty ones.",
)
def demo(
    directory: Path,
    mode: str,
    n_orders: int,
    n_trips: int,
    port: int,
    serve: bool,
    keep: bool,
) -> None:
    """Run everything on this machine (Postgres clusters, broker, relay, services),
    a batch of sagas with progress, and a summary."""
    from participants.examples.demo import DemoOptions, run_demo

    logs.configure("warning")
    options = DemoOptions(
        directory=directory,
        mode="choreography" if mode == "choreography" else "orchestration",
        orders=n_orders,
        trips=n_trips,
        serve=serve,
        port=port,
        fresh=not keep,
    )
    try:
        status = run_demo(options)
    except WalsagaError as e:
        fail(e)
    raise SystemExit(status)
