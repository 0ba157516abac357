"""HTTP effects: a request rendered from the effect, sent with one deadline, and the
answer classified as done, refused, not done or in doubt.

Templates take ``{key}`` (the idempotency key), ``{id}`` (the request's id),
``{target}``, ``{attempt}``, ``{payload.FIELD}`` (``a.b`` walks into objects),
``{header.NAME}`` (the request's headers: ``saga_id``...) and ``{vars.NAME}``
(the config's ``[vars]``). In a URL, values from the effect are
percent-encoded and ``vars`` are inserted as they are (a base URL). In a
body, a string that is one placeholder alone keeps the value's JSON type.
``{{`` and ``}}`` are literal braces.

The whole call, connecting included, has one deadline (``timeout_s``). What
went wrong decides the outcome's kind: a failure to connect sent nothing
(:class:`NotDone`); a failure once the request left (a timeout, a reset) may
have taken effect (:class:`InDoubt`). Only the standard library is used, so
``walsaga effects`` needs no extra.
"""

from __future__ import annotations

import http.client
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from participants.effects.model import CallResult, Done, Effect, InDoubt, NotDone, Refused
from walsaga import tracing

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)\}")
_ONLY = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)\}$")
_ROOTS = ("key", "id", "target", "attempt", "payload", "header", "vars")

#: Statuses that mean a business refusal unless a target says otherwise.
DEFAULT_REFUSALS = frozenset({409, 422})
#: Statuses a lookup reads as "certainly not there" unless it says otherwise.
DEFAULT_ABSENT = frozenset({404})

_MAX_BODY = 1 << 20


class TemplateError(ValueError):
    """A template names something the effect does not have."""


def check_template(text: str) -> None:
    """Raise :class:`TemplateError` if `text` uses a name no effect can have."""
    for m in _PLACEHOLDER.finditer(text):
        name = m.group(1)
        if name is not None and name.split(".")[0] not in _ROOTS:
            raise TemplateError(f"unknown placeholder {{{name}}} (use one of {', '.join(_ROOTS)})")


def value_of(name: str, effect: Effect, variables: Mapping[str, str]) -> Any:
    """What placeholder `name` stands for; :class:`TemplateError` when it is missing."""
    head, _, rest = name.partition(".")
    scalar = {
        "key": effect.key,
        "id": effect.id,
        "target": effect.target,
        "attempt": effect.attempts,
    }
    if head in scalar and not rest:
        return scalar[head]
    node: Any
    if head == "payload":
        node = effect.payload
    elif head == "header":
        node = effect.headers
    elif head == "vars":
        node = variables
    else:
        raise TemplateError(f"unknown placeholder {{{name}}}")
    for part in rest.split(".") if rest else ():
        if not isinstance(node, Mapping) or part not in node:
            raise TemplateError(f"effect {effect.key!r} has no {name}")
        node = node[part]
    return node


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def render_text(
    template: str, effect: Effect, variables: Mapping[str, str], *, url: bool = False
) -> str:
    def replace(m: re.Match[str]) -> str:
        token = m.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = m.group(1)
        text = _text(value_of(name, effect, variables))
        if url and not name.startswith("vars."):
            return quote(text, safe="")
        return text

    return _PLACEHOLDER.sub(replace, template)


def render_value(template: Any, effect: Effect, variables: Mapping[str, str]) -> Any:
    """A body template with the effect's values in it (JSON types kept)."""
    if isinstance(template, str):
        only = _ONLY.match(template)
        if only:
            return value_of(only.group(1), effect, variables)
        return render_text(template, effect, variables)
    if isinstance(template, Mapping):
        return {k: render_value(v, effect, variables) for k, v in template.items()}
    if isinstance(template, list):
        return [render_value(v, effect, variables) for v in template]
    return template


@dataclass(frozen=True)
class HttpRequest:
    """A request template: method, URL, headers and (for a body) a JSON template.

    ``body=None`` sends no body; ``body="{payload}"`` sends the payload as it is.
    """

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None

    def __post_init__(self) -> None:
        check_template(self.url)
        for value in self.headers.values():
            check_template(value)
        for text in _strings(self.body):
            check_template(text)

    def render(
        self, effect: Effect, variables: Mapping[str, str]
    ) -> tuple[str, str, dict[str, str], bytes | None]:
        url = render_text(self.url, effect, variables, url=True)
        headers = {k: render_text(v, effect, variables) for k, v in self.headers.items()}
        body = None
        if self.body is not None:
            body = orjson.dumps(render_value(self.body, effect, variables))
            headers.setdefault("Content-Type", "application/json")
        return self.method.upper(), url, headers, body


def _strings(template: Any) -> list[str]:
    if isinstance(template, str):
        return [template]
    if isinstance(template, Mapping):
        return [s for v in template.values() for s in _strings(v)]
    if isinstance(template, list):
        return [s for v in template for s in _strings(v)]
    return []


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        if not self.body.strip():
            return None
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return self.body.decode("utf-8", "replace")

    def describe(self) -> str:
        text = self.body.decode("utf-8", "replace").strip().replace("\n", " ")
        return f"HTTP {self.status}" + (f": {text[:300]}" if text else "")


class NotSentError(Exception):
    """Nothing reached the server (DNS, refused, connect timeout, TLS handshake)."""


