"""Tracing in process: which OTEL_* settings turn it on, the client's span and propagation, and
the service's span tree (interceptors, data plane, batcher) on real gRPC over loopback with a
fake inference and the SDK's in-memory exporter. The live stack is tests/test_tracing_live.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from contextlib import asynccontextmanager

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_dataplane import FakeInference, grey, tiny_bundle  # noqa: F401 - the fixture

from swc_service import tracing
from swc_service.bundle import load_bundle
from swc_service.config import Settings
from swc_service.errors import Unavailable
from swc_service.interceptors import AuthInterceptor, MemoryDoor, StatusInterceptor, TracingInterceptor
from swc_service.locator import Locator
from swc_service.server import SERVICE_NAME
from swc_service.servicer import LocatorServicer
from visloc_client import tracing as client_tracing
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CALLER = [("traceparent", f"00-{TRACE}-{PARENT}-01")]  # a caller's sampled span


@pytest.mark.parametrize(
    ("env", "wanted"),
    [
        ({}, None),  # off unless an exporter is configured
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, None),
    ],
)
def test_tracing_is_on_only_when_an_exporter_is_configured(env, wanted):
    assert client_tracing.exporter_wanted(env) == wanted
    assert client_tracing.check(env) == wanted


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin is not supported"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "'http/json' is not supported"),
    ],
)
def test_settings_that_cannot_be_honoured_are_refused_in_one_line(env, message):
    with pytest.raises(client_tracing.TracingConfigError, match=message):
        client_tracing.check(env)


def test_the_service_refuses_to_start_with_a_bad_tracing_variable(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "zipkin"}
    out = subprocess.run(
        [sys.executable, "-m", "swc_service.server", "--bundle", str(tmp_path), "--quiet-settings", "true"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "swc-service: tracing: OTEL_TRACES_EXPORTER='zipkin': zipkin is not supported" in out.stderr


def test_client_call_propagates_the_current_trace_and_keeps_the_metadata():
    parent = trace.NonRecordingSpan(
        trace.SpanContext(int(TRACE, 16), int(PARENT, 16), is_remote=False, trace_flags=trace.TraceFlags(1))
    )
    with trace.use_span(parent), client_tracing.call("Locate", (("authorization", "Bearer t"),)) as metadata:
        sent = dict(metadata)
    assert sent["authorization"] == "Bearer t"
    version, trace_id, _, flags = sent["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE, "01")
    with client_tracing.call("Locate", ()) as metadata:  # no trace open, no SDK: nothing added
        assert metadata == ()


@pytest.fixture
def spans():
    """Tracing on for the service's modules, into an in-memory exporter (no global provider)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing._tracer = provider.get_tracer("swc_service")
    try:
        yield exporter
    finally:
        tracing._tracer = None
        provider.shutdown()


