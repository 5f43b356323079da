"""The service's interceptors, each doing one thing, for the Locator service's methods only
(health and reflection pass through untouched and stay open):

- :class:`StatusInterceptor` (outermost): maps any failure to its status with
  :func:`~swc_service.errors.classify` (no stack traces to callers), counts and logs each call;
- :class:`AuthInterceptor`: names the caller from its bearer token (callers file + shared token,
  swc_service.callers) or refuses with ``Unauthenticated`` (which the status interceptor then
  answers, counts and logs like any other failure); with auth off every call is "anonymous".
  The name goes to the data plane through :data:`~swc_service.callers.current_caller`;
- :class:`TracingInterceptor` (outermost, only while tracing is on): one OpenTelemetry SERVER
  span per call, continuing the caller's trace;
- :class:`MemoryDoor` (outermost but for tracing): unary Locate waits or is refused at the worker's memory
  budget before its message is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import grpc

from . import metrics, tracing
from .callers import ANONYMOUS, current_caller, identify
from .errors import DeadlineExceeded, Overloaded, Unauthenticated, classify

log = logging.getLogger("swc_service.access")

Behaviour = Callable  # a handler's unary_unary or stream_stream function


def caller_of(callers: Mapping[str, str] | None, metadata) -> str:
    """The caller's name from its bearer token (every token compared in constant time);
    "anonymous" when auth is off (``callers`` None); Unauthenticated for anything else."""
    if callers is None:
        return ANONYMOUS
    presented = ""
    for key, value in metadata or ():
        if key == "authorization":
            presented = value if isinstance(value, str) else value.decode("latin-1")
            break
    scheme, _, token = presented.partition(" ")
    name = identify(callers, token.strip()) if scheme.lower() == "bearer" else None
    if name is None:
        raise Unauthenticated("a valid 'authorization: Bearer <token>' header is required")
    return name


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Base: wraps the unary and stream behaviours of one service's methods (by full name,
    taken from the descriptor) with :meth:`unary` and :meth:`stream`."""

    def __init__(self, service: str):
        self.prefix = f"/{service}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        codec = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self.unary(method, handler.unary_unary), **codec)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(self.stream(method, handler.stream_stream), **codec)
        if handler.stream_unary is not None:  # unary Locate behind the memory door
            return grpc.stream_unary_rpc_method_handler(self.stream_unary(method, handler.stream_unary), **codec)
        return handler

    def unary(self, method: str, behaviour: Behaviour) -> Behaviour:
        return behaviour

    def stream_unary(self, method: str, behaviour: Behaviour) -> Behaviour:
        return behaviour

    def stream(self, method: str, behaviour: Behaviour) -> Behaviour:
        return behaviour