class SentError(Exception):
    """The request left, and no complete answer came back."""


def send(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    *,
    timeout_s: float,
) -> Answer:
    """One HTTP exchange, connecting included, within `timeout_s` in all."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotSentError(f"not an http(s) URL: {url!r}")
    deadline = time.monotonic() + timeout_s
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=timeout_s)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        try:
            conn.connect()
        except OSError as e:
            raise NotSentError(f"cannot connect to {parts.netloc}: {e}") from e
        try:
            _remaining(conn, deadline)
            conn.request(method, path, body=body, headers=dict(headers))
            _remaining(conn, deadline)
            response = conn.getresponse()
            chunks: list[bytes] = []
            size = 0
            while True:
                _remaining(conn, deadline)
                chunk = response.read(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size <= _MAX_BODY:
                    chunks.append(chunk)
            if response.length:
                # http.client ends a body cut short (a server that died while
                # answering) without an error: a lookup would read "found
                # nothing" into half an answer, and call again.
                raise SentError(f"the answer broke off after {size} bytes of its body")
            return Answer(response.status, b"".join(chunks), dict(response.getheaders()))
        except TimeoutError as e:
            raise SentError(f"no answer within {timeout_s:g}s") from e
        except (OSError, http.client.HTTPException) as e:
            raise SentError(f"{type(e).__name__}: {e}") from e
    finally:
        conn.close()


def _remaining(conn: http.client.HTTPConnection, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    if conn.sock is not None:
        conn.sock.settimeout(left)


def _retry_after(answer: Answer) -> float | None:
    raw = next((v for k, v in answer.headers.items() if k.lower() == "retry-after"), None)
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def classify(
    answer: Answer, *, done: frozenset[int] = frozenset(), refusals: frozenset[int]
) -> CallResult:
    """What an HTTP answer to a call means (`done`: statuses that count as done
    besides 2xx, e.g. 404 for a delete)."""
    status = answer.status
    if 200 <= status < 300 or status in done:
        return Done(answer.json())
    if status in refusals:
        return Refused(_reason(answer), code=f"HTTP {status}")
    if status in (408, 429):
        return NotDone(answer.describe(), retry_after_s=_retry_after(answer), answered=True)
    if status == 504:  # a gateway gave up waiting: the server may still be at it
        return InDoubt(answer.describe(), answered=False)
    if status >= 500:
        return InDoubt(answer.describe(), answered=True)
    return NotDone(answer.describe(), retry_after_s=_retry_after(answer), answered=True)


def _reason(answer: Answer) -> str:
    body = answer.json()
    if isinstance(body, Mapping):
        for name in ("message", "detail", "error", "reason"):
            if isinstance(body.get(name), str) and body[name]:
                return str(body[name])
    return answer.describe()


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


@dataclass(frozen=True)
class HttpCall:
    """A target's call over HTTP (``call(effect, timeout_s)``)."""

    request: HttpRequest
    refusals: frozenset[int] = DEFAULT_REFUSALS
    done: frozenset[int] = frozenset()
    #: Header carrying the idempotency key, for providers that deduplicate by one.
    idempotency_header: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, effect: Effect, timeout_s: float) -> CallResult:
        try:
            method, url, headers, body = self.request.render(effect, self.variables)
        except TemplateError as e:
            return NotDone(f"cannot build the request: {e}")
        if self.idempotency_header:
            headers[self.idempotency_header] = effect.key
        propagate_trace(effect, headers)
        try:
            answer = send(method, url, headers, body, timeout_s=timeout_s)
        except NotSentError as e:
            return NotDone(str(e))
        except SentError as e:
            return InDoubt(str(e), answered=False)
        return classify(answer, done=self.done, refusals=self.refusals)


def propagate_trace(effect: Effect, headers: dict[str, str]) -> None:
    """The effect's trace context as W3C headers of the request, unless the
    template sets them: the provider's spans join the saga's trace."""
    present = {name.lower() for name in headers}
    for name in (tracing.TRACEPARENT, tracing.TRACESTATE):
        if name in effect.headers and name not in present:
            headers[name] = effect.headers[name]


@dataclass(frozen=True)
class HttpLookup:
    """A lookup over HTTP: 2xx with something in it is found (that is the result),
    an ``absent`` status (or an empty 2xx) is certainly not there."""

    request: HttpRequest
    absent: frozenset[int] = DEFAULT_ABSENT
    variables: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, effect: Effect, timeout_s: float) -> CallResult:
        try:
            method, url, headers, body = self.request.render(effect, self.variables)
        except TemplateError as e:
            return InDoubt(f"cannot build the lookup: {e}", answered=True)
        propagate_trace(effect, headers)
        try:
            answer = send(method, url, headers, body, timeout_s=timeout_s)
        except (NotSentError, SentError) as e:
            return InDoubt(str(e), answered=True)
        if answer.status in self.absent:
            return NotDone(answer.describe(), answered=True)
        if 200 <= answer.status < 300:
            found = answer.json()
            if _empty(found):
                return NotDone("the lookup found nothing", answered=True)
            if isinstance(found, list):
                found = found[0]
            return Done(found)
        return InDoubt(answer.describe(), answered=True)
