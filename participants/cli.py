"""The ``walsaga`` command line: one group, each subcommand a thin shell over the library."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, cast

import click

from participants.declarative import build, load_participant_config
from participants.examples.travel.services import SERVICES
from participants.runtime import Participant
from relay import logs
from relay.cli import EXIT_ERROR, deploy, relay
from relay.errors import WalsagaError
from relay.metrics import serve_http


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="walsaga")
def main() -> None:
    """Sagas across Postgres-backed services: capture, relay, participants."""


main.add_command(deploy)
main.add_command(relay)


def run_until_signalled(participant: Participant, *, http: tuple[str, int] | None) -> int:
    """Run `participant` in the foreground; SIGTERM/SIGINT stop it cleanly."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        participant.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = None
    if http is not None:

        def health() -> tuple[bool, dict[str, Any]]:
            ok = participant.ready.is_set() and not participant.stop_event.is_set()
            return ok, {"participant": participant.name, "consuming": ok}

        server, _ = serve_http(http[0], http[1], participant.metrics.registry, health)
    failure: list[BaseException] = []

    def target() -> None:
        try:
            participant.run()
        except BaseException as e:
            failure.append(e)

    # The loop runs in a thread so that signals reach this one at once.
    worker = threading.Thread(target=target, name=f"participant-{participant.name}")
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if server is not None:
        server.shutdown()
    if failure:
        error = failure[0]
        if isinstance(error, WalsagaError):
            click.echo(f"error: {error}", err=True)
            return EXIT_ERROR
        raise error
    return 0


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="WALSAGA_PARTICIPANT_CONFIG",
    required=True,
    help="Handlers file (TOML); keys can also come from WALSAGA_* variables.",
)
def participant(config_path: Path) -> None:
    """Run a participant whose handlers are SQL statements declared in a file."""
    try:
        config = load_participant_config(config_path)
    except WalsagaError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(EXIT_ERROR) from None
    settings = config.participant
    logs.configure(settings.log_level, settings.log_format)
    http = (settings.http_host, settings.http_port) if settings.http_port is not None else None
    raise SystemExit(run_until_signalled(build(config), http=http))


@main.command("travel-service")
@click.option(
    "--service",
    type=click.Choice(SERVICES),
    required=True,
    help="Which service of the travel booking example to run.",
)
@click.option("--dsn", required=True, help="The service's own database.")
@click.option(
    "--bootstrap-servers", default="127.0.0.1:9092", show_default=True, help="Kafka brokers."
)
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
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def travel_service(
    service: str,
    dsn: str,
    bootstrap_servers: str,
    install_first: bool,
    name: str | None,
    http_port: int | None,
    http_host: str,
    log_level: str,
) -> None:
    """Run one service of the travel booking example (docs/travel.md)."""
    import psycopg

    from participants.examples import travel

    logs.configure(log_level, "console")
    which = cast(travel.ServiceName, service)
    settings = {"name": name} if name else {}
    try:
        if install_first:
            with psycopg.connect(dsn) as conn:
                travel.install(which, conn)
        participant = travel.service(
            which, dsn=dsn, bootstrap_servers=bootstrap_servers, **settings
        )
    except (WalsagaError, psycopg.Error) as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(EXIT_ERROR) from None
    http = (http_host, http_port) if http_port is not None else None
    raise SystemExit(run_until_signalled(participant, http=http))


@main.command("order-service")
@click.option(
    "--dsn",
    envvar="WALSAGA_DSN",
    required=True,
    help="The order service's database (env WALSAGA_DSN).",
)
@click.option(
    "--bootstrap-servers",
    envvar="WALSAGA_BOOTSTRAP_SERVERS",
    required=True,
    help="Kafka bootstrap servers (env WALSAGA_BOOTSTRAP_SERVERS).",
)
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
    "--workers",
    envvar="WALSAGA_WORKERS",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Consumer threads for replies and events (each takes some of the partitions).",
)
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
    bootstrap_servers: str,
    mode: str,
    host: str,
    port: int,
    customers_dsn: str | None,
    max_wait_s: float,
    workers: int,
    log_level: str,
    log_format: str,
) -> None:
    """Run the example order service: its HTTP API (orders, events, webhooks,
    /healthz, /metrics) and its part in the create-order saga."""
    from participants.examples import order_service as service

    logs.configure(log_level, log_format)
    settings = service.OrderServiceSettings(
        dsn=dsn,
        bootstrap_servers=bootstrap_servers,
        mode="orchestration" if mode == "orchestration" else "choreography",
        customers_dsn=customers_dsn,
        max_wait_s=max_wait_s,
        workers=workers,
    )
    try:
        installed = service.ensure_installed(dsn)
    except WalsagaError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(EXIT_ERROR) from None
    if installed:
        click.echo(f"installed: {', '.join(installed)}", err=True)
    failure = service.serve(settings, host=host, port=port, log_level=log_level)
    if failure is not None:
        click.echo(f"error: {failure}", err=True)
        raise SystemExit(EXIT_ERROR)


@main.command()
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
    from participants.demo import DemoOptions, run_demo

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
        click.echo(f"error: {e}", err=True)
        raise SystemExit(EXIT_ERROR) from None
    raise SystemExit(status)
