"""The blocking client: ``LocatorClient``."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, TypeVar

import grpc

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

_CLOSE = object()


class _End:
    """The response stream is over; ``error`` is how it ended (None: cleanly)."""

    def __init__(self, error: grpc.RpcError | None) -> None:
        self.error = error


class LocatorClient(ClientBase):
    """A blocking client for the visloc ``Locator`` service; thread-safe, one channel.

    ``timeout`` bounds each ``locate``/``info`` call including its retries; in ``locate_many``
    it bounds the wait for the next response while requests are outstanding. Calls that fail
    with UNAVAILABLE are retried with exponential backoff and jitter (``retries`` times); any
    other failure raises ``LocateError`` at once.

    ``load_balancing``: None (gRPC's default, ``pick_first``: every call to one address),
    ``"pick_first"``, or ``"round_robin"`` (calls spread over every address the target resolves to, e.g. the pods
    behind a headless Service: ``dns:///swc-service.visloc.svc.cluster.local:50051``).
    ``channel_options``: extra gRPC channel arguments, ``(name, value)`` pairs; one with the
    name of an option the client sets (the message size limits, the user agent) replaces it.
    """

    _channels = grpc

    def __enter__(self) -> LocatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, method: Callable[..., T], request: Any) -> T:
        conn = self._conn
        deadline = conn.deadline()
        attempt = 0
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return method(request, timeout=remaining, metadata=conn.metadata)
            except grpc.RpcError as err:
                delay = conn.retry_delay(err.code(), attempt, deadline)  # type: ignore[attr-defined]
                if delay is None:
                    raise LocateError.from_rpc(err) from err
                time.sleep(delay)
                attempt += 1

    def locate(
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
        response = self._unary(self._stub.Locate, self._conn.locate_request(image, options))
        return LocateResult.from_pb(response)

    def info(self) -> ServiceInfo:
        """What is being served: versions, sizes, option defaults and input limits."""
        return ServiceInfo.from_pb(self._unary(self._stub.GetInfo, pb.GetInfoRequest()))

    def locate_many(
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
    ) -> Iterator[BatchItem]:
        """Locate many images over one ``LocateStream``, at most ``concurrency`` in flight.

        Yields one ``BatchItem`` per input: in input order when ``ordered`` (a slow image holds
        back the ones after it, though they keep being processed), else as they complete. A bad
        image yields an item with ``error`` and the batch goes on; per-image UNAVAILABLE is
        retried. If the stream itself fails with UNAVAILABLE it is reopened and the unanswered
        requests are sent again; any other stream failure raises ``LocateError``. The input
        iterable is consumed lazily. Breaking out of the loop cancels the stream.
        """
        options = make_options(top_k, eps_km, conf_scale_km, conf_threshold, neighbours, top_cells)
        batch = self._conn.batch(images, options, concurrency=concurrency, ordered=ordered)
        return self._run_batch(batch)

    def _run_batch(self, batch: Batch) -> Iterator[BatchItem]:
        failures = 0
        while True:
            progressed, err = yield from self._stream_once(batch)
            if err is None:
                return
            failures = 0 if progressed else failures
            delay = self._conn.retry_delay(err.code, failures, None)
            if delay is None:
                raise err
            batch.on_stream_lost()
            time.sleep(delay)
            failures += 1

    def _stream_once(self, batch: Batch) -> Generator[BatchItem, None, tuple[bool, LocateError | None]]:
        """Run one stream until the batch is done or the stream fails.

        Returns (whether any response arrived, the failure or None). Responses are read by a
        helper thread into a queue so that this thread can time out, retry on schedule and
        stay interruptible (Ctrl-C) while waiting.
        """
        requests: queue.Queue[Any] = queue.Queue()
        responses: queue.Queue[Any] = queue.Queue()

        def request_iter() -> Iterator[pb.LocateRequest]:
            while (item := requests.get()) is not _CLOSE:
                yield item

        call = self._stub.LocateStream(request_iter(), metadata=self._conn.metadata)

        def pump() -> None:
            try:
                for msg in call:
                    responses.put(msg)
            except grpc.RpcError as err:
                responses.put(_End(err))
            else:
                responses.put(_End(None))

        threading.Thread(target=pump, name="visloc-stream-reader", daemon=True).start()
        timeout = self._conn.timeout
        progressed = False
        last = time.monotonic()
        closed = False
        try:
            while True:
                now = time.monotonic()
                for request in batch.requests(now):
                    requests.put(request)
                    last = now
                yield from batch.ready()
                if batch.done():
                    requests.put(_CLOSE)
                    closed = True
                    return progressed, None
                now = time.monotonic()
                if batch.stalled(now, last, timeout):
                    return progressed, stall_error(timeout)
                try:
                    msg = responses.get(timeout=batch.wait_time(now, last, timeout))
                except queue.Empty:
                    continue
                if isinstance(msg, _End):
                    if msg.error is not None:
                        return progressed, LocateError.from_rpc(msg.error)
                    return progressed, unanswered_error(batch)
                progressed = True
                last = time.monotonic()
                batch.on_response(msg, last)
        finally:
            if not closed:
                requests.put(_CLOSE)
                call.cancel()
