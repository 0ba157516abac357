"""Work that must wait until a transaction has committed (metrics, mostly).

A handler or a periodic task runs inside a transaction the runtime may roll
back and retry; anything counted or announced inside it would then happen
twice. :func:`after_commit` defers such work to the moment the runtime has
committed that transaction (:func:`committed`), and drops it when the
transaction rolls back (:func:`rolled_back`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

import psycopg

_pending: WeakKeyDictionary[psycopg.Connection[Any], list[Callable[[], None]]] = WeakKeyDictionary()
_lock = threading.Lock()


def after_commit(conn: psycopg.Connection[Any], callback: Callable[[], None]) -> None:
    """Run `callback` once the runtime commits `conn`'s current transaction."""
    with _lock:
        _pending.setdefault(conn, []).append(callback)


def committed(conn: psycopg.Connection[Any]) -> None:
    """`conn`'s transaction committed: run what waited for it."""
    with _lock:
        callbacks = _pending.pop(conn, [])
    for callback in callbacks:
        callback()


def rolled_back(conn: psycopg.Connection[Any]) -> None:
    """`conn`'s transaction rolled back: forget what waited for it."""
    with _lock:
        _pending.pop(conn, None)
