"""``walsaga tracker`` (the saga tracker) and ``walsaga sagas`` (list, show, repair sagas)."""

from __future__ import annotations

import getpass
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from participants.cli import run_until_signalled
from participants.operations import Operations, SagaView, took, when
from participants.repair import Repaired
from participants.timeline import Line, as_json
from participants.tracker_config import TrackerConfig, load_tracker_config
from participants.tracker_store import STATUS_FILTERS, SagaFilter, SagaSummary, parse_age
from walsaga import logs
from walsaga.cli import fail
from walsaga.errors import WalsagaError

F = TypeVar("F", bound=Callable[..., Any])

#: Where ``--config`` is read from when not given.
DEFAULT_CONFIG = "tracker.toml"


def _config_option(command: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="WALSAGA_TRACKER_CONFIG",
        default=DEFAULT_CONFIG,
        show_default=True,
        help="The tracker's configuration (TOML); keys can also come from WALSAGA_* variables.",
    )(command)


def _load(config_path: Path) -> TrackerConfig:
    try:
        return load_tracker_config(config_path)
    except WalsagaError as e:
        fail(e)


@click.command()
@_config_option
def tracker(config_path: Path) -> None:
    """Follow the saga topics and keep every saga's timeline in the tracker's database."""
    from participants.tracker import Tracker

    config = _load(config_path)
    settings = config.tracker
    logs.configure(settings.log_level, settings.log_format)
    try:
        tracked = Tracker(config)
        tracked.prepare()
    except WalsagaError as e:
        fail(e)
    http = (settings.http_host, settings.http_port) if settings.http_port is not None else None
    raise SystemExit(run_until_signalled(tracked.participant, http=http))


@click.group()
def sagas() -> None:
    """List, show and repair sagas (from the tracker's and the orchestrators' databases)."""


def _json(value: Any) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode())


