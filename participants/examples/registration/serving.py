"""Running an ASGI app of the example on uvicorn, in a thread (tests, a service's
HTTP side) or in the foreground of a process until SIGTERM or SIGINT."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from participants.examples.embedded import wait_for_port


class Served:
    """`app` on uvicorn in a daemon thread; :meth:`stop` ends it."""

    def __init__(self, app: Any, *, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None,
                                access_log=False, lifespan="auto")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"http-{port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, *, timeout_s: float = 30.0) -> Served:
        self.thread.start()
        wait_for_port(self.port, host=self.host, timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> Served:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
