"""When the relay reports its position to the server. Pure: no I/O.

A standby status update goes out when the server asks for one (a keepalive
with the reply flag: it ends the connection after ``wal_sender_timeout``
otherwise), when the confirmable position moved and ``interval_s`` has passed
since the last update (so the slot follows Kafka's acknowledgements closely
without one message per event), and at least every ``status_interval_s``
whatever happens (so an idle connection is known to be alive).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Standby status updates go out at least this often, events or not.
STATUS_INTERVAL_S = 10.0


@dataclass
class Feedback:
    """The last position reported and when; decides whether to report again."""

    sent_lsn: int
    last_s: float
    interval_s: float = 0.01
    status_interval_s: float = STATUS_INTERVAL_S
    reply_requested: bool = False

    def due(self, now: float, confirmable: int) -> bool:
        """Whether a status update should go out now."""
        if self.reply_requested:
            return True
        elapsed = now - self.last_s
        if confirmable > self.sent_lsn and elapsed >= self.interval_s:
            return True
        return elapsed >= self.status_interval_s

    def sent(self, lsn: int, now: float) -> None:
        """Record an update that reported `lsn`."""
        self.sent_lsn = lsn
        self.last_s = now
        self.reply_requested = False
