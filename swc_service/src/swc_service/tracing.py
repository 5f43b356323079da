"""OpenTelemetry traces of the service: one trace per call, from the caller's span to Triton's.

Off unless the standard ``OTEL_*`` variables configure an exporter
(:func:`visloc_client.tracing.exporter_wanted`); then :func:`start` installs the SDK (the
``tracing`` extra) and every Locator RPC is a SERVER span continuing the caller's W3C
``traceparent`` (:class:`~swc_service.interceptors.TracingInterceptor`), with children for the
stages of each image (:mod:`swc_service.locator`) and one span per Triton request, linked to every
image it carries (:mod:`swc_service.batcher`). Triton receives that span's ``traceparent``, so its
own OpenTelemetry traces join the call's.

Off, each helper is a test of one module global: the data plane calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from visloc_client import tracing as shared

log = logging.getLogger("swc_service")

_tracer: Any = None  # an opentelemetry Tracer while tracing is on
_provider: Any = None
_NULL = contextlib.nullcontext()

SERVICE = "visloc.v1.Locator"


def start(env: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on if the ``OTEL_*`` variables ask for it (raises
    :class:`~visloc_client.tracing.TracingConfigError` when they cannot be honoured)."""
    global _tracer, _provider
    provider = shared.configure("swc-service", env)
    if provider is None:
        return False
    from opentelemetry import trace

    _provider = provider
    _tracer = trace.get_tracer("swc_service")
    log.info("tracing on: %s (sampler %s)", shared.exporter_wanted(env), provider.sampler.get_description())
    return True


def stop() -> None:
    """Export what is buffered and turn tracing off (the server's last step)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


def server_span(method: str, metadata: Sequence[tuple[str, Any]] | None, peer: str = "") -> Any:
    """The SERVER span of one RPC, current for its handler, continuing the caller's trace
    (``traceparent``/``tracestate`` in the metadata, as ``OTEL_PROPAGATORS`` say)."""
    if _tracer is None:
        return _NULL
    from opentelemetry import propagate, trace

    carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
    attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method}
    if peer:
        attributes["network.peer.address"] = peer
    return _tracer.start_as_current_span(
        f"{SERVICE}/{method}",
        context=propagate.extract(carrier),
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,  # the interceptor sets the status from the gRPC code
        set_status_on_exception=False,
    )


def span(name: str, attributes: Mapping[str, Any] | None = None) -> Any:
    """A child span of the current one for a stage (an exception marks it failed)."""
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(name, attributes=attributes)


def record(
    name: str, start_ns: int, end_ns: int, attributes: Mapping[str, Any] | None = None, links: Sequence[Any] = ()
) -> None:
    """A finished child span from instants measured elsewhere (the batch wait, timed by the batcher)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    links = [trace.Link(c) for c in links if c is not None]
    s = _tracer.start_span(name, start_time=start_ns, attributes=attributes, links=links)
    s.end(end_time=max(start_ns, end_ns))


def context() -> Any:
    """The current span's SpanContext (what a batch links to), None when off."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return ctx if ctx.is_valid else None


@contextlib.contextmanager
def triton_call(images: Sequence[Any], model_version: str) -> Iterator[Any]:
    """The span of one Triton request, shared by the ``images`` (their SpanContexts) it carries:
    a child of the first image's span, linked to every image's (``visloc.batch.index``).
    Yields its SpanContext (each image's batch-wait span links back to it), None when off."""
    live = [c for c in images if c is not None]
    if _tracer is None or not live:
        yield None
        return
    from opentelemetry import trace

    links = [trace.Link(c, {"visloc.batch.index": i}) for i, c in enumerate(images) if c is not None]
    attributes = {
        "rpc.system": "grpc",
        "rpc.service": "inference.GRPCInferenceService",
        "rpc.method": "ModelInfer",
        "visloc.batch.size": len(images),
        "visloc.triton.model_version": model_version or "(default)",
    }
    parent = trace.set_span_in_context(trace.NonRecordingSpan(live[0]))
    with _tracer.start_as_current_span(
        "visloc.triton", context=parent, kind=trace.SpanKind.CLIENT, attributes=attributes, links=links
    ) as s:
        yield s.get_span_context()


def annotate(attributes: Mapping[str, Any]) -> None:
    """Attributes on the current span (the Triton endpoint a batch went to, what was predicted)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(dict(attributes))


def headers() -> dict[str, str] | None:
    """The current span's ``traceparent`` (and ``tracestate``) for an outgoing request, None when off."""
    if _tracer is None:
        return None
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def trace_id() -> str:
    """The current trace's id, 32 hex digits ("" when off or outside a trace)."""
    return shared.trace_id() if _tracer is not None else ""


def exemplar() -> dict[str, str] | None:
    """``{"trace_id": ...}`` for a histogram observation of a sampled call (an OpenMetrics exemplar)."""
    ctx = context()
    if ctx is None or not ctx.trace_flags.sampled:
        return None
    return {"trace_id": format(ctx.trace_id, "032x")}


def now_ns() -> int:
    """Wall-clock nanoseconds, the spans' time base."""
    return time.time_ns()
