"""The gRPC servicer: thin. Deadlines in, data plane called, stream items answered one by one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc

from . import metrics
from .errors import DeadlineExceeded, LocateFailure
from .locator import Locator

log = logging.getLogger("swc_service")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def locate_within(locator: Locator, request: pb.LocateRequest, deadline: float | None) -> pb.LocateResponse:
    """One image, bounded by the caller's deadline; counts the image and its outcome."""
    metrics.IN_FLIGHT.inc()
    code = grpc.StatusCode.OK
    try:
        if deadline is None:
            return await locator.locate(request, None)
        try:
            async with asyncio.timeout_at(deadline):
                return await locator.locate(request, deadline)
        except TimeoutError as exc:
            raise DeadlineExceeded("the deadline passed before the image was located") from exc
    except LocateFailure as exc:
        code = exc.code
        raise
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception:
        code = grpc.StatusCode.INTERNAL
        raise
    finally:
        metrics.IN_FLIGHT.dec()
        metrics.IMAGES.labels(code.name).inc()


class LocatorServicer(pb_grpc.LocatorServicer):
    def __init__(self, locator: Locator, stream_in_flight: int = 64):
        self.locator = locator
        self.stream_in_flight = stream_in_flight

    async def Locate(self, request: pb.LocateRequest, context: grpc.aio.ServicerContext) -> pb.LocateResponse:
        return await locate_within(self.locator, request, deadline_of(context))

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetInfoResponse:
        return self.locator.info()

    async def LocateStream(
        self, request_iterator: AsyncIterator[pb.LocateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LocateStreamResponse]:
        """Up to ``stream_in_flight`` images at once; answers as they complete, errors per image."""
        deadline = deadline_of(context)
        out: asyncio.Queue[pb.LocateStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.stream_in_flight)
        tasks: set[asyncio.Task] = set()

        async def one(index: int, request: pb.LocateRequest) -> None:
            try:
                result = await locate_within(self.locator, request, deadline)
                await out.put(pb.LocateStreamResponse(request_id=result.request_id, index=index, result=result))
            except LocateFailure as exc:
                err = pb.Error(code=exc.code.value[0], message=str(exc))
                await out.put(pb.LocateStreamResponse(request_id=request.request_id, index=index, error=err))
            except Exception:  # an unexpected bug answers this image, not the whole stream
                log.exception("LocateStream item %d failed", index)
                err = pb.Error(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")
                await out.put(pb.LocateStreamResponse(request_id=request.request_id, index=index, error=err))
            finally:
                slots.release()

        async def read() -> None:
            index = 0
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(one(index, request))
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
