"""The ``LocateStream`` side both clients share, I/O-free: ``Batch`` (one ``locate_many``) and
``StreamRound`` (one stream of it). The sync and asyncio drivers only move messages."""

from __future__ import annotations

import dataclasses
import heapq
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from visloc_client._common import Claimed, Connection, ImageInput, check_size, read_image, source_name
from visloc_client.errors import LocateError, status_code
from visloc_client.results import BatchItem, LocateOptions, LocateResult
from visloc_client.upload import Upload, file_request
from visloc_client.v1 import locator_pb2 as pb


@dataclass(frozen=True)
class StreamEnd:
    """What a driver's reader passes on when the response stream is over: ``error`` is how it
    ended (None: cleanly)."""

    error: LocateError | None = None


Incoming = pb.LocateStreamResponse | StreamEnd | None


@dataclass
class _Pending:
    index: int
    source: str | None
    request: pb.LocateRequest
    attempts: int = 0
    data: bytes = b""  # the file, kept while the request carries pixels instead (the fallback)


class Batch:
    """The state of one ``locate_many``: which requests are in flight, which wait for a retry,
    which results wait to be yielded. Drivers feed it responses and stream losses; it never
    blocks and does no network I/O (it reads image files lazily, one slot at a time).

    At most ``concurrency`` images are held at once (in flight or waiting to be retried), so
    memory stays bounded however long the input is. Finished items that cannot be yielded yet
    (``ordered``) are kept; they are small result objects, not images. Each request passes the
    connection's adaptive throttle (refused: the item fails locally with RESOURCE_EXHAUSTED)
    and each answer is accounted in it and in the retry budget.
    """

    def __init__(
        self,
        images: Iterable[ImageInput | Claimed],
        options: dict[str, Any],
        conn: Connection,
        *,
        concurrency: int,
        ordered: bool,
        upload: Upload = Upload(),
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._options = LocateOptions(**options).to_pb()
        self._images: Iterator[tuple[int, ImageInput]] = enumerate(images)
        self._conn = conn
        self._upload = upload
        self._concurrency = concurrency
        self._ordered = ordered
        self._prefix = uuid.uuid4().hex[:12]
        self._exhausted = False
        self._sent: dict[str, _Pending] = {}
        self._resend: list[_Pending] = []
        self._delayed: list[tuple[float, int, _Pending]] = []
        self._finished: dict[int, BatchItem] = {}
        self._next_out = 0
        self._progressed = False  # a response arrived since the stream was last lost
        self._stream_failures = 0  # streams lost in a row without a response

    @property
    def awaiting(self) -> int:
        """Requests written on the current stream and not answered yet."""
        return len(self._sent)

    def _held(self) -> int:
        return len(self._sent) + len(self._resend) + len(self._delayed)

    def _finish(self, pending: _Pending, result: LocateResult | None, error: LocateError | OSError | None) -> None:
        self._finished[pending.index] = BatchItem(pending.index, pending.source, result, error)

    def _send(self, pending: _Pending, out: list[pb.LocateRequest]) -> None:
        """Write ``pending`` now if the throttle admits it, else fail it locally."""
        refused = self._conn.admit()
        if refused is not None:
            self._finish(pending, None, refused)
            return
        self._sent[pending.request.request_id] = pending
        out.append(pending.request)

    def requests(self, now: float) -> list[pb.LocateRequest]:
        """The requests to write now: resends and due retries first, then new images."""
        out: list[pb.LocateRequest] = []
        for pending in self._resend:  # written on a lost stream: already admitted once
            self._sent[pending.request.request_id] = pending
            out.append(pending.request)
        self._resend.clear()
        while self._delayed and self._delayed[0][0] <= now:
            self._send(heapq.heappop(self._delayed)[2], out)
        while not self._exhausted and self._held() < self._concurrency:
            try:
                index, image = next(self._images)
            except StopIteration:
                self._exhausted = True
                break
            pending = _Pending(index, source_name(image), pb.LocateRequest())
            options = self._options
            if isinstance(image, Claimed):  # this image's own claims
                options = LocateOptions.from_pb(self._options)
                options = dataclasses.replace(options, claims=image.claims).to_pb()
                image = image.image
            try:
                data = read_image(image)
                check_size(data, self._conn.max_message_bytes)
            except (OSError, LocateError) as err:
                self._finish(pending, None, err)
                continue
            pending.request = pb.LocateRequest(
                **self._upload.fields(data), options=options, request_id=f"{self._prefix}-{index}"
            )
            if pending.request.HasField("pixels"):
                pending.data = data
            self._send(pending, out)
        return out

    def on_response(self, msg: pb.LocateStreamResponse, now: float) -> None:
        self._progressed = True
        pending = self._sent.pop(msg.request_id, None)
        if pending is None:
            return  # not ours (or a duplicate after a resend): nothing to match it to
        outcome = msg.WhichOneof("outcome")
        if outcome == "result":
            self._conn.settle(grpc.StatusCode.OK)
            self._finish(pending, LocateResult.from_pb(msg.result), None)
            return
        if outcome == "error":
            err = LocateError(status_code(msg.error.code), msg.error.message, request_id=msg.request_id)
        else:
            err = LocateError(grpc.StatusCode.UNKNOWN, "response carried neither result nor error")
        self._conn.settle(err.code)
        if err.code is grpc.StatusCode.FAILED_PRECONDITION and pending.request.HasField("pixels"):
            # The service's recipe is not the one these pixels were made with: the file, now,
            # and files for the rest of this batch.
            self._upload = Upload()
            pending.request, pending.data = file_request(pending.request, pending.data), b""
            heapq.heappush(self._delayed, (now, pending.index, pending))
            return
        delay = self._conn.retry_delay(err.code, pending.attempts, None)
        if delay is None:
            self._finish(pending, None, err)
            return
        pending.attempts += 1
        heapq.heappush(self._delayed, (now + delay, pending.index, pending))

    def after_loss(self, err: LocateError) -> float:
        """The stream failed with ``err``: the seconds to wait before the next one, on which
        everything written on this one goes out again. Raises ``err`` when the stream is not
        to be retried (its status is not retried, the retries or the budget ran out); the
        count of retries starts again after a stream that got responses."""
        if self._progressed:
            self._stream_failures = 0
        self._progressed = False
        self._conn.settle(err.code, answered=False)
        delay = self._conn.retry_delay(err.code, self._stream_failures, None)
        if delay is None:
            raise err
        self._stream_failures += 1
        self._resend.extend(sorted(self._sent.values(), key=lambda p: p.index))
        self._sent.clear()
        return delay

    def ready(self) -> list[BatchItem]:
        """Finished items that may be yielded now (in input order when ``ordered``)."""
        if not self._ordered:
            items = list(self._finished.values())
            self._finished.clear()
            return items
        items = []
        while self._next_out in self._finished:
            items.append(self._finished.pop(self._next_out))
            self._next_out += 1
        return items

    def done(self) -> bool:
        return self._exhausted and not self._held() and not self._finished

    def wait_time(self, now: float, last_activity: float, timeout: float | None) -> float | None:
        """How long a driver may block for the next response (None: indefinitely)."""
        waits = []
        if self._sent and timeout is not None:
            waits.append(max(0.0, last_activity + timeout - now))
        if self._delayed:
            waits.append(max(0.0, self._delayed[0][0] - now))
        return min(waits) if waits else None

    def stalled(self, now: float, last_activity: float, timeout: float | None) -> bool:
        return bool(self._sent) and timeout is not None and now - last_activity >= timeout


class StreamRound:
    """One ``LocateStream`` of a batch, I/O-free. A driver loops: write ``requests()``, yield
    ``ready()``, stop once ``over()`` (then ``error`` says how: None when the batch is done,
    and ``clean`` is set), else ``receive()`` what it read within ``wait_time()`` (None when
    nothing came). ``timeout`` bounds the wait for a response while requests are out."""

    def __init__(self, batch: Batch, timeout: float | None) -> None:
        self.batch = batch
        self.timeout = timeout
        self.error: LocateError | None = None
        self.clean = False
        self._last = time.monotonic()

    def requests(self) -> list[pb.LocateRequest]:
        if self.error is not None:
            return []
        now = time.monotonic()
        out = self.batch.requests(now)
        if out:
            self._last = now
        return out

    def ready(self) -> list[BatchItem]:
        return self.batch.ready()

    def over(self) -> bool:
        if self.error is not None:
            return True
        if self.batch.done():
            self.clean = True
            return True
        if self.batch.stalled(time.monotonic(), self._last, self.timeout):
            self.error = LocateError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"LocateStream: no response for {self.timeout:g} s"
            )
            return True
        return False

    def wait_time(self) -> float | None:
        return self.batch.wait_time(time.monotonic(), self._last, self.timeout)

    def receive(self, msg: Incoming) -> None:
        if msg is None:
            return
        if isinstance(msg, StreamEnd):
            self.error = msg.error or LocateError(
                grpc.StatusCode.INTERNAL,
                f"LocateStream ended before the batch was done ({self.batch.awaiting} request(s) unanswered)",
            )
            return
        self._last = time.monotonic()
        self.batch.on_response(msg, self._last)
