"""Deploying an example's capture spec the way a legacy service's team does: with
``walsaga deploy`` (the participants never import the relay's deploy side)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo

from walsaga.errors import SetupError


def deploy_capture(conn: psycopg.Connection[Any], spec: Path) -> str:
    """Run ``walsaga deploy --spec`` against `conn`'s database; returns what it printed.

    Whatever `conn` wrote must be committed first: the deploy is another session.
    """
    dsn = conn.info.dsn
    if conn.info.password:
        dsn = conninfo.make_conninfo(dsn, password=conn.info.password)
    done = subprocess.run(
        [sys.executable, "-m", "walsaga", "deploy", "--dsn", dsn, "--spec", str(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SetupError(f"walsaga deploy --spec {spec.name} failed: {done.stderr.strip()}")
    return done.stdout
