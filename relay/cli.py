"""The relay package's commands: ``walsaga deploy`` (install or upgrade the capture
layer of one service database) and ``walsaga relay`` (run, replay, reset-slot)."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import psycopg
from confluent_kafka import Producer

from relay import daemon, outbox, slot
from relay import deploy as deploying
from relay.capture import CaptureSpec, load_spec
from relay.config import RelayConfig, SourceConfig, load_relay_config
from relay.deploy import DeployReport, RelayRole
from walsaga import logs, schema
from walsaga.cli import fail
from walsaga.errors import ConfigError, WalsagaError, from_psycopg
from walsaga.logs import kafka_logger


@click.command()
@click.option(
    "--dsn",
    envvar="WALSAGA_DSN",
    required=True,
    help="The service database, as a libpq connection string or URI (env WALSAGA_DSN).",
)
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Capture spec (TOML). Without it, only the walsaga schema is installed or upgraded.",
)
@click.option("--plan", is_flag=True, help="Print the SQL and check it; change nothing.")
@click.option("--drop", is_flag=True, help="Remove what --spec installed.")
@click.option(
    "--relay-role",
    metavar="NAME",
    help="Create (or fix) a least-privilege login role for the relay.",
)
@click.option(
    "--relay-password-env",
    metavar="VAR",
    help="Environment variable holding the relay role's password.",
)
@click.option(
    "--with",
    "components",
    multiple=True,
    type=click.Choice(["saga", "effects", "tracker"]),
    help="Also install an optional component: saga (saga state, semantic locks, "
    "reservations), effects (requests for calls outside the database), tracker (a saga "
    "tracker's timelines). Repeatable.",
)
@click.option(
    "--slot",
    metavar="NAME",
    help="Create the relay's replication slot now, so events written before the relay "
    "first runs are kept for it (use the slot name of the relay config).",
)
def deploy(
    dsn: str,
    spec_path: Path | None,
    plan: bool,
    drop: bool,
    relay_role: str | None,
    relay_password_env: str | None,
    components: tuple[str, ...],
    slot: str | None,
) -> None:
    """Install the walsaga schema and the capture triggers of a spec, in one transaction."""
    if drop and spec_path is None:
        raise click.UsageError("--drop needs --spec: it removes what that spec installed")
    if drop and relay_role:
        raise click.UsageError("--relay-role cannot be combined with --drop")
    if relay_password_env and not relay_role:
        raise click.UsageError("--relay-password-env needs --relay-role")
    if drop and (components or slot):
        raise click.UsageError("--with and --slot cannot be combined with --drop")
    try:
        spec = load_spec(spec_path) if spec_path is not None else None
        role = _relay_role(relay_role, relay_password_env) if relay_role else None
        report = _run(dsn, spec, role, plan=plan, drop=drop)
        _print(report, drop=drop)
        for component in components:
            _component(dsn, component, plan=plan)
        if slot is not None:
            _slot(dsn, slot, plan=plan)
    except WalsagaError as e:
        fail(e)


def _component(dsn: str, component: str, *, plan: bool) -> None:
    note = "-- " if plan else ""
    try:
        with psycopg.connect(dsn) as conn:
            if plan:
                todo = schema.pending(conn, component)
                conn.rollback()
            else:
                with conn.transaction():
                    todo = schema.apply(conn, component)
            version = schema.migrations(component)[-1].version
    except psycopg.Error as e:
        raise from_psycopg(e, f"component {component}") from e
    if todo:
        verb = "would apply" if plan else "applied"
        files = ", ".join(m.path.name for m in todo)
        click.echo(f"{note}{component}: {verb} version {version} ({files})")
    else:
        click.echo(f"{note}{component}: version {version}, up to date")


def _slot(dsn: str, name: str, *, plan: bool) -> None:
    note = "-- " if plan else ""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            found = conn.execute(
                "SELECT plugin FROM pg_replication_slots WHERE slot_name = %s", (name,)
            ).fetchone()
            if found is not None:
                if found[0] != "wal2json":
                    raise ConfigError(f"slot {name!r} exists with plugin {found[0]!r}")
                click.echo(f"{note}slot {name}: exists")
                return
            if plan:
                click.echo(f"{note}slot {name}: would be created")
                return
            slot.create_slot(conn, name)
    except psycopg.Error as e:
        raise from_psycopg(e, f"creating slot {name!r}") from e
    click.echo(f"slot {name}: created (events are kept for the relay from now on)")


def _relay_role(name: str, password_env: str | None) -> RelayRole:
    if password_env is None:
        return RelayRole(name)
    password = os.environ.get(password_env)
    if not password:
        raise ConfigError(f"--relay-password-env: environment variable {password_env} is not set")
    return RelayRole(name, password)


def _run(
    dsn: str, spec: CaptureSpec | None, role: RelayRole | None, *, plan: bool, drop: bool
) -> DeployReport:
    try:
        conn = psycopg.connect(dsn)
    except psycopg.Error as e:
        raise from_psycopg(e, "cannot connect to the database") from e
    with conn:
        if drop:
            assert spec is not None
            return deploying.drop(conn, spec, apply=not plan)
        if plan:
            return deploying.plan(conn, spec, relay_role=role)
        return deploying.deploy(conn, spec, relay_role=role)


def _print(report: DeployReport, *, drop: bool) -> None:
    # A plan prints SQL, so every other line of it is an SQL comment.
    note = "" if report.applied else "-- "
    if not report.applied:
        click.echo(report.sql, nl=False)
    if not drop:
        if report.migrations:
            files = ", ".join(report.migrations)
            verb = "applied" if report.applied else "would apply"
            click.echo(f"{note}schema: {verb} version {report.schema_version} ({files})")
        else:
            click.echo(f"{note}schema: version {report.schema_version}, up to date")
    if drop and not report.captures:
        click.echo(f"{note}{report.spec}: nothing installed")
    for change in report.captures:
        action = change.action if report.applied else _would(change.action)
        click.echo(f"{note}{change.entry} on {change.operation}: {action}")
    if report.role is not None:
        action = report.role.action if report.applied else _would(report.role.action)
        click.echo(f"{note}relay role {report.role.name}: {action}")
    if not report.changed:
        click.echo(f"{note}nothing changed: the database already matches")
    elif not report.applied:
        click.echo("-- plan only: nothing was changed")


def _would(action: str) -> str:
    return action if action == "unchanged" else f"would be {action}"


# -- walsaga relay ----------------------------------------------------------

_CONFIG = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="WALSAGA_RELAY_CONFIG",
    help="relay.toml; every key can also come from WALSAGA_* variables (env WALSAGA_RELAY_CONFIG).",
)


class _Timestamp(click.ParamType[datetime]):
    """An ISO 8601 time as Postgres or people write it ('2026-11-22 10:00:00+00')."""

    name = "TIME"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return datetime.fromisoformat(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not a time like '2026-11-22 10:00:00+00'", param, ctx)


def _load_relay_config(ctx: click.Context, path: Path | None) -> RelayConfig:
    """The config named here, else the one given to ``walsaga relay --config``."""
    if path is None and ctx.parent is not None and ctx.parent.obj:
        path = ctx.parent.obj.get("config_path")
    try:
        return load_relay_config(path)
    except WalsagaError as e:
        fail(e)


def _source(config: RelayConfig, name: str | None) -> SourceConfig:
    if name is None:
        if len(config.source) == 1:
            return config.source[0]
        names = ", ".join(s.name for s in config.source)
        raise click.UsageError(f"--source is required: the config has several ({names})")
    for source in config.source:
        if source.name == name:
            return source
    raise click.UsageError(f"no source named {name!r} in the config")


@click.group(invoke_without_command=True)
@_CONFIG
@click.pass_context
def relay(ctx: click.Context, config_path: Path | None) -> None:
    """Tail each source's WAL and publish its outbox events to Kafka (runs until SIGTERM)."""
    ctx.obj = {"config_path": config_path}
    if ctx.invoked_subcommand is not None:
        return
    config = _load_relay_config(ctx, config_path)
    logs.configure(config.relay.log_level, config.relay.log_format)
    raise SystemExit(daemon.run(config))


