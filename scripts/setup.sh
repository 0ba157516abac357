#!/usr/bin/env bash
# Prepare this machine for walsaga: Postgres with wal2json, Chromium for the
# console's tests, a virtualenv with the project and its development tools.
# Safe to run again; does only what is missing. Used by `make demo`,
# `make test` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

pg_bindir() {
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir
    else
        ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
    fi
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        echo "setup: apt-get update" >&2
        as_root apt-get update -qq
        apt_updated=1
    fi
    echo "setup: apt-get install $*" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

bindir=$(pg_bindir || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    apt_install postgresql-15 postgresql-client-15
    bindir=$(pg_bindir)
fi
pg_major=$(basename "$(dirname "$bindir")")
pkglibdir=/usr/lib/postgresql/$pg_major/lib
if [ ! -f "$pkglibdir/wal2json.so" ]; then
    apt_install "postgresql-$pg_major-wal2json"
fi

# The console's tests drive Debian's chromium through Playwright, which
# launches it as it is (it downloads no browser of its own).
if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium chromium-driver
fi

stamp="$VENV/.walsaga-installed"
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing walsaga and its dependencies into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
