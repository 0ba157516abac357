"""``walsaga console``: serve the console's pages."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click
import uvicorn

from participants.console.app import create_app
from participants.sagas_cli import DEFAULT_CONFIG
from participants.tracker_config import load_tracker_config
from walsaga import logs
from walsaga.cli import fail
from walsaga.errors import ConfigError, WalsagaError


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="WALSAGA_TRACKER_CONFIG",
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The tracker's configuration (TOML) with its [console] table.",
)
@click.option("--host", help="Address to listen on (default: [console] host).")
@click.option(
    "--port", type=click.IntRange(0, 65535), help="Port (default: [console] port; 0: any free one)."
)
@click.option(
    "--operator-token-env",
    metavar="VAR",
    help="Environment variable holding the operator token (else [console] operator_token, "
    "e.g. from WALSAGA_CONSOLE__OPERATOR_TOKEN); without one the console is read-only.",
)
def console(
    config_path: Path, host: str | None, port: int | None, operator_token_env: str | None
) -> None:
    """Serve the web console: sagas, their timelines, repairs, the relay."""
    try:
        config = load_tracker_config(config_path)
        settings = config.console
        if operator_token_env:
            token = os.environ.get(operator_token_env)
            if not token or len(token) < 16:
                raise ConfigError(
                    f"{operator_token_env}: the operator token must be set, and at least 16 "
                    "characters long"
                )
            settings = settings.model_copy(update={"operator_token": token})
            config = config.model_copy(update={"console": settings})
        sock = socket.create_server(
            (host or settings.host, settings.port if port is None else port)
        )
    except WalsagaError as e:
        fail(e)
    except OSError as e:
        fail(f"console: cannot listen on {host or settings.host}:{port}: {e}")
    logs.configure(settings.log_level, settings.log_format)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = "127.0.0.1" if bound_host in ("0.0.0.0", "::") else bound_host
    mode = "read-only" if settings.operator_token is None else "operator actions need the token"
    click.echo(f"walsaga console: http://{shown}:{bound_port}/ ({mode})")
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), log_config=None, access_log=False, lifespan="on")
    )
    server.run(sockets=[sock])
