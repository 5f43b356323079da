"""The asyncio client: ``AsyncLocatorClient``, the same API as ``LocatorClient`` with ``await``;
a thin driver of the same ``UnaryCall`` and ``StreamRound``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio

from visloc_client import tracing
from visloc_client._common import Claimed, ClientBase, ImageInput, UnaryCall, rpc_name
from visloc_client._stream import Batch, Incoming, StreamEnd, StreamRound
from visloc_client.errors import LocateError
from visloc_client.results import BatchItem, LocateResult, ServiceInfo
from visloc_client.upload import Upload, file_request
from visloc_client.v1 import locator_pb2 as pb

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from visloc_client.results import LocateOptionArgs

T = TypeVar("T")

# What a write on a call that has already failed raises; the reader reports the failure.
_DEAD_CALL = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


class AsyncLocatorClient(ClientBase):
    """An asyncio client for the visloc ``Locator`` service. Create it inside a running event
    loop (grpc.aio binds the channel to it). Same semantics (and constructor arguments,
    ``load_balancing``, ``channel_options``, ``retry_budget`` and ``throttle`` included) as
    ``LocatorClient``; image files are read synchronously (they are small and local)."""

    _channels = grpc.aio

    async def __aenter__(self) -> AsyncLocatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        call = UnaryCall(self._conn)
        with tracing.call(rpc_name(request), self._conn.metadata, self._conn.target) as metadata:
            while True:
                try:
                    return call.succeeded(await method(request, timeout=call.next_timeout(), metadata=metadata))
                except grpc.RpcError as err:
                    await asyncio.sleep(call.failed(err))

    async def locate(self, image: ImageInput, **options: Unpack[LocateOptionArgs]) -> LocateResult:
        """Locate one image (bytes or a path): see ``LocatorClient.locate``. Reading and
        preprocessing run in a thread, off the event loop."""
        upload = await self._upload_now()
        request, data = await asyncio.get_running_loop().run_in_executor(
            None, self._conn.locate_request, image, dict(options), upload
        )
        try:
            response = await self._unary(self._stub.Locate, request)
        except LocateError as err:
            if not self._refused_pixels(err, request):
                raise
            response = await self._unary(self._stub.Locate, file_request(request, data))
        return LocateResult.from_pb(response)

    async def _upload_now(self) -> Upload:
        if self._upload is not None:
            return self._upload
        try:  # one attempt, outside the throttle and the retry budget (not the caller's call)
            call = self._stub.GetInfo(pb.GetInfoRequest(), timeout=self._conn.timeout, metadata=self._conn.metadata)
            info = await call
        except grpc.RpcError as err:
            return self._learned(LocateError.from_rpc(err))
        return self._learned(info)

    async def info(self) -> ServiceInfo:
        return ServiceInfo.from_pb(await self._unary(self._stub.GetInfo, pb.GetInfoRequest()))

    async def locate_many(
        self,
        images: Iterable[ImageInput | Claimed],
        *,
        concurrency: int = 8,
        ordered: bool = True,
        **options: Unpack[LocateOptionArgs],
    ) -> AsyncIterator[BatchItem]:
        """``async for item in client.locate_many(...)``: see ``LocatorClient.locate_many``."""
        batch = Batch(images, dict(options), self._conn, concurrency=concurrency, ordered=ordered,
                      upload=await self._upload_now())  # fmt: skip
        while True:
            stream = StreamRound(batch, self._conn.timeout)
            async for item in self._stream_once(stream):
                yield item
            if stream.error is None:
                return
            await asyncio.sleep(batch.after_loss(stream.error))

    async def _stream_once(self, stream: StreamRound) -> AsyncIterator[BatchItem]:
        """One stream until the batch is done or the stream fails (``stream.error`` says how)."""
        with tracing.call("LocateStream", self._conn.metadata, self._conn.target) as metadata:
            call = self._stub.LocateStream(metadata=metadata)
            responses: asyncio.Queue[Incoming] = asyncio.Queue()
            reader = asyncio.ensure_future(_read(call, responses))
            try:
                while True:
                    for request in stream.requests():
                        with contextlib.suppress(*_DEAD_CALL):
                            await call.write(request)
                    for item in stream.ready():
                        yield item
                    if stream.over():
                        if stream.clean:
                            with contextlib.suppress(*_DEAD_CALL):
                                await call.done_writing()
                        return
                    stream.receive(await _next(responses, stream.wait_time()))
            finally:
                if stream.clean:  # let the server finish the call rather than see it cancelled
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(reader), 1.0)
                call.cancel()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader


async def _read(call: Any, responses: asyncio.Queue[Incoming]) -> None:
    """The reader task: every response, then how the stream ended."""
    try:
        while (msg := await call.read()) is not grpc.aio.EOF:
            responses.put_nowait(msg)
    except grpc.RpcError as err:
        responses.put_nowait(StreamEnd(LocateError.from_rpc(err)))
    else:
        responses.put_nowait(StreamEnd())


async def _next(responses: asyncio.Queue[Incoming], timeout: float | None) -> Incoming:
    try:
        return await asyncio.wait_for(responses.get(), timeout)
    except asyncio.TimeoutError:
        return None
