"""``walsaga registration-service``: one process of the registration example.

``--service intake|identity|notifier`` runs a service (``--role`` picks its
message handlers, its effect worker, or both); ``identity-provider`` and
``mail-server`` run the outside world the example talks to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import psycopg

from participants.cli import run_until_signalled
from participants.effects.cli import run_until_signalled as run_worker_until_signalled
from participants.effects.metrics import EffectMetrics
from participants.effects.worker import EffectWorker
from participants.examples.cli import kafka_settings
from participants.runtime import Participant
from walsaga import logs
from walsaga.cli import fail
from walsaga.errors import ConfigError, WalsagaError, from_psycopg
from walsaga.lifecycle import Shutdown

SERVICES = ("intake", "identity", "notifier", "identity-provider", "mail-server")


@click.command("registration-service")
@click.option(
    "--service",
    type=click.Choice(SERVICES),
    required=True,
    help="Which process of the registration example to run.",
)
@click.option("--dsn", envvar="WALSAGA_DSN", help="The service's own database (env WALSAGA_DSN).")
@click.option(
    "--bootstrap-servers",
    envvar="WALSAGA_BOOTSTRAP_SERVERS",
    help="Kafka bootstrap servers (env WALSAGA_BOOTSTRAP_SERVERS); or [kafka] in --config.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A TOML file whose [kafka] table holds librdkafka settings (SASL, TLS...).",
)
@click.option(
    "--role",
    type=click.Choice(["all", "handlers", "effects"]),
    default="all",
    show_default=True,
    help="identity and notifier: run the message handlers, the effect worker, or both.",
)
@click.option(
    "--install",
    "install_first",
    is_flag=True,
    help="Create the service's tables and walsaga objects first (idempotent).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Where HTTP is served.")
@click.option(
    "--port",
    type=int,
    default=None,
    help="intake: its API [8030]; identity-provider: its API [8025]; "
    "mail-server: its archive [8026].",
)
@click.option(
    "--smtp-port",
    type=int,
    default=2525,
    show_default=True,
    help="mail-server: the SMTP port; notifier: where to send.",
)
@click.option(
    "--smtp-host", default="127.0.0.1", show_default=True, help="notifier: the SMTP server."
)
@click.option(
    "--mail-archive",
    default="http://127.0.0.1:8026",
    show_default=True,
    help="notifier: the mail server's archive, to settle unknown outcomes.",
)
@click.option(
    "--provider-url",
    default="http://127.0.0.1:8025",
    show_default=True,
    help="identity: the identity provider.",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".walsaga/registration"),
    show_default=True,
    help="identity-provider and mail-server: where they keep users and mail.",
)
@click.option(
    "--http-port",
    type=int,
    default=None,
    help="intake, identity, notifier: serve /healthz and /metrics.",
)
@click.option(
    "--shutdown-timeout",
    "shutdown_timeout_s",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="The longest a stop after SIGTERM may take, in seconds.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def registration_service(
    service: str,
    dsn: str | None,
    bootstrap_servers: str | None,
    config_path: Path | None,
    role: str,
    install_first: bool,
    host: str,
    port: int | None,
    smtp_port: int,
    smtp_host: str,
    mail_archive: str,
    provider_url: str,
    data_dir: Path,
    http_port: int | None,
    shutdown_timeout_s: float,
    log_level: str,
) -> None:
    """Run one process of the user registration example (docs/external-effects.md)."""
    logs.configure(log_level, "console")
    if service == "identity-provider":
        _provider(data_dir, host, port or 8025, log_level)
        return
    if service == "mail-server":
        _mail_server(data_dir, host, smtp_port, port or 8026, shutdown_timeout_s)
        return
    from participants.examples.registration import identity, intake, notifier

    http = (host, http_port) if http_port is not None else None
    try:
        if not dsn:
            raise ConfigError(f"the {service} service needs --dsn (or WALSAGA_DSN)")
        if install_first:
            with psycopg.connect(dsn) as conn:
                {
                    "intake": intake.install,
                    "identity": identity.install,
                    "notifier": notifier.install,
                }[service](conn)
        kafka = kafka_settings(config_path, bootstrap_servers) if role != "effects" else {}
        settings: dict[str, Any] = {"shutdown_timeout_s": shutdown_timeout_s}
        handlers: Participant | None = None
        worker: EffectWorker | None = None
        if service == "intake":
            runner = intake.orchestrator()
            handlers = intake.participant(dsn=dsn, kafka=kafka, orchestrator=runner, **settings)
            _serve_intake(handlers, dsn, runner, host, port or 8030, http)
            return
        metrics = None
        if role in ("all", "handlers"):
            if service == "identity":
                handlers = identity.participant(dsn=dsn, kafka=kafka, **settings)
            else:
                handlers = notifier.participant(dsn=dsn, kafka=kafka, **settings)
            metrics = EffectMetrics(registry=handlers.metrics.registry)
        if role in ("all", "effects"):
            if service == "identity":
                worker = identity.effect_worker(dsn, provider_url, metrics=metrics)
            else:
                worker = notifier.effect_worker(
                    dsn=dsn,
                    archive_url=mail_archive,
                    smtp_host=smtp_host,
                    smtp_port=smtp_port,
                    metrics=metrics,
                )
    except psycopg.Error as e:
        fail(from_psycopg(e, f"{service} service"))
    except WalsagaError as e:
        fail(e)
    if handlers is None:
        assert worker is not None
        raise SystemExit(run_worker_until_signalled(worker, http=http))
    raise SystemExit(_run_both(handlers, worker, http))


def _run_both(handlers: Participant, worker: EffectWorker | None, http: Any) -> int:
    """The handlers in the foreground, the effect worker (if any) beside them, one
    stop for both."""
    return run_until_signalled(handlers, http=http, companions=[worker] if worker else [])


def _serve_intake(
    handlers: Participant, dsn: str, runner: Any, host: str, port: int, http: Any
) -> None:
    from participants.examples.registration.intake import create_app
    from participants.examples.registration.serving import Served

    api = Served(create_app(dsn, runner), host=host, port=port).start()
    click.echo(f"intake: POST {api.url}/registrations", err=True)
    try:
        status = run_until_signalled(handlers, http=http)
    finally:
        api.stop()
    raise SystemExit(status)


def _provider(data_dir: Path, host: str, port: int, log_level: str) -> None:
    import uvicorn

    from participants.examples.registration.provider import Users, create_app

    data_dir.mkdir(parents=True, exist_ok=True)
    users = Users(data_dir / "identity-provider.sqlite3")
    click.echo(f"identity provider: http://{host}:{port}", err=True)
    uvicorn.run(create_app(users), host=host, port=port, log_level=log_level, log_config=None,
                access_log=False)  # fmt: skip


def _mail_server(data_dir: Path, host: str, smtp_port: int, port: int, grace_s: float) -> None:
    from participants.examples.registration.mailserver import MailServer

    server = MailServer(data_dir / "mail", smtp_port=smtp_port, archive_port=port, host=host)
    shutdown = Shutdown(grace_s=grace_s, name="mail-server").install()
    server.start()
    click.echo(f"mail server: smtp://{host}:{smtp_port}, archive {server.archive_url}", err=True)
    while not shutdown.event.wait(0.5):
        pass
    server.stop()
    shutdown.done()
