"""The blocking client: ``LocatorClient``, a thin driver of ``UnaryCall`` and ``StreamRound``."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

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

_CLOSE = object()


class LocatorClient(ClientBase):
    """A blocking client for the visloc ``Locator`` service; thread-safe, one channel.

    ``timeout`` bounds each ``locate``/``info`` call including its retries; in ``locate_many``
    it bounds the wait for the next response while requests are outstanding. Calls that fail
    with UNAVAILABLE are retried with exponential backoff and jitter (``retries`` times, or a
    ``RetryPolicy``); any other failure raises ``LocateError`` at once.

    So that the client does not make an overload worse, retries stay within a ``retry_budget``
    (``RetryBudget``: about 10 % of the successful calls) and an ``AdaptiveThrottle`` refuses
    calls locally (``LocateError`` RESOURCE_EXHAUSTED, "throttled client-side") in proportion to
    how many the service has been refusing. True (the default) gives each client its own with
    the default settings, False turns it off; an instance may be shared between clients.

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
        call = UnaryCall(self._conn)
        with tracing.call(rpc_name(request), self._conn.metadata, self._conn.target) as metadata:
            while True:
                try:
                    return call.succeeded(method(request, timeout=call.next_timeout(), metadata=metadata))
                except grpc.RpcError as err:
                    time.sleep(call.failed(err))

    def locate(self, image: ImageInput, **options: Unpack[LocateOptionArgs]) -> LocateResult:
        """Locate one image (bytes or a path). ``options`` are the fields of ``LocateOptions``
        (``top_k``, ``eps_km``, ``conf_scale_km``, ``conf_threshold``, ``neighbours``,
        ``top_cells``); unset ones take the server's defaults."""
        request, data = self._conn.locate_request(image, dict(options), self._upload_now())
        try:
            response = self._unary(self._stub.Locate, request)
        except LocateError as err:
            if not self._refused_pixels(err, request):
                raise
            response = self._unary(self._stub.Locate, file_request(request, data))
        return LocateResult.from_pb(response)

    def _upload_now(self) -> Upload:
        """How to send images: asks GetInfo for the service's recipe the first time."""
        if self._upload is not None:
            return self._upload
        try:  # one attempt, outside the throttle and the retry budget (not the caller's call)
            info = self._stub.GetInfo(pb.GetInfoRequest(), timeout=self._conn.timeout, metadata=self._conn.metadata)
        except grpc.RpcError as err:
            return self._learned(LocateError.from_rpc(err))
        return self._learned(info)

    def info(self) -> ServiceInfo:
        """What is being served: versions, sizes, option defaults and input limits."""
        return ServiceInfo.from_pb(self._unary(self._stub.GetInfo, pb.GetInfoRequest()))

    def locate_many(
        self,
        images: Iterable[ImageInput | Claimed],
        *,
        concurrency: int = 8,
        ordered: bool = True,
        **options: Unpack[LocateOptionArgs],
    ) -> Iterator[BatchItem]:
        """Locate many images over one ``LocateStream``, at most ``concurrency`` in flight.

        Yields one ``BatchItem`` per input: in input order when ``ordered`` (a slow image holds
        back the ones after it, though they keep being processed), else as they complete. A bad
        image yields an item with ``error`` and the batch goes on; per-image UNAVAILABLE is
        retried. If the stream itself fails with UNAVAILABLE it is reopened and the unanswered
        requests are sent again; any other stream failure raises ``LocateError``. The input
        iterable is consumed lazily. Breaking out of the loop cancels the stream. ``options``:
        as in ``locate``.
        """
        batch = Batch(images, dict(options), self._conn, concurrency=concurrency, ordered=ordered,
                      upload=self._upload_now())  # fmt: skip
        return self._run_batch(batch)

    def _run_batch(self, batch: Batch) -> Iterator[BatchItem]:
        while True:
            stream = StreamRound(batch, self._conn.timeout)
            yield from self._stream_once(stream)
            if stream.error is None:
                return
            time.sleep(batch.after_loss(stream.error))

    def _stream_once(self, stream: StreamRound) -> Generator[BatchItem, None, None]:
        """Run one stream until the batch is done or the stream fails. Responses are read by a
        helper thread into a queue so that this thread can time out, retry on schedule and
        stay interruptible (Ctrl-C) while waiting."""
        with tracing.call("LocateStream", self._conn.metadata, self._conn.target) as metadata:
            requests: queue.Queue[Any] = queue.Queue()
            responses: queue.Queue[Incoming] = queue.Queue()
            call = self._stub.LocateStream(iter(requests.get, _CLOSE), metadata=metadata)
            threading.Thread(target=_read, args=(call, responses), name="visloc-stream-reader", daemon=True).start()
            try:
                while True:
                    for request in stream.requests():
                        requests.put(request)
                    yield from stream.ready()
                    if stream.over():
                        return
                    stream.receive(_next(responses, stream.wait_time()))
            finally:
                requests.put(_CLOSE)
                if not stream.clean:
                    call.cancel()


def _read(call: Iterator[pb.LocateStreamResponse], responses: queue.Queue[Incoming]) -> None:
    """The reader thread: every response, then how the stream ended."""
    try:
        for msg in call:
            responses.put(msg)
    except grpc.RpcError as err:
        responses.put(StreamEnd(LocateError.from_rpc(err)))
    else:
        responses.put(StreamEnd())


def _next(responses: queue.Queue[Incoming], timeout: float | None) -> Incoming:
    try:
        return responses.get(timeout=timeout)
    except queue.Empty:
        return None
