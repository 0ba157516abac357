"""Who may act in the console: the operator token, the session it opens, and CSRF tokens.

Pure, apart from the random secret each console process draws at start. The
console is read-only unless started with an operator token. Logging in with
that token sets a session cookie (HttpOnly, SameSite=Strict) signed with the
process's secret; every action is a POST that needs a valid session *and* a
CSRF token derived from it, rendered into the page's forms, so another site
cannot make an operator's browser act. A restart (or a new token) ends every
session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

SESSION_COOKIE = "walsaga_operator"
#: How long a login lasts.
SESSION_S = 12 * 3600


class RefusedError(Exception):
    """An action that is not allowed; the message says why (shown to the user)."""


@dataclass
class OperatorAuth:
    """The console's operator token (None: read-only) and the sessions it grants."""

    token: str | None
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @property
    def read_only(self) -> bool:
        return self.token is None

    def _sign(self, purpose: str, value: str) -> str:
        key = self.secret + (self.token or "").encode()
        return hmac.new(key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def login(self, token: str, *, now: float | None = None) -> str:
        """The session cookie's value for a right `token`; :class:`RefusedError` otherwise."""
        if self.token is None:
            raise RefusedError(
                "this console is read-only: it was started without an operator token"
            )
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            raise RefusedError("wrong operator token")
        issued = str(int(now if now is not None else time.time()))
        return f"{issued}.{self._sign('session', issued)}"

    def session_ok(self, cookie: str | None, *, now: float | None = None) -> bool:
        if self.token is None or not cookie or "." not in cookie:
            return False
        issued, _, signature = cookie.partition(".")
        if not hmac.compare_digest(signature, self._sign("session", issued)):
            return False
        try:
            age = (now if now is not None else time.time()) - int(issued)
        except ValueError:
            return False
        return 0 <= age <= SESSION_S

    def csrf_token(self, cookie: str) -> str:
        """The CSRF token that goes with session `cookie`."""
        return self._sign("csrf", cookie)

    def check_action(self, cookie: str | None, csrf: str | None) -> None:
        """Allow an action, or say why not (:class:`RefusedError`)."""
        if self.token is None:
            raise RefusedError(
                "this console is read-only: start it with an operator token to repair sagas"
            )
        if not self.session_ok(cookie):
            raise RefusedError("log in with the operator token first")
        assert cookie is not None
        if not csrf:
            raise RefusedError("missing CSRF token: submit the action from the console's own page")
        if not hmac.compare_digest(csrf, self.csrf_token(cookie)):
            raise RefusedError(
                "CSRF token does not match this session: reload the page and try again"
            )
