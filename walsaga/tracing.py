"""W3C trace context across a saga's hops, exported through OpenTelemetry when installed.

A ``traceparent`` (``00-<trace id>-<span id>-<flags>``) and its ``tracestate``
travel as Kafka headers like any other: taken from an HTTP request, passed to
``walsaga.publish`` or set per transaction for capture triggers
(``walsaga.traceparent``, ``walsaga.tracestate``), carried by the relay. Each
hop that handles a message continues the trace: same trace id, a span of its
own, whose id goes out in the traceparent of everything the hop writes.

With the ``otel`` extra (OpenTelemetry's API and SDK) and a tracer provider
configured by the application, each hop is a real span, a child of the span
that sent the message, exported like the application's other spans. Without
it, span ids are random and nothing else changes.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: Per-transaction settings a capture trigger (and walsaga.publish) reads.
TRACEPARENT_SETTING = "walsaga.traceparent"
TRACESTATE_SETTING = "walsaga.tracestate"

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_INVALID_TRACE = "0" * 32
_INVALID_SPAN = "0" * 16


@dataclass(frozen=True)
class TraceContext:
    """One span's place in a trace, as a traceparent says it."""

    trace_id: str
    span_id: str
    flags: str = "01"
    state: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def headers(self) -> dict[str, str]:
        """The headers that carry this context to the next hop."""
        found = {TRACEPARENT: self.traceparent}
        if self.state:
            found[TRACESTATE] = self.state
        return found


def parse(traceparent: str | None, tracestate: str | None = None) -> TraceContext | None:
    """The context a traceparent names; None when absent or malformed (a new trace starts)."""
    if not traceparent:
        return None
    found = _TRACEPARENT.match(traceparent.strip().lower())
    if found is None:
        return None
    version, trace_id, span_id, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == _INVALID_TRACE or span_id == _INVALID_SPAN:
        return None
    return TraceContext(trace_id, span_id, flags, tracestate or None)


def from_headers(headers: Mapping[str, str]) -> TraceContext | None:
    return parse(headers.get(TRACEPARENT), headers.get(TRACESTATE))


def new_span(parent: TraceContext | None) -> TraceContext:
    """A span of its own in `parent`'s trace (or in a new trace), with random ids."""
    if parent is None:
        return TraceContext(secrets.token_hex(16), secrets.token_hex(8))
    return TraceContext(parent.trace_id, secrets.token_hex(8), parent.flags, parent.state)


#: OpenTelemetry's ``trace`` module once imported, False when it is not installed.
_otel: Any = None
#: walsaga's tracer, once the application has configured a tracer provider.
_walsaga_tracer: Any = None


def _tracer() -> Any:
    """walsaga's tracer; None while no tracer provider is configured (the API
    alone records nothing, and a hop then costs only its random ids)."""
    global _otel, _walsaga_tracer
    if _walsaga_tracer is not None:
        return _walsaga_tracer
    if _otel is None:
        try:
            from opentelemetry import trace
        except ImportError:
            _otel = False
        else:
            _otel = trace
    if _otel is False:
        return None
    provider = _otel.get_tracer_provider()
    if isinstance(provider, (_otel.ProxyTracerProvider, _otel.NoOpTracerProvider)):
        return None  # asked again next time: the application may set one later
    _walsaga_tracer = provider.get_tracer("walsaga")
    return _walsaga_tracer


@contextlib.contextmanager
def span(
    name: str,
    parent: TraceContext | None,
    *,
    kind: str = "consumer",
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[TraceContext]:
    """A hop: yields the context to send on, exported as an OpenTelemetry span when possible.

    `kind` is ``consumer``, ``producer``, ``server`` or ``internal``.
    """
    tracer = _tracer()
    if tracer is None:
        yield new_span(parent)
        return
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

    context = None
    if parent is not None:
        remote = SpanContext(
            trace_id=int(parent.trace_id, 16),
            span_id=int(parent.span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(int(parent.flags, 16)),
        )
        context = trace.set_span_in_context(NonRecordingSpan(remote))
    with tracer.start_as_current_span(
        name,
        context=context,
        kind=SpanKind[kind.upper()],
        attributes=dict(attributes or {}),
        record_exception=True,
    ) as current:
        ids = current.get_span_context()
        if not current.is_recording() or not ids.is_valid:
            # The API without an SDK (its span has the parent's ids, or none), or
            # a span sampled out: the hop still gets a span id of its own.
            yield new_span(parent)
            return
        yield TraceContext(
            f"{ids.trace_id:032x}",
            f"{ids.span_id:016x}",
            f"{int(ids.trace_flags):02x}",
            parent.state if parent is not None else None,
        )