class AuthInterceptor(ServiceInterceptor):
    """Names every call's caller (:data:`current_caller`) or refuses it; ``callers`` is
    {token: name} (Settings.callers()), None when auth is off."""

    def __init__(self, service: str, callers: Mapping[str, str] | None):
        super().__init__(service)
        self.callers = None if callers is None else dict(callers)

    def unary(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def wrapper(request, context: grpc.aio.ServicerContext):
            current_caller.set(caller_of(self.callers, context.invocation_metadata()))
            return await behaviour(request, context)

        return wrapper

    def stream(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def wrapper(request_iterator, context: grpc.aio.ServicerContext):
            current_caller.set(caller_of(self.callers, context.invocation_metadata()))
            async for item in behaviour(request_iterator, context):
                yield item

        return wrapper


def access_log(method: str, code: grpc.StatusCode, started: float, request_id: str, reason: str = "") -> None:
    """Count, time and log one finished call (one JSON line on ``swc_service.access``)."""
    elapsed = time.perf_counter() - started
    metrics.REQUESTS.labels(method, code.name).inc()
    metrics.observe_request(method, elapsed, tracing.exemplar())
    entry = {"rpc": method, "request_id": request_id, "code": code.name, "ms": round(elapsed * 1e3, 3)}
    if (trace_id := tracing.trace_id()) and trace_id != request_id:
        entry["trace_id"] = trace_id
    if (caller := current_caller.get()) is not None:  # None: refused before it was named
        entry["caller"] = caller
    if reason:
        entry["reason"] = reason
    log.info(json.dumps(entry))


class StatusInterceptor(ServiceInterceptor):
    """Every failure leaves as the status :func:`classify` gives it; every call is logged once."""

    async def _fail(
        self, method: str, exc: BaseException, context: grpc.aio.ServicerContext, started: float, request_id: str
    ) -> None:
        """Log and answer a failed call; always raises (abort, or the cancellation itself)."""
        if isinstance(exc, grpc.aio.AbortError):  # a handler aborted: its status is already set
            access_log(method, context.code() or grpc.StatusCode.UNKNOWN, started, request_id, context.details() or "")
            raise exc
        code, message = classify(exc, request_id)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed (request_id %s)", method, request_id, exc_info=exc)
        access_log(method, code, started, request_id, message if code is not grpc.StatusCode.CANCELLED else "")
        if code is grpc.StatusCode.CANCELLED:
            raise exc
        await context.abort(code, message)

    def unary(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def wrapper(request, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            try:
                response = await behaviour(request, context)
            except (Exception, asyncio.CancelledError) as exc:
                await self._fail(method, exc, context, started, getattr(request, "request_id", ""))
            access_log(method, grpc.StatusCode.OK, started, getattr(request, "request_id", ""))
            return response

        return wrapper

    def stream(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def wrapper(request_iterator, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            try:
                async for item in behaviour(request_iterator, context):
                    yield item
            except (Exception, asyncio.CancelledError) as exc:
                await self._fail(method, exc, context, started, "")
            access_log(method, grpc.StatusCode.OK, started, "")

        return wrapper


class MemoryDoor(grpc.aio.ServerInterceptor):
    """The worker's memory budget at the door of unary ``Locate``, before gRPC reads the message.

    gRPC receives a unary call's whole message before any handler runs, so a burst of large
    photos would be in memory before the budget could refuse one. The door serves ``Locate``
    as a client-streaming method instead (the same call on the wire), which lets it wait or
    refuse (:meth:`~swc_service.memory.MemoryBudget.enter`) before asking for the message; a
    refused call's message stays on the caller's side (HTTP/2 flow control). Outermost: a
    refusal here is answered, counted and logged here; the rest of the call goes through the
    other interceptors as before. Streams are bounded by their in-flight window instead.
    """

    def __init__(self, service: str, budget, callers: Mapping[str, str] | None):
        self.method = f"/{service}/Locate"
        self.budget = budget
        self.callers = None if callers is None else dict(callers)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method != self.method or handler.unary_unary is None or not self.budget.limit:
            return handler
        inner = handler.unary_unary
        budget = self.budget

        async def behaviour(request_iterator, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            try:
                with tracing.span("visloc.memory_door"):
                    await budget.enter(self._caller(context), deadline)
            except (Overloaded, DeadlineExceeded) as exc:
                code, message = classify(exc)
                access_log("Locate", code, started, "", message)
                await context.abort(code, message)
            try:
                request = await request_iterator.__anext__()
            except StopAsyncIteration:
                request = None
            finally:
                budget.read()
            if request is None:
                access_log("Locate", grpc.StatusCode.INVALID_ARGUMENT, started, "", "no request message")
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
            return await inner(request, context)

        codec = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(behaviour, **codec)

    def _caller(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's name for the shed metric (the auth interceptor decides on the call itself)."""
        try:
            return caller_of(self.callers, context.invocation_metadata())
        except Unauthenticated:
            return "unauthenticated"


# Server-side failures (OpenTelemetry's gRPC conventions): the others are the caller's.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _end_span(span, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
    """The call's gRPC status on its span (every failure reaches here as an abort or a cancellation)."""
    if span is None:
        return
    if exc is None:
        code = grpc.StatusCode.OK
    elif isinstance(exc, asyncio.CancelledError):
        code = grpc.StatusCode.CANCELLED
    else:
        code = context.code() or grpc.StatusCode.UNKNOWN
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERRORS:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {context.details() or ''}"[:500]))


class TracingInterceptor(ServiceInterceptor):
    """One SERVER span per Locator call, around everything else (the memory door's wait too),
    continuing the caller's ``traceparent``; its children are made by the data plane. Added only
    while tracing is on (:func:`swc_service.tracing.enabled`)."""

    def unary(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def wrapper(request, context: grpc.aio.ServicerContext):
            with tracing.server_span(method, context.invocation_metadata(), context.peer()) as span:
                try:
                    response = await behaviour(request, context)
                except BaseException as exc:
                    _end_span(span, context, exc)
                    raise
                _end_span(span, context, None)
                return response

        return wrapper

    stream_unary = unary  # the same, with the request iterator for a request

    def stream(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def wrapper(request_iterator, context: grpc.aio.ServicerContext):
            with tracing.server_span(method, context.invocation_metadata(), context.peer()) as span:
                try:
                    async for item in behaviour(request_iterator, context):
                        yield item
                except BaseException as exc:
                    _end_span(span, context, exc)
                    raise
                _end_span(span, context, None)

        return wrapper
