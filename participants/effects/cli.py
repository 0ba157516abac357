"""``walsaga effects``: an effect worker for the HTTP effects a file declares."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import click
import psycopg

from participants.effects.config import build, load_effects_config
from participants.effects.worker import EffectWorker
from walsaga import logs, schema
from walsaga.cli import EXIT_ERROR, fail
from walsaga.errors import WalsagaError, from_psycopg
from walsaga.http import serve_http
from walsaga.lifecycle import Shutdown


def install(dsn: str) -> list[str]:
    """Install walsaga's core and effects components where missing; returns what was applied."""
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn, conn.transaction():
            applied = schema.apply(conn, "core") + schema.apply(conn, "effects")
    except psycopg.Error as e:
        raise from_psycopg(e, "installing the effects component") from e
    return [f"{m.component} {m.path.name}" for m in applied]


def run_until_signalled(worker: EffectWorker, *, http: tuple[str, int] | None) -> int:
    """Run `worker` in the foreground until SIGTERM/SIGINT; return the exit status."""
    shutdown = Shutdown(grace_s=worker.shutdown_timeout_s + 2, name=worker.name)
    shutdown.on_stop(worker.stop)
    shutdown.install()
    server = None
    if http is not None:

        def health() -> tuple[bool, dict[str, Any]]:
            ok = worker.ready.is_set() and not worker.stop_event.is_set()
            return ok, {"effect_worker": worker.name, "working": ok}

        server, _ = serve_http(http[0], http[1], worker.metrics.registry, health)
    failure: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=target, name=f"effects-{worker.name}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if server is not None:
        server.shutdown()
        server.server_close()
    took_s = shutdown.done()
    if failure:
        if isinstance(failure[0], WalsagaError):
            click.echo(f"error: {failure[0]}", err=True)
            return EXIT_ERROR
        raise failure[0]
    worker.log.info("exited", shutdown_s=took_s)
    return 0


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="WALSAGA_EFFECTS_CONFIG",
    required=True,
    help="Effects file (TOML): [effects], [vars], [[effect]]; keys can also come from "
    "WALSAGA_* variables (WALSAGA_EFFECTS__DSN, WALSAGA_VARS__NAME...).",
)
@click.option(
    "--install",
    "install_first",
    is_flag=True,
    help="Install walsaga's core and effects components first (idempotent).",
)
def effects(config_path: Path, install_first: bool) -> None:
    """Perform the HTTP effects a file declares (any number of instances may run)."""
    try:
        config = load_effects_config(config_path)
        settings = config.effects
        logs.configure(settings.log_level, settings.log_format)
        if install_first:
            applied = install(settings.dsn)
            if applied:
                click.echo(f"installed: {', '.join(applied)}", err=True)
        worker = build(config)
    except WalsagaError as e:
        fail(e)
    http = (settings.http_host, settings.http_port) if settings.http_port is not None else None
    raise SystemExit(run_until_signalled(worker, http=http))