@relay.command()
@_CONFIG
@click.option("--source", "source_name", help="Which [[source]] (optional when there is one).")
@click.option(
    "--since",
    type=_Timestamp(),
    help="Re-publish rows created at or after this time (local time unless an offset is given).",
)
@click.option("--from-id", help="Re-publish from this event id on (inclusive).")
@click.option(
    "--id",
    "ids",
    multiple=True,
    help="Re-publish exactly this event (repeatable), e.g. one Kafka refused once its cause "
    "is fixed; also finds refused events that had no outbox row.",
)
@click.pass_context
def replay(
    ctx: click.Context,
    config_path: Path | None,
    source_name: str | None,
    since: datetime | None,
    from_id: str | None,
    ids: tuple[str, ...],
) -> None:
    """Re-publish retained outbox rows, e.g. after a lost slot or a refused event.

    Consumers drop repeats by id, so re-publishing too much is safe.
    """
    if sum(x is not None and x != () for x in (since, from_id, ids)) != 1:
        raise click.UsageError("give exactly one of --since, --from-id and --id")
    config = _load_relay_config(ctx, config_path)
    logs.configure(config.relay.log_level, config.relay.log_format)
    source = _source(config, source_name)
    if since is not None and since.tzinfo is None:
        since = since.astimezone()
    producer = Producer({**config.producer_settings(), "logger": kafka_logger()})
    router = config.router(source)
    try:
        with psycopg.connect(source.dsn) as conn:
            report = outbox.replay(
                conn,
                producer,
                router,
                since=since,
                from_id=from_id,
                ids=ids,
                progress=lambda n: click.echo(f"  {n} events re-published", err=True),
            )
    except psycopg.Error as e:
        fail(from_psycopg(e, f"source {source.name!r}"))
    except WalsagaError as e:
        fail(e)
    span = ""
    if report.first_created_at is not None:
        span = f" (created {report.first_created_at} .. {report.last_created_at})"
    click.echo(f"re-published {report.published} events from {source.name!r}{span}")


@relay.command("reset-slot")
@_CONFIG
@click.option("--source", "source_name", help="Which [[source]] (optional when there is one).")
@click.option(
    "--force",
    is_flag=True,
    help="Also reset a slot that is still healthy (its unpublished events are then lost).",
)
@click.pass_context
def reset_slot(
    ctx: click.Context, config_path: Path | None, source_name: str | None, force: bool
) -> None:
    """Forget a lost slot so the relay creates a new one at the current WAL position.

    Events written while no slot existed are not published by the new slot:
    start the relay, then re-publish them with `walsaga relay replay`.
    """
    config = _load_relay_config(ctx, config_path)
    source = _source(config, source_name)
    try:
        with psycopg.connect(source.dsn, autocommit=True) as conn:
            slot.reset_slot(conn, source.slot_name, force=force)
    except psycopg.Error as e:
        fail(from_psycopg(e, f"source {source.name!r}"))
    except WalsagaError as e:
        fail(e)
    click.echo(
        f"slot {source.slot_name!r} reset: the next `walsaga relay` creates it afresh; then "
        "re-publish what was written meanwhile with `walsaga relay replay --since ...`"
    )
