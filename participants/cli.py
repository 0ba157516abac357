"""The ``walsaga`` command line: one group, each subcommand a thin shell over the library."""

from __future__ import annotations

import click

from relay.cli import deploy, relay


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="walsaga")
def main() -> None:
    """Sagas across Postgres-backed services: capture, relay, participants."""


main.add_command(deploy)
main.add_command(relay)
