"""The ``walsaga`` command line: one group whose subcommands are loaded when used.

Each subcommand lives with the part it runs (``relay.cli``, ``participants.cli``,
the examples); this root only knows their names, so ``walsaga relay`` imports
nothing of the participants or the example services, and a command whose
optional dependencies are not installed says which extra brings them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from typing import NoReturn

import click

#: Exit status for every error walsaga reports itself (bad spec, unreachable
#: database...), the same as click's for a bad command line.
EXIT_ERROR = 2

# name -> (module:attribute, extra that provides its dependencies, or None)
_COMMANDS: dict[str, tuple[str, str | None]] = {
    "deploy": ("relay.cli:deploy", None),
    "relay": ("relay.cli:relay", None),
    "participant": ("participants.cli:participant", None),
    "tracker": ("participants.sagas_cli:tracker", None),
    "sagas": ("participants.sagas_cli:sagas", None),
    "console": ("participants.console.cli:console", "console"),
    "effects": ("participants.effects.cli:effects", None),
    "order-service": ("participants.examples.cli:order_service", "examples"),
    "travel-service": ("participants.examples.cli:travel_service", "examples"),
    "registration-service": (
        "participants.examples.registration.cli:registration_service",
        "examples",
    ),
    "demo": ("participants.examples.cli:demo", "demo"),
}


def fail(error: BaseException | str) -> NoReturn:
    """Print ``error: ...`` on one line and exit with :data:`EXIT_ERROR`."""
    text = str(error)
    # A multi-line server message is folded into the one line.
    click.echo("error: " + "; ".join(line.strip() for line in text.splitlines() if line.strip()),
               err=True)  # fmt: skip
    raise SystemExit(EXIT_ERROR)


def missing_requirements(extra: str) -> list[str]:
    """The distributions the `extra` of walsaga asks for that are not installed."""
    try:
        requirements = importlib.metadata.requires("walsaga") or []
    except importlib.metadata.PackageNotFoundError:
        return []  # run from a source tree: nothing to compare with
    missing = []
    for requirement in requirements:
        name, _, marker = requirement.partition(";")
        if not re.search(rf"""extra\s*==\s*["']{re.escape(extra)}["']""", marker):
            continue
        match = re.match(r"\s*([A-Za-z0-9._-]+)(\[([^\]]+)\])?", name)
        if match is None:
            continue
        dist, _, included = match.groups()
        if dist.lower() == "walsaga" and included:
            for other in included.split(","):
                missing += missing_requirements(other.strip())
            continue
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    return missing


def _missing_extra(name: str, extra: str, missing: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True}, add_help_option=False)
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.pass_context
    def unavailable(ctx: click.Context, args: tuple[str, ...]) -> None:
        if "--help" in args or "-h" in args:
            click.echo(ctx.get_help())
            return
        fail(
            f"walsaga {name} needs the '{extra}' extra ({missing} not installed): "
            f"pip install 'walsaga[{extra}]'"
        )

    unavailable.help = f"Not available here: needs pip install 'walsaga[{extra}]' ({missing})."
    return unavailable


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*_COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        found = _COMMANDS.get(cmd_name)
        if found is None:
            return None
        target, extra = found
        if extra is not None:
            missing = missing_requirements(extra)
            if missing:
                return _missing_extra(cmd_name, extra, ", ".join(missing))
        module_name, _, attribute = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            if extra is None or (e.name or "").split(".")[0] in ("relay", "participants"):
                raise
            return _missing_extra(cmd_name, extra, e.name or str(e))
        command = getattr(module, attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="walsaga")
def main() -> None:
    """Sagas across Postgres-backed services: capture, relay, participants."""
