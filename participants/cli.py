"""``walsaga participant``: a participant whose handlers are SQL statements in a file,
and the foreground runner every participant command shares."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import click

from participants.declarative import build, load_participant_config
from participants.runtime import Participant
from walsaga import logs
from walsaga.cli import EXIT_ERROR, fail
from walsaga.errors import WalsagaError
from walsaga.http import serve_http
from walsaga.lifecycle import Shutdown


class Companion(Protocol):
    """Work that runs beside a participant in the same process (an effect worker)."""

    name: str

    def run(self) -> None: ...

    def stop(self) -> None: ...


def run_until_signalled(
    participant: Participant,
    *,
    http: tuple[str, int] | None,
    companions: Sequence[Companion] = (),
) -> int:
    """Run `participant` in the foreground until SIGTERM/SIGINT; return the exit status.

    `companions` run in threads of their own beside it and are asked to stop
    at the same moment, so one bound covers the whole process; should one of
    them fail, the participant stops too and the process exits with its error.
    The stop is bounded by the participant's ``shutdown_timeout_s`` (a second
    signal: at once); see :mod:`walsaga.lifecycle`. The last log line is
    ``exited`` with the time the stop took, or the watchdog's.
    """
    shutdown = Shutdown(grace_s=participant.shutdown_timeout_s, name=participant.name)
    shutdown.on_stop(participant.stop)
    for companion in companions:
        shutdown.on_stop(companion.stop)
    shutdown.install()
    server = None
    if http is not None:

        def health() -> tuple[bool, dict[str, Any]]:
            ok = participant.ready.is_set() and not participant.stop_event.is_set()
            report = {"participant": participant.name, "consuming": ok,
                      "stages_ms": participant.hops.report()}  # fmt: skip
            return ok, report

        server, _ = serve_http(http[0], http[1], participant.metrics.registry, health)
        # It takes up to half a second to stop (its poll interval): from the
        # request on, while the consumer stops, not after.
        shutdown.on_stop(
            lambda: threading.Thread(target=server.shutdown, name="http-stop", daemon=True).start()
        )
    failure: list[BaseException] = []

    def target() -> None:
        try:
            participant.run()
        except BaseException as e:
            failure.append(e)

    def beside(companion: Companion) -> None:
        try:
            companion.run()
        except BaseException as e:
            failure.append(e)
            participant.stop()

    threads = [
        threading.Thread(target=beside, args=(c,), name=c.name, daemon=True) for c in companions
    ]
    # The loop runs in a thread so that signals reach this one at once.
    worker = threading.Thread(target=target, name=f"participant-{participant.name}", daemon=True)
    worker.start()
    for thread in threads:
        thread.start()
    while worker.is_alive():
        worker.join(0.2)
    for companion, thread in zip(companions, threads, strict=True):
        companion.stop()  # the participant may have stopped for a reason of its own
        while thread.is_alive():  # within the bound: the watchdog ends the process
            thread.join(0.2)
    if server is not None:
        server.shutdown()  # at once if it stopped already
        server.server_close()
    took_s = shutdown.done()
    if failure:
        error = failure[0]
        if isinstance(error, WalsagaError):
            click.echo(f"error: {error}", err=True)
            return EXIT_ERROR
        raise error
    participant.log.info("exited", shutdown_s=took_s)
    return 0


@click.command()
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
        fail(e)
    settings = config.participant
    logs.configure(settings.log_level, settings.log_format)
    http = (settings.http_host, settings.http_port) if settings.http_port is not None else None
    raise SystemExit(run_until_signalled(build(config), http=http))
