"""The streaming replication wire protocol, as far as the relay speaks it. Pure.

Inside COPY BOTH, the server sends CopyData messages of two kinds:

- ``w`` XLogData: ``>QQQ`` (start of the data in the WAL, the server's WAL
  end, its clock), then the output plugin's bytes (here: one wal2json message);
- ``k`` primary keepalive: ``>QQB`` (the server's WAL end, its clock, whether
  it wants an answer at once).

The client answers with ``r`` standby status updates: written, flushed and
applied positions, its clock, and whether it wants a reply. The slot keeps
the *flushed* position the client reports, so the relay reports only what
Kafka acknowledged (see :mod:`relay.window`).
"""

from __future__ import annotations

import struct
import time

#: Microseconds from the Unix epoch to Postgres's (2000-01-01).
PG_EPOCH_OFFSET_US = 946_684_800 * 1_000_000

XLOGDATA = struct.Struct(">QQQ")
KEEPALIVE = struct.Struct(">QQB")
STATUS = struct.Struct(">cQQQQB")

#: The message kind bytes, as ``data[0]`` gives them.
XLOG_DATA = ord("w")
PRIMARY_KEEPALIVE = ord("k")

#: Where the plugin's bytes begin in an XLogData message: kind + 3 * 8 bytes.
XLOGDATA_PAYLOAD = 1 + XLOGDATA.size


def pg_clock_us(now_s: float | None = None) -> int:
    """A Unix time (default: now) on Postgres's clock, in microseconds."""
    return int((time.time() if now_s is None else now_s) * 1_000_000) - PG_EPOCH_OFFSET_US


def xlogdata_start(data: bytes | memoryview) -> int:
    """The WAL position an XLogData message starts at."""
    return int(XLOGDATA.unpack_from(data, 1)[0])


def keepalive(data: bytes | memoryview) -> tuple[int, bool]:
    """A primary keepalive's WAL end, and whether the server asks for an answer now."""
    wal_end, _clock, reply = KEEPALIVE.unpack_from(data, 1)
    return int(wal_end), bool(reply)


def standby_status(lsn: int, clock_us: int | None = None) -> bytes:
    """A standby status update reporting `lsn` as written, flushed and applied."""
    return STATUS.pack(b"r", lsn, lsn, lsn, pg_clock_us() if clock_us is None else clock_us, 0)


def parse_standby_status(message: bytes) -> tuple[int, int, int, int, bool]:
    """The fields of a standby status update (for tests and tools)."""
    kind, written, flushed, applied, clock, reply = STATUS.unpack(message)
    if kind != b"r":
        raise ValueError(f"not a standby status update: {message[:1]!r}")
    return written, flushed, applied, clock, bool(reply)
