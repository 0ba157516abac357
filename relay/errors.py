"""The one error tree of walsaga.

Errors are classified by what the caller should do about them: a
:class:`TransientError` is worth retrying (lost connection, serialization
failure, broker transport), anything else is not (bad input, a business rule, a
broken set-up). psycopg and Kafka errors are translated into this tree at the
edges (:func:`from_psycopg`), always with ``raise ... from``.
"""

from __future__ import annotations

import psycopg
from psycopg import errors as pgerr


class WalsagaError(Exception):
    """Base of every error walsaga raises on purpose."""


class TransientError(WalsagaError):
    """Retrying the same operation later may succeed."""


class PermanentError(WalsagaError):
    """Retrying the same operation will fail the same way."""


class ConfigError(PermanentError):
    """A configuration file or value is invalid; the message names the key and the file."""


class SpecError(PermanentError):
    """A capture spec is invalid; the message names the file and the entry."""


class SetupError(PermanentError):
    """The environment is not fit to run: wal_level, missing plugin, privileges, schema."""


class SlotLostError(PermanentError):
    """A replication slot was invalidated or vanished: events may have been lost."""


class SlotBusyError(TransientError):
    """Another process is streaming from the slot; a standby waits and tries again."""


class BusinessError(PermanentError):
    """A business rule refused the operation; sagas turn it into a failure reply."""

    def __init__(self, reason: str, *, code: str = "BUSINESS_RULE") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# SQLSTATE classes that mean "try again": connection exceptions, transaction
# rollbacks (serialization failure, deadlock), insufficient resources, operator
# intervention (admin shutdown, cannot connect now).
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "57P")


def is_transient_sqlstate(sqlstate: str | None) -> bool:
    if sqlstate is None:
        return False
    return sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES)


def from_psycopg(exc: psycopg.Error, context: str) -> WalsagaError:
    """Translate a psycopg error into the walsaga tree, keeping the diagnosis."""
    sqlstate = getattr(exc, "sqlstate", None)
    message = f"{context}: {exc}".strip()
    if isinstance(exc, psycopg.OperationalError) and sqlstate is None:
        # No SQLSTATE: the connection itself failed (refused, reset, closed).
        return TransientError(message)
    if is_transient_sqlstate(sqlstate) or isinstance(exc, pgerr.QueryCanceled):
        return TransientError(message)
    return PermanentError(message)
