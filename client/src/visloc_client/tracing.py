"""OpenTelemetry for the caller's side, and the one ``OTEL_*`` reading the service shares.

The library depends on nothing here: without the ``tracing`` extra (the OpenTelemetry API),
:func:`call` hands back the connection's metadata unchanged. With it, every RPC the client makes
is a CLIENT span (a child of whatever span the application has open) and carries its W3C
``traceparent`` to the service, which continues the trace. The library never configures
exporters (that is the application's choice); the ``visloc`` CLI, an application, does so with
:func:`configure` when the standard ``OTEL_*`` variables ask for it, as the service does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

EXTRA_HINT = "pip install 'visloc-client[tracing]'"
_TRUE = ("true", "1", "yes", "on")

try:  # the API only: a library must not pick exporters for its application
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - exercised by the packaging test (no extra installed)
    trace = None  # type: ignore[assignment]
    propagate = None  # type: ignore[assignment]

Metadata = tuple[tuple[str, str], ...]


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something this process cannot do (one line, for a user)."""


def exporter_wanted(env: Mapping[str, str] | None = None) -> str | None:
    """The span exporter the standard variables configure: "otlp", "console", or None (off).

    Off unless one is configured: ``OTEL_TRACES_EXPORTER`` names it (``none`` turns it off),
    or an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_ENDPOINT``); ``OTEL_SDK_DISABLED=true`` wins over both. (The SDK's own
    default exporter is OTLP to localhost; a server that exports to nowhere by default would
    fill its log with connection errors.)"""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return None
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        names = [n.strip() for n in named.split(",") if n.strip()]
        unknown = [n for n in names if n not in ("otlp", "console", "none")]
        if unknown:
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER={named!r}: {', '.join(unknown)} is not supported (otlp, console or none)"
            )
        if names == ["none"] or not names:
            return None
        return "otlp" if "otlp" in names else "console"
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return "otlp"
    return None


def _otlp_exporter_class(env: Mapping[str, str]) -> Any:
    """The OTLP span exporter of the configured protocol (grpc by default, or http/protobuf);
    endpoint, headers, TLS and timeout come from the standard variables, read by the exporter."""
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    protocol = protocol.strip().lower()
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            raise TracingConfigError(f"OTLP protocol {protocol!r} is not supported (grpc or http/protobuf)")
    except ImportError as exc:
        raise TracingConfigError(f"the OTLP {protocol} exporter is not installed ({exc.name}): {EXTRA_HINT}") from exc
    return OTLPSpanExporter


def check(env: Mapping[str, str] | None = None) -> str | None:
    """What :func:`configure` would install ("otlp", "console" or None), or a precise
    :class:`TracingConfigError` now (a bad variable, the extra not installed), installing nothing."""
    env = os.environ if env is None else env
    kind = exporter_wanted(env)
    if kind is None:
        return None
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise TracingConfigError(
            f"OTEL_* variables configure a trace exporter but the OpenTelemetry SDK is not installed ({exc.name}): "
            f"{EXTRA_HINT}"
        ) from exc
    if kind == "otlp":
        _otlp_exporter_class(env)
    return kind


def configure(service_name: str, env: Mapping[str, str] | None = None) -> Any:
    """Install a TracerProvider exporting as the ``OTEL_*`` variables say; returns it (call
    ``shutdown()`` on it at exit to flush), or None when tracing is off.

    The sampler is the SDK's reading of ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``
    (default: parent-based, always on); ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``
    name the resource (``service_name`` when unset); ``OTEL_BSP_*`` tune the batching exporter.
    """
    env = os.environ if env is None else env
    kind = check(env)
    if kind is None:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter = _otlp_exporter_class(env)() if kind == "otlp" else ConsoleSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def available() -> bool:
    """The OpenTelemetry API is installed (the ``tracing`` extra)."""
    return trace is not None


@contextlib.contextmanager
def call(method: str, metadata: Metadata, target: str = "") -> Iterator[Metadata]:
    """One RPC as a CLIENT span (``visloc.v1.Locator/<method>``); yields the metadata to send:
    the connection's, plus ``traceparent`` (and ``tracestate``/``baggage``) when a trace is on."""
    if trace is None:
        yield metadata
        return
    tracer = trace.get_tracer("visloc_client")
    attributes = {"rpc.system": "grpc", "rpc.service": "visloc.v1.Locator", "rpc.method": method}
    if target:
        attributes["server.address"] = target
    # Not made current: a stream's span stays open across the generator's yields, where the
    # caller's code runs in its own context.
    span = tracer.start_span(f"visloc.v1.Locator/{method}", kind=trace.SpanKind.CLIENT, attributes=attributes)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    try:
        yield metadata + tuple(carrier.items())
    except BaseException as exc:
        code = getattr(exc, "code", None)  # grpc.RpcError: a method; LocateError: the StatusCode
        status = code() if callable(code) else code
        if status is not None and hasattr(status, "value"):
            span.set_attribute("rpc.grpc.status_code", status.value[0])
        if not isinstance(exc, GeneratorExit):
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:200]))
        raise
    else:
        span.set_attribute("rpc.grpc.status_code", 0)
    finally:
        span.end()


def trace_id() -> str:
    """The current trace's id (32 hex digits), or "" outside a valid trace."""
    if trace is None:
        return ""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""
