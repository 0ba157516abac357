"""Structured logs for every walsaga process: key-value on a console, JSON lines otherwise.

Everything goes through one structlog renderer: walsaga's own loggers, the
standard library's (uvicorn, httpx, psycopg's pool) and librdkafka's, which
confluent-kafka hands to the Python logger :func:`kafka_logger` returns. In
JSON mode every line on stderr is therefore one JSON object.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Literal

import structlog

LogFormat = Literal["console", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]

#: The stdlib logger librdkafka's messages are routed to (pass it as the
#: client's ``logger`` setting).
KAFKA_LOGGER = "walsaga.kafka"


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
    # Chatty at INFO for every request; walsaga logs what matters itself.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def kafka_logger() -> logging.Logger:
    """The logger to give librdkafka (``{"logger": kafka_logger()}``)."""
    return logging.getLogger(KAFKA_LOGGER)
