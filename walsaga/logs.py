"""Structured logs for every walsaga process: key-value on a console, JSON lines otherwise.

Everything goes through one structlog renderer: walsaga's own loggers, the
standard library's (uvicorn, httpx, psycopg's pool) and librdkafka's, which
confluent-kafka hands to the Python logger :func:`kafka_logger` returns. In
JSON mode every line on stderr is therefore one JSON object.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Literal

import structlog

LogFormat = Literal["console", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]

#: The stdlib logger librdkafka's messages are routed to (pass it as the
#: client's ``logger`` setting).
KAFKA_LOGGER = "walsaga.kafka"

#: How long a Kafka client's repeated complaint (a failed connect, every 100 ms
#: or so while a broker is down) stays out of the log after it was written.
REPEAT_WINDOW_S = 30.0

_NUMBERS = re.compile(r"\d+")


class Repeats:
    """Lets a message through once per `window_s` and counts those held back.

    Messages that differ only in their numbers (ports, broker ids, "after 3ms")
    are the same message: while a broker is down, its clients' connect failures
    make one line per window, with how many more there were.
    """

    def __init__(self, window_s: float = REPEAT_WINDOW_S, *,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        #: message shape -> (when it was last let through, how many held back since)
        self._seen: dict[str, tuple[float, int]] = {}

    def admit(self, message: str) -> int | None:
        """None: hold `message` back. Otherwise let it through; the number held
        back since the last one like it was let through (0 the first time)."""
        shape = _NUMBERS.sub("#", message)
        now = self._clock()
        with self._lock:
            last = self._seen.get(shape)
            if last is not None and now - last[0] < self.window_s:
                self._seen[shape] = (last[0], last[1] + 1)
                return None
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[shape] = (now, 0)
            return 0 if last is None else last[1]


class _KafkaRepeats(logging.Filter):
    """Holds back librdkafka's repeated lines (see :class:`Repeats`)."""

    def __init__(self) -> None:
        super().__init__()
        self.repeats = Repeats()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        held = self.repeats.admit(message)
        if held is None:
            return False
        if held:
            record.msg = f"{message} ({held} more like it in the last {self.repeats.window_s:g}s)"
            record.args = ()
        return True


_kafka_repeats = _KafkaRepeats()


class _Seal(logging.Filter):
    """Once set, lets through only the lines of the thread that set it."""

    def __init__(self) -> None:
        super().__init__()
        self.thread: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        return self.thread is None or record.thread == self.thread


_seal = _Seal()


def seal() -> None:
    """From now on, write only the lines of the calling thread.

    A stopping process calls this before its last line, so that its last line
    is its own: a client abandoned in another thread (a Kafka consumer whose
    close did not answer in time) may still have things to say until the
    process is gone, and they are no longer news.
    """
    _seal.thread = threading.get_ident()


def configure(level: str = "info", fmt: str = "console") -> None:
    """Route structlog and the standard library to stderr at `level`."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(_seal)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # Libraries that install handlers of their own: send them to the root.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore"):
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
    logging.getLogger(KAFKA_LOGGER).addFilter(_kafka_repeats)  # once, however often called
    # Chatty at INFO for every request; walsaga logs what matters itself.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def kafka_logger() -> logging.Logger:
    """The logger to give librdkafka (``{"logger": kafka_logger()}``). Once
    :func:`configure` has run, a line repeated within :data:`REPEAT_WINDOW_S`
    is written once, then with how many more there were."""
    return logging.getLogger(KAFKA_LOGGER)