@sagas.command("list")
@_config_option
@click.option("--status", type=click.Choice(STATUS_FILTERS), help="Only sagas in this state.")
@click.option("--type", "saga_type", metavar="TYPE", help="Only sagas of this type.")
@click.option("--since", metavar="AGE", help="Only sagas started within AGE (90s, 30m, 1h, 2d).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json_", is_flag=True, help="Print JSON.")
def list_command(
    config_path: Path,
    status: str | None,
    saga_type: str | None,
    since: str | None,
    limit: int,
    as_json_: bool,
) -> None:
    """List sagas; without --status, stuck and FAILED ones first."""
    config = _load(config_path)
    try:
        age = parse_age(since) if since else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from e
    try:
        found, counts = Operations.direct(config).list_sagas(
            SagaFilter(status=status, saga_type=saga_type, since=age, limit=limit)
        )
    except WalsagaError as e:
        fail(e)
    if as_json_:
        _json({"counts": counts, "sagas": [s.to_json() for s in found]})
        return
    click.echo("  ".join(f"{name} {counts[name]}" for name in STATUS_FILTERS))
    if not found:
        click.echo("no sagas")
        return
    now = datetime.now(UTC)
    rows = [_list_row(s, now) for s in found]
    widths = [max(len(r[i]) for r in [_LIST_HEADER, *rows]) for i in range(len(_LIST_HEADER))]
    for row in [_LIST_HEADER, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


_LIST_HEADER = ("STATUS", "TYPE", "ID", "STARTED", "TOOK", "LAST", "REASON")


def _list_row(s: SagaSummary, now: datetime) -> tuple[str, ...]:
    return (s.shown_status, s.saga_type or "?", s.id, when(s.started_at), took(s.duration_s(now)),
            s.last_type or "-", (s.reason or "")[:60])  # fmt: skip


@sagas.command("show")
@_config_option
@click.argument("saga_id")
@click.option("--json", "as_json_", is_flag=True, help="Print JSON.")
def show_command(config_path: Path, saga_id: str, as_json_: bool) -> None:
    """Show a saga: its timeline across services, and for an orchestrated one its state and log."""
    config = _load(config_path)
    try:
        view = Operations.direct(config).show(saga_id)
    except WalsagaError as e:
        fail(e)
    if view is None:
        fail(f"no saga {saga_id!r}: neither the tracker nor any orchestrator knows it")
    if as_json_:
        _json(view.to_json())
        return
    for line in describe(view):
        click.echo(line)


def describe(view: SagaView) -> list[str]:
    """A saga as text, for a terminal."""
    out = [f"saga {view.id}"]
    summary, owned = view.summary, view.orchestrated
    style = f"orchestrated by {owned.orchestrator.name}" if owned else "choreography"
    out.append(f"  type      {view.saga_type or '?'} ({style})")
    out.append(f"  status    {view.status}" + (f" — {view.reason}" if view.reason else ""))
    if summary is not None:
        now = datetime.now(UTC)
        ended = f", ended {when(summary.ended_at)}" if summary.ended_at else ""
        out.append(f"  started   {when(summary.started_at)}{ended} "
                   f"(took {took(summary.duration_s(now))})")  # fmt: skip
        out.append(f"  deadline  {when(summary.deadline)}" + (" — STUCK" if summary.stuck else ""))
    if owned is not None:
        s = owned.state
        out.append(f"  step      {s.step} (attempt {s.attempt}, refusals {s.refusals}), "
                   f"waiting on {s.waiting_on or 'nothing'}")  # fmt: skip
    if view.trace_id:
        out.append(f"  trace     {view.trace_id}")
    if view.lanes:
        out.append(f"  services  {' · '.join(view.lanes)}")
    out.append("")
    out.append("timeline")
    if not view.lines:
        out.append("  (no records seen by the tracker)")
    start = view.lines[0].at if view.lines else None
    for line in view.lines:
        out.append("  " + _timeline_row(line, start))
    if owned is not None:
        out.append("")
        out.append("data")
        out.extend("  " + row for row in as_json(owned.state.data).splitlines())
    return out


def _timeline_row(line: Line, start: datetime | None) -> str:
    offset = f"+{(line.at - start).total_seconds():.3f}s" if start else ""
    mark = "↺ " if line.compensation else ""
    if line.entry is not None:
        route = f"{line.lane} → {line.target or '?'}"
        where = f"{line.entry.topic}[{line.entry.partition}]@{line.entry.offset}"
        extra = " ".join(x for x in (line.note, f"({line.outcome})" if line.outcome else "") if x)
        step = f" step {line.step}" if line.step else ""
        return f"{offset:>10}  {route:<26} {mark}{line.title}{step}  {extra}  {where}".rstrip()
    step = f" {line.step}" if line.step else ""
    return f"{offset:>10}  {line.lane:<26} · {mark}{line.title}{step}  {line.note}".rstrip()


def who() -> str:
    """Who is running the command, for the saga log."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _repair(
    config_path: Path,
    saga_id: str,
    action: str,
    *,
    note: str,
    orchestrator: str | None,
    by: str | None,
    as_json_: bool,
) -> None:
    config = _load(config_path)
    try:
        done = Operations.direct(config).repair(
            saga_id, action, by=by or who(), note=note, orchestrator=orchestrator
        )
    except WalsagaError as e:
        fail(e)
    if as_json_:
        _json(done.to_json())
        return
    click.echo(_done(done))


def _done(done: Repaired) -> str:
    verbs = {"retry": "retried", "abort": "aborted", "resolve": "resolved"}
    return (f"saga {done.after.id} {verbs[done.action]} by {done.by}: "
            f"{done.before.status} -> {done.after.status}")  # fmt: skip


def _repair_options(command: F) -> F:
    for option in (
        click.option("--json", "as_json_", is_flag=True, help="Print JSON."),
        click.option("--by", metavar="WHO", help="Who did it, for the saga log (user@host)."),
        click.option(
            "--orchestrator", metavar="NAME", help="The [[orchestrator]] holding the saga."
        ),
        click.argument("saga_id"),
        _config_option,
    ):
        command = option(command)
    return command


@sagas.command("retry")
@_repair_options
@click.option("--note", default="", help="Why, for the saga log.")
def retry_command(
    config_path: Path,
    saga_id: str,
    orchestrator: str | None,
    by: str | None,
    as_json_: bool,
    note: str,
) -> None:
    """Retry a saga: a FAILED one's unfinished compensation, a stuck one's step."""
    _repair(config_path, saga_id, "retry", note=note, orchestrator=orchestrator, by=by,
            as_json_=as_json_)  # fmt: skip


@sagas.command("abort")
@_repair_options
@click.option("--note", default="", help="Why, for the saga log.")
def abort_command(
    config_path: Path,
    saga_id: str,
    orchestrator: str | None,
    by: str | None,
    as_json_: bool,
    note: str,
) -> None:
    """Start compensating a running saga now."""
    _repair(config_path, saga_id, "abort", note=note, orchestrator=orchestrator, by=by,
            as_json_=as_json_)  # fmt: skip


@sagas.command("resolve")
@_repair_options
@click.option("--note", required=True, help="What was done by hand (kept in the saga log).")
def resolve_command(
    config_path: Path,
    saga_id: str,
    orchestrator: str | None,
    by: str | None,
    as_json_: bool,
    note: str,
) -> None:
    """End a saga RESOLVED: a person put it right by hand."""
    _repair(config_path, saga_id, "resolve", note=note, orchestrator=orchestrator, by=by,
            as_json_=as_json_)  # fmt: skip
