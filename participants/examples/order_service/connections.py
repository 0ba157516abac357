"""How the order service connects to Postgres: the settings every connection it opens shares."""

from __future__ import annotations

from typing import Any

# Keep-alive settings for every connection: a peer that vanished without a
# word (a network partition) is noticed within about half a minute.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "connect_timeout": 10,
}
