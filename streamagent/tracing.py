"""Optional OpenTelemetry spans: one trace per run, a span per decision, tool call and model call.

Off unless ``otlp_endpoint`` is set. Off, nothing of OpenTelemetry is imported and every ``span``
call returns one shared no-op context manager: a function call and a ``None`` check per use.

A run's spans come from several processes and no context travels with the events, so the trace is
derived from the run id instead: its trace id and the id of its root span are hashes of the run id.
Every process parents its spans on that root, and the state processor records the root itself (the
run, from request to terminal status) when the run ends, so a trace viewer shows one tree per run.

Model calls follow the GenAI semantic conventions (``gen_ai.*`` attributes, span name
``chat {model}``); they are children of the decision span current on the calling thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from streamagent.config import Settings

log = logging.getLogger(__name__)

_NOOP = contextlib.nullcontext()
_tracer: Any = None  # an opentelemetry Tracer once configured; None: tracing off
_provider: Any = None
# Ids the next span must take (the root span of a run, which has a fixed id); read by _RunIds.
_forced: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("forced_ids", default=None)

AttributeValue = str | bool | int | float


def run_trace_id(run_id: str) -> int:
    """The trace of ``run_id``: 128 bits of its hash, never 0 (an invalid trace id)."""
    return int.from_bytes(hashlib.sha256(f"trace:{run_id}".encode()).digest()[:16], "big") or 1


def run_span_id(run_id: str) -> int:
    """The id of the run's root span, the parent of every other span of the run."""
    return int.from_bytes(hashlib.sha256(f"span:{run_id}".encode()).digest()[:8], "big") or 1


def enabled() -> bool:
    return _tracer is not None


def configure(settings: Settings, service: str, exporter: Any = None) -> bool:
    """Turn tracing on for this process when ``otlp_endpoint`` is set (or an ``exporter`` is given:
    tests pass an in-memory one). False, and nothing imported, when it stays off."""
    global _tracer, _provider
    if not settings.otlp_endpoint and exporter is None:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    except ImportError:
        log.warning("otlp_endpoint is set but OpenTelemetry is not installed (pip install -e '.[tracing]'): no tracing")
        return False

    class _RunIds(RandomIdGenerator):  # type: ignore[misc]
        def generate_span_id(self) -> int:
            forced = _forced.get()
            return forced[1] if forced is not None else int(super().generate_span_id())

        def generate_trace_id(self) -> int:
            forced = _forced.get()
            return forced[0] if forced is not None else int(super().generate_trace_id())

    provider = TracerProvider(
        resource=Resource.create({"service.name": f"streamagent-{service}"}), id_generator=_RunIds()
    )
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Our own provider, not the global one: a library's spans do not land in our traces by accident.
    _provider, _tracer = provider, provider.get_tracer("streamagent")
    log.info("tracing on", extra={"otlp_endpoint": settings.otlp_endpoint or "(in-process exporter)"})
    return True


def shutdown() -> None:
    """Export what is buffered and turn tracing off (processes call it on exit; tests between cases)."""
    global _tracer, _provider
    provider, _tracer, _provider = _provider, None, None
    if provider is not None:
        provider.shutdown()


def _run_context(run_id: str) -> Any:
    from opentelemetry import trace

    parent = trace.SpanContext(
        run_trace_id(run_id),
        run_span_id(run_id),
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def span(name: str, run_id: str | None = None, attributes: Mapping[str, AttributeValue] | None = None) -> Any:
    """A context manager yielding the span (None when tracing is off). With ``run_id`` the span joins
    that run's trace under its root; without, it is a child of the current span (a model call inside
    a decision). An exception escaping it is recorded on the span, which is marked as an error."""
    if _tracer is None:
        return _NOOP
    attrs = dict(attributes or {})
    if run_id is None:
        return _tracer.start_as_current_span(name, attributes=attrs)
    attrs.setdefault("streamagent.run_id", run_id)
    return _tracer.start_as_current_span(name, context=_run_context(run_id), attributes=attrs)


def annotate(current: Any, attributes: Mapping[str, AttributeValue | None]) -> None:
    """Set attributes on a span from ``span`` (nothing when tracing is off); None values are skipped."""
    if current is not None:
        current.set_attributes({k: v for k, v in attributes.items() if v is not None})


def decided(current: Any, decision: Any) -> None:
    """What a decider decided (a ``Decision``, or None: wait for the next event), on its span."""
    if current is None:
        return
    if decision is None:
        current.set_attribute("streamagent.decision.action", "none")
        return
    annotate(
        current,
        {
            "streamagent.decision.action": decision.action.value,
            "streamagent.decision.step": decision.step,
            "streamagent.decision.tool": decision.tool,
            "streamagent.decider": decision.decider,
            "gen_ai.usage.input_tokens": decision.prompt_tokens or None,
            "gen_ai.usage.output_tokens": decision.completion_tokens or None,
            "streamagent.model.cost_usd": decision.cost_usd or None,
        },
    )


def run_ended(run_id: str, status: str, started: datetime, ended: datetime, attributes: Mapping[str, Any]) -> None:
    """Record the root span of a run, with its fixed ids, once it reached a terminal status."""
    if _tracer is None:
        return
    token = _forced.set((run_trace_id(run_id), run_span_id(run_id)))
    try:
        root = _tracer.start_span(
            "run",
            context=_no_parent(),
            attributes={"streamagent.run_id": run_id, "streamagent.run.status": status, **attributes},
            start_time=int(started.timestamp() * 1e9),
        )
    finally:
        _forced.reset(token)
    if status != "completed":
        from opentelemetry.trace import Status, StatusCode

        root.set_status(Status(StatusCode.ERROR, status))
    root.end(end_time=max(int(ended.timestamp() * 1e9), int(started.timestamp() * 1e9)))


def _no_parent() -> Any:
    from opentelemetry.context import Context

    return Context()


@contextlib.contextmanager
def model_call(system: str, model: str, decider: str) -> Iterator[Any]:
    """A GenAI client span around one chat completion (all its retries)."""
    with span(
        f"chat {model}",
        attributes={
            "gen_ai.operation.name": "chat",
            "gen_ai.system": system,
            "gen_ai.request.model": model,
            "gen_ai.request.temperature": 0.0,
            "streamagent.decider": decider,
        },
    ) as current:
        yield current


def model_answered(current: Any, completion: Any, response_model: str | None = None) -> None:
    """The GenAI usage attributes of an answered call."""
    if current is None:
        return
    annotate(
        current,
        {
            "gen_ai.usage.input_tokens": completion.prompt_tokens,
            "gen_ai.usage.output_tokens": completion.completion_tokens,
            "gen_ai.response.model": response_model,
            "streamagent.model.attempts": completion.attempts,
        },
    )