@asynccontextmanager
async def traced_server(bundle, fake, **settings):
    """The server's interceptor chain with tracing on (the order of swc_service.server.serve)."""
    settings = {"batch_window_ms": 1.0, **settings}
    locator = Locator(Settings(bundle=str(bundle), **settings), load_bundle(bundle), fake)
    server = grpc.aio.server(
        interceptors=[
            TracingInterceptor(SERVICE_NAME),
            MemoryDoor(SERVICE_NAME, locator.memory, None),
            StatusInterceptor(SERVICE_NAME),
            AuthInterceptor(SERVICE_NAME, None),
        ]
    )
    pb_grpc.add_LocatorServicer_to_server(LocatorServicer(locator), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.LocatorStub(channel)
    finally:
        await server.stop(None)
        await locator.close()


def by_name(exporter) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in exporter.get_finished_spans():
        out.setdefault(s.name, []).append(s)
    return out


def test_a_locate_is_a_server_span_with_a_child_per_stage(tiny_bundle, spans):  # noqa: F811
    async def go():
        async with traced_server(tiny_bundle, FakeInference()) as stub:
            return await stub.Locate(
                pb.LocateRequest(image=grey(1)), metadata=[("traceparent", f"00-{TRACE}-{PARENT}-01")]
            )

    reply = asyncio.run(go())
    assert reply.request_id == TRACE
    named = by_name(spans)
    (server,) = named["visloc.v1.Locator/Locate"]
    assert format(server.parent.span_id, "016x") == PARENT and server.kind == trace.SpanKind.SERVER
    assert server.attributes["rpc.grpc.status_code"] == 0 and server.attributes["visloc.request_id"] == TRACE
    children = {s.name for s in spans.get_finished_spans() if s.parent and s.parent.span_id == server.context.span_id}
    expected = {"visloc.memory_door", "visloc.admission", "visloc.decode", "visloc.batch_wait", "visloc.triton"}
    assert children == expected | {"visloc.swc_pd"}
    (call,) = named["visloc.triton"]
    (wait,) = named["visloc.batch_wait"]
    assert [link.context.span_id for link in call.links] == [server.context.span_id]
    assert [link.context.span_id for link in wait.links] == [call.context.span_id]
    assert wait.end_time <= call.end_time and call.attributes["visloc.batch.size"] == 1


def test_failures_set_the_status_code_and_errors_only_for_server_faults(tiny_bundle, spans):  # noqa: F811
    fake = FakeInference()

    async def go():
        async with traced_server(tiny_bundle, fake) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.Locate(pb.LocateRequest(image=b"not an image"))
            fake.fail = Unavailable("Triton is gone")
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await stub.Locate(pb.LocateRequest(image=grey(2)))
            return bad.value.code(), down.value.code()

    assert asyncio.run(go()) == (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE)
    invalid, unavailable = by_name(spans)["visloc.v1.Locator/Locate"]
    assert invalid.attributes["rpc.grpc.status_code"] == 3 and invalid.status.is_unset  # the caller's fault
    assert unavailable.attributes["rpc.grpc.status_code"] == 14
    assert unavailable.status.status_code == trace.StatusCode.ERROR
    (call,) = by_name(spans)["visloc.triton"]
    assert call.status.status_code == trace.StatusCode.ERROR  # the Triton request that failed


def test_a_streams_images_link_to_the_triton_request_they_share(tiny_bundle, spans):  # noqa: F811
    async def go():
        async with traced_server(tiny_bundle, FakeInference(), batch_window_ms=300.0) as stub:
            return [r async for r in stub.LocateStream(iter([pb.LocateRequest(image=grey(v)) for v in (1, 2, 3)]))]

    replies = asyncio.run(go())
    trace_id = format(by_name(spans)["visloc.v1.Locator/LocateStream"][0].context.trace_id, "032x")
    assert sorted(r.request_id for r in replies) == [f"{trace_id}-{i}" for i in range(3)]
    images = by_name(spans)["visloc.image"]
    (call,) = by_name(spans)["visloc.triton"]
    assert sorted(link.context.span_id for link in call.links) == sorted(s.context.span_id for s in images)
    assert call.attributes["visloc.batch.size"] == 3
    assert call.parent.span_id == call.links[0].context.span_id  # a child of the first image
    for wait in by_name(spans)["visloc.batch_wait"]:
        assert [link.context.span_id for link in wait.links] == [call.context.span_id]


def test_tracing_off_makes_no_spans_and_random_request_ids(tiny_bundle):  # noqa: F811
    assert not tracing.enabled()

    async def go():
        async with traced_server(tiny_bundle, FakeInference()) as stub:
            return await stub.Locate(
                pb.LocateRequest(image=grey(1)), metadata=[("traceparent", f"00-{TRACE}-{PARENT}-01")]
            )

    reply = asyncio.run(go())
    assert reply.request_id != TRACE and len(reply.request_id) == 32  # a caller's traceparent is not read
    assert tracing.headers() is None and tracing.exemplar() is None
