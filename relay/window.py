"""Which WAL position the relay may confirm to its slot. Pure: no I/O.

Delivery guarantee (at-least-once) is decided here. Every message read from
the slot gets a place in arrival order. Events wait for Kafka's
acknowledgement; position-only messages (heartbeats, other tables) need none.
The confirmable position is the highest position such that every message that
arrived before it has been acknowledged. Kafka acknowledges out of order
across partitions, so acknowledgements are counted per group of consecutive
messages and groups are retired strictly in order.

Positions are change positions, not commit positions: confirming a position
inside a transaction is safe, because Postgres re-decodes every transaction
whose commit record lies after the confirmed position. After a crash the
transaction that was being published is sent again in full; nothing earlier
is, and nothing is skipped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from walsaga.errors import DeliveryError


class Group:
    """Consecutive messages whose acknowledgements are counted together."""

    __slots__ = ("_failed", "error", "failures", "first_commit", "lsn", "nbytes", "pending",
                 "read_at", "sent_clock", "size")  # fmt: skip

    def __init__(
        self, lsn: int, first_commit: str | None = None, failed: list[Group] | None = None
    ) -> None:
        self.lsn = lsn
        self.pending = 0
        self.size = 0
        self.nbytes = 0
        #: The first delivery error of the group, and every (error, message) pair:
        #: the group does not retire until they are resolved (see relay.delivery).
        self.error: Any = None
        self.failures: list[tuple[Any, Any]] | None = None
        self._failed = failed
        #: Commit time of the group's first event, as wal2json prints it: parsed
        #: only when the group retires, not once per event.
        self.first_commit = first_commit
        #: When the first event was read (epoch s), and when the server sent it
        #: (its clock, microseconds since 2000): the stages of the hop.
        self.read_at = 0.0
        self.sent_clock = 0

    def ack(self, err: Any, msg: Any) -> None:
        """confluent-kafka delivery callback for every event of this group."""
        self.pending -= 1
        if err is not None:
            if self.failures is None:
                self.failures = []
                if self._failed is not None:
                    self._failed.append(self)
            self.failures.append((err, msg))
            if self.error is None:
                self.error = err

    def resolved(self) -> None:
        """Its failures were dealt with (sent again alone, dead-lettered): it may retire."""
        self.failures = None
        self.error = None


class AckWindow:
    """In-flight events, in arrival order, and the position that may be confirmed."""

    def __init__(
        self,
        confirmed_lsn: int,
        *,
        max_group: int = 256,
        on_retired: Callable[[Group], None] | None = None,
    ) -> None:
        self.confirmable = confirmed_lsn
        self._groups: deque[Group] = deque()
        #: Groups with delivery failures to resolve, in the order they failed.
        self.failed: list[Group] = []
        self._open: Group | None = None
        self._max_group = max_group
        self._on_retired = on_retired

    def __len__(self) -> int:
        """Groups not yet retired."""
        return len(self._groups)

    def event(self, lsn: int, commit_time: str | None = None) -> Group:
        """Register an event at `lsn`; pass the result's ``ack`` as its delivery callback."""
        group = self._open
        if group is None or group.size >= self._max_group:
            group = self._open = Group(lsn, commit_time, self.failed)
            self._groups.append(group)
        elif lsn > group.lsn:
            group.lsn = lsn
        group.pending += 1
        group.size += 1
        return group

    def position(self, lsn: int) -> None:
        """Register a message that needs no acknowledgement.

        Heartbeats, and keepalives: a keepalive's position is the end of what
        the server has decoded, so every transaction committed before it has
        been sent already, and one still open commits after it.
        """
        if not self._groups:
            if lsn > self.confirmable:
                self.confirmable = lsn
            return
        group = self._groups[-1]
        if lsn > group.lsn:
            group.lsn = lsn

    def seal(self) -> None:
        """Start a new group with the next event (called once per read batch)."""
        self._open = None

    def advance(self) -> int:
        """Retire fully acknowledged groups from the front; return the confirmable position."""
        groups = self._groups
        while groups:
            head = groups[0]
            if head.error is not None:
                raise DeliveryError(str(head.error))
            if head.pending:
                break
            groups.popleft()
            if head is self._open:
                self._open = None
            if head.lsn > self.confirmable:
                self.confirmable = head.lsn
            if self._on_retired is not None and head.size:
                self._on_retired(head)
        return self.confirmable

    def take_failed(self) -> list[Group]:
        """The groups with delivery failures reported since the last call."""
        failed, self.failed[:] = list(self.failed), []
        return failed

    def oldest_commit(self) -> str | None:
        """Commit time of the oldest event still waiting for Kafka, if any."""
        for group in self._groups:
            if group.size:
                return group.first_commit
        return None
