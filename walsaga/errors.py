"""The one error tree of walsaga, and the one place errors are classified.

Errors are classified by what the caller should do about them: a
:class:`TransientError` is worth retrying (lost connection, serialization
failure, broker transport), a :class:`SetupError` needs a person to fix the
environment (credentials, privileges, TLS, a missing schema), a
:class:`BusinessError` is a rule that refused the operation (sagas turn it
into a failure reply), and anything else :class:`PermanentError` fails the
same way however often it is tried. psycopg errors are translated into this
tree at the edges (:func:`from_psycopg`), always with ``raise ... from``;
:func:`classify_sqlstate` is the single SQLSTATE table every loop uses.
"""

from __future__ import annotations

from enum import StrEnum

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
    """The environment is not fit to run: wal_level, missing plugin, privileges, schema, TLS."""


class SlotLostError(PermanentError):
    """A replication slot was invalidated or vanished: events may have been lost."""


class SlotBusyError(TransientError):
    """Another process is streaming from the slot; a standby waits and tries again."""


class DecodeError(PermanentError, ValueError):
    """A WAL message that should be an event but cannot be read as one."""


class DeliveryError(WalsagaError):
    """Kafka did not take an event; the relay's policy decides what happens next."""


class BusinessError(PermanentError):
    """A business rule refused the operation; sagas turn it into a failure reply."""

    def __init__(self, reason: str, *, code: str = "BUSINESS_RULE") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class ErrorKind(StrEnum):
    """What the caller of a failed database operation should do."""

    TRANSIENT = "transient"  # retry with backoff
    SETUP = "setup"  # stop and tell a person what to fix
    BUSINESS = "business"  # a rule refused it: a failure event, no retry
    PERMANENT = "permanent"  # neither: retrying fails the same way


#: SQLSTATE class reserved for business-rule failures raised by SQL handlers:
#: ``RAISE EXCEPTION '...' USING ERRCODE = 'WS001'``.
BUSINESS_SQLSTATE_CLASS = "WS"

# Connection exceptions, transaction rollbacks (serialization failure,
# deadlock), insufficient resources, operator intervention (admin shutdown,
# cannot connect now), lock not available, query cancelled (statement timeout).
_TRANSIENT_PREFIXES = ("08", "40", "53", "57P", "55P03", "57014")
# Access rules and the catalog: undefined objects, missing privileges,
# authorization, no such database or schema, files the server lacks (a
# missing output plugin).
_SETUP_PREFIXES = ("42", "28", "3D", "3F", "58P01")


def classify_sqlstate(sqlstate: str | None, *, business: frozenset[str] = frozenset()) -> ErrorKind:
    """The kind of a server error by its SQLSTATE (`business`: extra codes that mean a refusal)."""
    if not sqlstate:
        return ErrorKind.PERMANENT
    if sqlstate.startswith(BUSINESS_SQLSTATE_CLASS) or sqlstate in business:
        return ErrorKind.BUSINESS
    if sqlstate.startswith(_TRANSIENT_PREFIXES):
        return ErrorKind.TRANSIENT
    if sqlstate.startswith(_SETUP_PREFIXES):
        return ErrorKind.SETUP
    return ErrorKind.PERMANENT


def is_transient_sqlstate(sqlstate: str | None) -> bool:
    return classify_sqlstate(sqlstate) is ErrorKind.TRANSIENT


# A connection attempt that fails before any SQLSTATE exists is transient
# (refused, reset, timed out) unless the server or libpq said something that
# waiting cannot change: credentials, the database name, TLS.
_REFUSED_FOR_GOOD = (
    "password authentication failed",
    "no password supplied",
    "does not exist",
    "no pg_hba.conf entry",
    "certificate",
    "SSL error",
    "SSL SYSCALL",
    "server does not support SSL",
    "sslmode",
    "SSL connection is required",
    "tlsv1 alert",
)


def classify(exc: psycopg.Error) -> ErrorKind:
    """The kind of any psycopg error: by SQLSTATE, else by what libpq said."""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        return classify_sqlstate(sqlstate)
    if isinstance(exc, pgerr.QueryCanceled):
        return ErrorKind.TRANSIENT
    if isinstance(exc, psycopg.OperationalError):
        text = str(exc)
        if any(marker in text for marker in _REFUSED_FOR_GOOD):
            return ErrorKind.SETUP
        return ErrorKind.TRANSIENT
    return ErrorKind.PERMANENT


def from_psycopg(exc: psycopg.Error, context: str) -> WalsagaError:
    """Translate a psycopg error into the walsaga tree, keeping the diagnosis."""
    message = f"{context}: {exc}".strip()
    kind = classify(exc)
    if kind is ErrorKind.TRANSIENT:
        return TransientError(message)
    if kind is ErrorKind.SETUP:
        return SetupError(message)
    if kind is ErrorKind.BUSINESS:
        diag = getattr(exc, "diag", None)
        reason = (diag.message_primary if diag is not None else None) or str(exc)
        return BusinessError(reason, code=getattr(exc, "sqlstate", None) or "BUSINESS_RULE")
    return PermanentError(message)
