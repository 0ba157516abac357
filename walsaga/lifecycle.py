"""Stopping a long-running walsaga process, bounded in time, broker or not.

Every long-running command (``walsaga relay``, ``participant``, the example
services) installs a :class:`Shutdown`. The first SIGTERM or SIGINT sets its
event: the process stops taking work, finishes or abandons what is under way,
commits or confirms what it can, and exits. The stop is bounded: if the
process is still there ``grace_s`` later (a client library blocked on a
broker that went away, say), a watchdog logs what it was waiting for and
exits at once. A second signal exits at once too.

A process that serves its own signals (uvicorn) passes them to
:meth:`Shutdown.handle` instead of calling :meth:`~Shutdown.install`. Each
command ends with one last log line: its own "exited" line, with how long the
stop took (:meth:`Shutdown.done`), or the watchdog's "did not stop within";
from then on, what other threads still log is not written.

Nothing is lost either way: what was not committed or confirmed is delivered
again after the restart, and the inbox (participants) or the consumers'
deduplication by event ``id`` (relay) absorbs the repeats.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import structlog

from walsaga import logs

log = structlog.get_logger("walsaga")

#: Exit status after a stop that had to be forced (128 + SIGTERM, as a shell reports it).
EXIT_FORCED = 143


class Shutdown:
    """The stop request of a process, and the watchdog that bounds it."""

    def __init__(self, *, grace_s: float, name: str = "walsaga") -> None:
        self.grace_s = grace_s
        self.name = name
        self.event = threading.Event()
        self.signals = 0
        self.requested_at: float | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._done = threading.Event()

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call `callback` (in the signal handler's thread) when a stop is requested."""
        self._callbacks.append(callback)

    def install(self) -> Shutdown:
        """Handle SIGTERM and SIGINT in this process (call from the main thread)."""
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        """A signal handler: the first signal requests the stop, a second one exits now."""
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals > 1:
            logs.seal()
            log.warning("second signal: exiting now", signal=name, process=self.name)
            self._exit_now(EXIT_FORCED)
        log.info("stopping", signal=name, process=self.name, within_s=self.grace_s)
        self.request()

    def request(self) -> None:
        """Ask the process to stop (as the first signal does) and arm the watchdog."""
        if self.event.is_set():
            return
        self.requested_at = time.monotonic()
        self.event.set()
        for callback in self._callbacks:
            try:
                callback()
            except Exception as e:  # a stop must go on whatever one part says
                log.error("stop callback failed", error=repr(e))
        watchdog = threading.Thread(target=self._watch, name="walsaga-shutdown", daemon=True)
        watchdog.start()

    def done(self) -> float:
        """The process finished its stop: disarm the watchdog; return how long the stop
        took in seconds (0 when none was requested: the process stopped on its own).

        From now on only the calling thread's log lines are written (its "exited"
        line is the last), whatever abandoned clients in other threads still say.
        """
        self._done.set()
        logs.seal()
        if self.requested_at is None:
            return 0.0
        return round(time.monotonic() - self.requested_at, 3)

    def _watch(self) -> None:
        if self._done.wait(self.grace_s):
            return
        logs.seal()
        log.error(
            f"did not stop within {self.grace_s:g}s: exiting now (what was not committed is "
            "delivered again after the restart)",
            process=self.name,
            waiting_on=_busy_threads(),
        )
        self._exit_now(EXIT_FORCED)

    @staticmethod
    def _exit_now(status: int) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(status)


def _busy_threads() -> list[str]:
    # Daemon threads too: a consumer's close abandoned in one is what a stop
    # most often waits on.
    current = threading.current_thread()
    return sorted(t.name for t in threading.enumerate() if t is not current and t.is_alive())
