"""The asyncio client: ``AsyncLocatorClient``, the same API as ``LocatorClient`` with ``await``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
import grpc.aio

from visloc_client._common import (
    Batch,
    ClientBase,
    ImageInput,
    make_options,
    stall_error,
    unanswered_error,
)
from visloc_client.errors import LocateError
from visloc_client.results import BatchItem, LocateResult, ServiceInfo
from visloc_client.v1 import locator_pb2 as pb

T = TypeVar("T")


class _End:
    def __init__(self, error: LocateError | None) -> None:
        self.error = error


class AsyncLocatorClient(ClientBase):
    """An asyncio client for the visloc ``Locator`` service. Create it inside a running event
    loop (grpc.aio binds the channel to it). Same semantics (and constructor arguments,
    ``load_balancing`` and ``channel_options`` included) as ``LocatorClient``; image files
    are read synchronously (they are small and local)."""

    _channels = grpc.aio

    async def __aenter__(self) -> AsyncLocatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        conn = self._conn
        deadline = conn.deadline()
        attempt = 0
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await method(request, timeout=remaining, metadata=conn.metadata)
            except grpc.aio.AioRpcError as err:
                delay = conn.retry_delay(err.code(), attempt, deadline)  # type: ignore[attr-defined]
                if delay is None:
                    raise LocateError.from_rpc(err) from err
                await asyncio.sleep(delay)
                attempt += 1

    async def locate(
        self,
        image: ImageInput,
        *,
        top_k: int | None = None,
        eps_km: float | None = None,
        conf_scale_km: float | None = None,
        conf_threshold: float | None = None,
        neighbours: int = 0,
        top_cells: int = 0,
    ) -> LocateResult:
        """Locate one image (bytes or a path). Unset options take the server's defaults."""
        options = make_options(top_k, eps_km, conf_scale_km, conf_threshold, neighbours, top_cells)
        response = await self._unary(self._stub.Locate, self._conn.locate_request(image, options))
        return LocateResult.from_pb(response)

    async def info(self) -> ServiceInfo:
        return ServiceInfo.from_pb(await self._unary(self._stub.GetInfo, pb.GetInfoRequest()))

    async def locate_many(
        self,
        images: Iterable[ImageInput],
        *,
        concurrency: int = 8,
        ordered: bool = True,
        top_k: int | None = None,
        eps_km: float | None = None,
        conf_scale_km: float | None = None,
        conf_threshold: float | None = None,
        neighbours: int = 0,
        top_cells: int = 0,
    ) -> AsyncIterator[BatchItem]:
        """``async for item in client.locate_many(...)``: see ``LocatorClient.locate_many``."""
        options = make_options(top_k, eps_km, conf_scale_km, conf_threshold, neighbours, top_cells)
        batch = self._conn.batch(images, options, concurrency=concurrency, ordered=ordered)
        failures = 0
        while True:
            outcome: list[Any] = []
            async for item in self._stream_once(batch, outcome):
                yield item
            progressed, err = outcome
            if err is None:
                return
            failures = 0 if progressed else failures
            delay = self._conn.retry_delay(err.code, failures, None)
            if delay is None:
                raise err
            batch.on_stream_lost()
            await asyncio.sleep(delay)
            failures += 1

    async def _stream_once(self, batch: Batch, outcome: list[Any]) -> AsyncIterator[BatchItem]:
        """One stream until the batch is done or the stream fails; appends (progressed, error)
        to ``outcome`` (async generators cannot return values)."""
        call = self._stub.LocateStream(metadata=self._conn.metadata)
        responses: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            try:
                while (msg := await call.read()) is not grpc.aio.EOF:
                    responses.put_nowait(msg)
            except grpc.aio.AioRpcError as err:
                responses.put_nowait(_End(LocateError.from_rpc(err)))
            else:
                responses.put_nowait(_End(None))

        reader = asyncio.ensure_future(pump())
        timeout = self._conn.timeout
        progressed = False
        clean = False
        last = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                for request in batch.requests(now):
                    last = now
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await call.write(request)  # a dead call reports itself to the reader
                for item in batch.ready():
                    yield item
                if batch.done():
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await call.done_writing()
                    clean = True
                    outcome[:] = [progressed, None]
                    return
                now = time.monotonic()
                if batch.stalled(now, last, timeout):
                    outcome[:] = [progressed, stall_error(timeout)]
                    return
                try:
                    msg = await asyncio.wait_for(responses.get(), batch.wait_time(now, last, timeout))
                except asyncio.TimeoutError:
                    continue
                if isinstance(msg, _End):
                    outcome[:] = [progressed, msg.error or unanswered_error(batch)]
                    return
                progressed = True
                last = time.monotonic()
                batch.on_response(msg, last)
        finally:
            if clean:  # let the server finish the call rather than see it cancelled
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reader), 1.0)
            call.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
