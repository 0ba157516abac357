"""``walsaga deploy``: install or upgrade the capture layer of one service database."""

from __future__ import annotations

import os
from pathlib import Path

import click
import psycopg

from relay import deploy as deploying
from relay.capture import CaptureSpec, load_spec
from relay.deploy import DeployReport, RelayRole
from relay.errors import ConfigError, WalsagaError, from_psycopg

# Exit status for every error walsaga reports itself (bad spec, unreachable
# database...), the same as click's for a bad command line.
EXIT_ERROR = 2


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
def deploy(
    dsn: str,
    spec_path: Path | None,
    plan: bool,
    drop: bool,
    relay_role: str | None,
    relay_password_env: str | None,
) -> None:
    """Install the walsaga schema and the capture triggers of a spec, in one transaction."""
    if drop and spec_path is None:
        raise click.UsageError("--drop needs --spec: it removes what that spec installed")
    if drop and relay_role:
        raise click.UsageError("--relay-role cannot be combined with --drop")
    if relay_password_env and not relay_role:
        raise click.UsageError("--relay-password-env needs --relay-role")
    try:
        spec = load_spec(spec_path) if spec_path is not None else None
        role = _relay_role(relay_role, relay_password_env) if relay_role else None
        report = _run(dsn, spec, role, plan=plan, drop=drop)
    except WalsagaError as e:
        # One line: a multi-line server message is folded into it.
        click.echo("error: " + "; ".join(line.strip() for line in str(e).splitlines()), err=True)
        raise SystemExit(EXIT_ERROR) from None
    _print(report, drop=drop)


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
