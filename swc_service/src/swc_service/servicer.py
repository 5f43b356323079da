"""The gRPC servicer: thin. Request ids and deadlines in, data plane called, stream items
answered one by one (each failure classified like a whole call's)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc

from . import metrics, tracing
from .callers import ANONYMOUS, current_caller
from .errors import DeadlineExceeded, classify
from .locator import Locator
from .wire import Received, read_locate_request

log = logging.getLogger("swc_service")


def assign_request_id(request: pb.LocateRequest, index: int | None = None) -> str:
    """The one place request ids are made: the caller's, or one written into the request (so the
    reply, the access log and a failed stream item all carry it): the trace id while tracing
    (``<trace id>-<index>`` for a stream's image), so logs, replies and traces meet on one id;
    a fresh random one otherwise."""
    if not request.request_id:
        trace_id = tracing.trace_id()
        if not trace_id:
            request.request_id = uuid.uuid4().hex
        else:
            request.request_id = trace_id if index is None else f"{trace_id}-{index}"
    tracing.annotate({"visloc.request_id": request.request_id})
    return request.request_id


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def caller_name() -> str:
    """The caller the auth interceptor named for this RPC ("anonymous" without one)."""
    return current_caller.get() or ANONYMOUS


def received(request: Received | pb.LocateRequest) -> Received:
    """A request as the service's deserializer gives it (an in-process caller's too)."""
    return request if isinstance(request, Received) else Received.of(request)


async def locate_within(
    locator: Locator,
    call: Received,
    deadline: float | None,
    caller: str = ANONYMOUS,
    index: int | None = None,
) -> pb.LocateResponse:
    """One image for ``caller``, bounded by its deadline; counts the image and its outcome.
    ``index``: its place in a stream."""
    request = call.request
    assign_request_id(request, index)
    metrics.IN_FLIGHT.inc()
    code = grpc.StatusCode.OK
    try:
        if deadline is None:
            return await locator.locate(request, None, caller, call.image)
        try:
            async with asyncio.timeout_at(deadline):
                return await locator.locate(request, deadline, caller, call.image)
        except TimeoutError as exc:
            raise DeadlineExceeded("the deadline passed before the image was located") from exc
    except (Exception, asyncio.CancelledError) as exc:
        code, _ = classify(exc)
        raise
    finally:
        metrics.IN_FLIGHT.dec()
        metrics.IMAGES.labels(code.name).inc()


class LocatorServicer(pb_grpc.LocatorServicer):
    def __init__(self, locator: Locator, stream_in_flight: int = 64):
        self.locator = locator
        self.stream_in_flight = stream_in_flight

    async def Locate(
        self, request: Received | pb.LocateRequest, context: grpc.aio.ServicerContext
    ) -> pb.LocateResponse:
        return await locate_within(self.locator, received(request), deadline_of(context), caller_name())

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetInfoResponse:
        return self.locator.info()

    async def LocateStream(
        self, request_iterator: AsyncIterator[Received | pb.LocateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LocateStreamResponse]:
        """Up to ``stream_in_flight`` images at once; answers as they complete, errors per image."""
        deadline = deadline_of(context)
        caller = caller_name()
        out: asyncio.Queue[pb.LocateStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.stream_in_flight)
        tasks: set[asyncio.Task] = set()

        async def one(index: int, call: Received) -> None:
            request = call.request
            try:
                with tracing.span("visloc.image", {"visloc.stream.index": index}):
                    result = await locate_within(self.locator, call, deadline, caller, index)
                await out.put(pb.LocateStreamResponse(request_id=result.request_id, index=index, result=result))
            except Exception as exc:  # a failure answers this image, not the whole stream
                code, message = classify(exc, request.request_id)
                if code is grpc.StatusCode.INTERNAL:
                    log.error("LocateStream item %d failed", index, exc_info=exc)
                err = pb.Error(code=code.value[0], message=message)
                await out.put(pb.LocateStreamResponse(request_id=request.request_id, index=index, error=err))
            finally:
                slots.release()

        async def read() -> None:
            index = 0
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(one(index, received(request)))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    index += 1
                if tasks:
                    await asyncio.gather(*list(tasks))
            finally:
                await out.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await out.get()) is not None:
                yield item
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()


def add_to_server(servicer: LocatorServicer, server: grpc.aio.Server) -> None:
    """Register the Locator service as the generated code would, except that Locate and
    LocateStream read their requests with :func:`~swc_service.wire.read_locate_request` (the
    image stays where gRPC received it)."""
    handlers = {
        "Locate": grpc.unary_unary_rpc_method_handler(
            servicer.Locate,
            request_deserializer=read_locate_request,
            response_serializer=pb.LocateResponse.SerializeToString,
        ),
        "LocateStream": grpc.stream_stream_rpc_method_handler(
            servicer.LocateStream,
            request_deserializer=read_locate_request,
            response_serializer=pb.LocateStreamResponse.SerializeToString,
        ),
        "GetInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetInfo,
            request_deserializer=pb.GetInfoRequest.FromString,
            response_serializer=pb.GetInfoResponse.SerializeToString,
        ),
    }
    missing = set(pb.DESCRIPTOR.services_by_name["Locator"].methods_by_name) - set(handlers)
    if missing:  # a method added to the proto must be registered here too
        raise RuntimeError(f"Locator methods without a handler: {sorted(missing)}")
    name = pb.DESCRIPTOR.services_by_name["Locator"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
