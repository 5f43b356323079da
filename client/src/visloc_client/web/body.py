"""Reading an upload's body: within time limits, within a memory budget shared by all requests,
and for ``multipart/form-data`` through a streaming parser with hard caps.

The body is read before the request waits for a slot to call the service, so a slow client
holds a connection and the bytes it has sent, never a slot; it gets 408 once it falls behind
the minimum rate. Only the image's bytes are kept (and counted against the budget): a form's
other parts are dropped as they stream by, and a form with many parts, nested parts, or many
or long part headers is refused at the first one too many.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from visloc_client.web.upload import UploadError

# A form carries one photo: the image part plus a few small fields at most.
MAX_PARTS = 4
MAX_PART_HEADERS = 4
MAX_PART_HEADER_BYTES = 2048
MAX_BOUNDARY = 70  # RFC 2046


class ClientGone(Exception):
    """The client closed the connection before its body was read: nobody to answer."""


@dataclass(frozen=True)
class Pace:
    """The body must arrive within ``timeout_s``, and after ``grace_s`` at ``min_rate`` bytes
    per second on average (so a trickle is cut off early, a slow but steady upload is not)."""

    timeout_s: float
    grace_s: float
    min_rate: int


class Budget:
    """Upload bytes held in memory over all requests (used from the event loop only)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.total:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class Sink(Protocol):
    def feed(self, chunk: bytes) -> int:
        """Consume a chunk; the number of bytes kept in memory."""

    def finish(self) -> bytearray:
        """The image, once the whole body has been fed."""


class RawSink:
    """The body is the image (what the page itself sends)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed(self, chunk: bytes) -> int:
        self.data += chunk
        return len(chunk)

    def finish(self) -> bytearray:
        return self.data


def _form_error(message: str) -> UploadError:
    return UploadError(400, "BAD_FORM", "The upload could not be read", message)


class FormSink:
    """``multipart/form-data``: the part named ``image``, or the one file part, kept; at most
    ``MAX_PARTS`` parts, each with at most ``MAX_PART_HEADERS`` headers, none nested."""

    def __init__(self, content_type: str, field: str = "image") -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary", b"")
        if not 0 < len(boundary) <= MAX_BOUNDARY:
            raise _form_error("The multipart form has no valid boundary.")
        self.field = field.encode()
        self.image: bytearray | None = None
        self.parts = 0
        self.ended = False
        self._in_image = False
        self._headers: dict[bytes, bytes] = {}
        self._name = bytearray()
        self._value = bytearray()
        self._header_bytes = 0
        callbacks: Any = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise _form_error(f"The form has more than {MAX_PARTS} parts; send the photo alone.")
        self._headers = {}
        self._header_bytes = 0

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise _form_error("A form part's headers are too long.")

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._value += data[start:end]

    def _header_end(self) -> None:
        if len(self._headers) >= MAX_PART_HEADERS:
            raise _form_error(f"A form part has more than {MAX_PART_HEADERS} headers.")
        self._headers[bytes(self._name).strip().lower()] = bytes(self._value).strip()
        self._name, self._value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        ctype, _ = parse_options_header(self._headers.get(b"content-type", b""))
        if ctype.startswith(b"multipart/"):
            raise _form_error("Nested multipart forms are not accepted; send the photo as one file part.")
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._in_image = params.get(b"name") == self.field or b"filename" in params
        if self._in_image:
            if self.image is not None:
                raise _form_error("The form holds more than one file; send one photo at a time.")
            self.image = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_image and self.image is not None:
            self.image += data[start:end]

    def _part_end(self) -> None:
        self._in_image = False

    def _end(self) -> None:
        self.ended = True

    def feed(self, chunk: bytes) -> int:
        before = len(self.image) if self.image is not None else 0
        try:
            self.parser.write(chunk)
        except MultipartParseError as err:
            raise _form_error(f"The multipart form is malformed ({err}).") from None
        return (len(self.image) if self.image is not None else 0) - before

    def finish(self) -> bytearray:
        self.parser.finalize()
        if not self.ended:
            raise _form_error("The multipart form is malformed (no closing boundary).")
        if self.image is None:
            raise UploadError(400, "BAD_FORM", "No image in the form", 'Send the image as a form field named "image".')
        return self.image


Receive = Callable[[], Awaitable[dict[str, Any]]]


class BodyReader:
    """Reads one request body into a sink at the required pace, taking the bytes it keeps
    from the shared budget; ``release()`` gives them back."""

    def __init__(self, sink: Sink, pace: Pace, budget: Budget) -> None:
        self.sink = sink
        self.pace = pace
        self.budget = budget
        self.taken = 0

    async def read(self, receive: Receive) -> bytearray:
        loop = asyncio.get_running_loop()
        start = loop.time()
        got = 0
        more = True
        while more:
            pace = self.pace
            deadline = min(start + pace.timeout_s, start + pace.grace_s + got / pace.min_rate)
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise UploadError(
                    408,
                    "TOO_SLOW",
                    "The upload was too slow",
                    f"The photo did not arrive in time ({got} bytes in {loop.time() - start:.0f} s). "
                    "Try again on a better connection.",
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            got += len(chunk)
            kept = self.sink.feed(chunk)
            if kept:
                if not self.budget.take(kept):
                    raise UploadError(
                        503, "BUSY", "The web app is busy", "Too many photos are being uploaded. Try again in a moment."
                    )
                self.taken += kept
            more = bool(message.get("more_body", False))
        return self.sink.finish()

    def release(self) -> None:
        self.budget.give(self.taken)
        self.taken = 0
