"""One place where failures become gRPC statuses, and where every call is counted and logged."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc

from . import metrics
from .errors import LocateFailure, Unauthenticated

log = logging.getLogger("swc_service.access")


def _method_name(full: str) -> str:
    return full.rsplit("/", 1)[-1]


def check_token(expected: str | None, metadata) -> None:
    """Bearer-token check (constant-time); a no-op when no token is configured."""
    if expected is None:
        return
    presented = ""
    for key, value in metadata or ():
        if key == "authorization":
            presented = value if isinstance(value, str) else value.decode("latin-1")
            break
    scheme, _, token = presented.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthenticated("a valid 'authorization: Bearer <token>' header is required")


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps :class:`LocateFailure` to its status (no stack traces to callers), checks the bearer
    token, counts and logs calls.

    Applies to the Locator service; health and reflection pass through untouched (open).
    """

    def __init__(self, service_prefix: str = "/visloc.v1.Locator/", token: str | None = None):
        self.prefix = service_prefix
        self.token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        method = _method_name(details.method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _finish(self, method: str, code: grpc.StatusCode, started: float, request_id: str, reason: str = "") -> None:
        elapsed = time.perf_counter() - started
        metrics.REQUESTS.labels(method, code.name).inc()
        metrics.REQUEST_SECONDS.labels(method).observe(elapsed)
        entry = {"rpc": method, "request_id": request_id, "code": code.name, "ms": round(elapsed * 1e3, 3)}
        if reason:
            entry["reason"] = reason
        log.info(json.dumps(entry))

    def _wrap_unary(self, method: str, behaviour):
        async def wrapper(request, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            request_id = getattr(request, "request_id", "") or ""
            if hasattr(request, "request_id") and not request_id:
                request_id = request.request_id = uuid.uuid4().hex
            try:
                check_token(self.token, context.invocation_metadata())
                response = await behaviour(request, context)
            except LocateFailure as exc:
                self._finish(method, exc.code, started, request_id, str(exc))
                await context.abort(exc.code, str(exc))
            except (asyncio.CancelledError, grpc.aio.AbortError):
                self._finish(method, grpc.StatusCode.CANCELLED, started, request_id)
                raise
            except Exception:
                log.exception("%s failed (request_id %s)", method, request_id)
                self._finish(method, grpc.StatusCode.INTERNAL, started, request_id, "internal error")
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request_id {request_id})")
            self._finish(method, grpc.StatusCode.OK, started, request_id)
            return response

        return wrapper

    def _wrap_stream(self, method: str, behaviour):
        async def wrapper(request_iterator, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            try:
                check_token(self.token, context.invocation_metadata())
                async for item in behaviour(request_iterator, context):
                    yield item
            except LocateFailure as exc:
                self._finish(method, exc.code, started, "", str(exc))
                await context.abort(exc.code, str(exc))
            except (asyncio.CancelledError, grpc.aio.AbortError):
                self._finish(method, grpc.StatusCode.CANCELLED, started, "")
                raise
            except Exception:
                log.exception("%s failed", method)
                self._finish(method, grpc.StatusCode.INTERNAL, started, "", "internal error")
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            self._finish(method, grpc.StatusCode.OK, started, "")

        return wrapper
