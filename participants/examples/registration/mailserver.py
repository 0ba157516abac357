"""The registration example's mail server: a real SMTP server (aiosmtpd) that keeps
what it accepts, and an archive to read it back.

Accepted messages go to a Maildir (one file each, kept across restarts) with
the time they arrived in header ``X-Received-At``. Recipients in a refused
domain (``bounce.example`` by default) are refused with ``550`` at ``RCPT``:
a mailbox that does not exist, the business refusal of e-mail.

The archive is HTTP, as the message APIs of mail providers are:
``GET /messages`` lists what arrived, ``GET /messages/{message_id}`` finds
one by its Message-ID (200, or 404): that is the lookup that settles a
welcome e-mail whose sending was interrupted at the wrong moment.
"""

from __future__ import annotations

import email.policy
import mailbox
import threading
import time
from collections.abc import Iterable
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

REFUSED_DOMAINS = ("bounce.example",)


class Mailbox:
    """What the server accepted: a Maildir, indexed by Message-ID."""

    def __init__(self, directory: Path) -> None:
        directory.parent.mkdir(parents=True, exist_ok=True)
        self.maildir = mailbox.Maildir(directory, create=True)
        self._lock = threading.Lock()
        self._index: dict[str, dict[str, Any]] = {}
        for key in self.maildir.iterkeys():
            self._add(self.maildir.get_bytes(key))

    def _add(self, raw: bytes) -> None:
        message = BytesParser(policy=email.policy.default).parsebytes(raw)
        message_id = str(message.get("Message-ID", "")).strip().strip("<>")
        found = self._index.get(message_id)
        if found is not None:
            found["copies"] += 1
            return
        self._index[message_id] = {
            "message_id": message_id,
            "to": str(message.get("To", "")),
            "subject": str(message.get("Subject", "")),
            "received_at": float(message.get("X-Received-At", "0") or 0),
            "copies": 1,
        }

    def deliver(self, raw: bytes) -> None:
        stamped = f"X-Received-At: {time.time():.6f}\r\n".encode() + raw
        with self._lock:
            self.maildir.add(stamped)
            self._add(stamped)

    def find(self, message_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._index.get(message_id.strip().strip("<>"))
            return dict(found) if found else None

    def messages(self) -> list[EmailMessage]:
        """Every accepted message, copies included, oldest first."""
        with self._lock:
            raws = [self.maildir.get_bytes(k) for k in self.maildir.iterkeys()]
        parsed = [BytesParser(policy=email.policy.default).parsebytes(r) for r in raws]
        found = [m for m in parsed if isinstance(m, EmailMessage)]
        return sorted(found, key=lambda m: float(m.get("X-Received-At", "0") or 0))

    def summary(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._index.values()]


class _Handler:
    def __init__(self, box: Mailbox, refused_domains: Iterable[str]) -> None:
        self.box = box
        self.refused = tuple(d.lower() for d in refused_domains)

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        domain = address.rpartition("@")[2].lower()
        if domain in self.refused:
            return f"550 5.1.1 <{address}>: no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        self.box.deliver(content)
        return "250 Message accepted for delivery"


class MailServer:
    """The SMTP server and its archive, each on a port of 127.0.0.1 (or `host`)."""

    def __init__(
        self,
        directory: Path,
        *,
        smtp_port: int,
        archive_port: int,
        host: str = "127.0.0.1",
        refused_domains: Iterable[str] = REFUSED_DOMAINS,
    ) -> None:
        self.box = Mailbox(directory)
        self.host = host
        self.smtp_port = smtp_port
        self.archive_port = archive_port
        self._controller = Controller(
            _Handler(self.box, refused_domains), hostname=host, port=smtp_port
        )
        self._archive = ThreadingHTTPServer((host, archive_port), _archive_handler(self.box))
        self._archive.daemon_threads = True
        self.running = False

    @property
    def archive_url(self) -> str:
        return f"http://{self.host}:{self.archive_port}"

    def start(self) -> MailServer:
        self.running = True
        self._controller.start()
        threading.Thread(target=self._archive.serve_forever, name="mail-archive",
                         daemon=True).start()  # fmt: skip
        return self

    def stop(self) -> None:
        """Stop both (for good: a stopped server is not started again)."""
        if not self.running:
            return
        self.running = False
        self._controller.stop()
        self._archive.shutdown()
        self._archive.server_close()

    def __enter__(self) -> MailServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _archive_handler(box: Mailbox) -> type[BaseHTTPRequestHandler]:
    class Archive(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/messages", "/messages/"):
                self._answer(200, {"messages": box.summary()})
            elif path.startswith("/messages/"):
                found = box.find(unquote(path[len("/messages/") :]))
                if found is None:
                    self._answer(404, {"error": "not_found", "message": "no such message"})
                else:
                    self._answer(200, found)
            elif path == "/healthz":
                self._answer(200, {"ok": True})
            else:
                self._answer(404, {"error": "not_found", "message": path})

        def _answer(self, status: int, body: Any) -> None:
            data = orjson.dumps(body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Archive
