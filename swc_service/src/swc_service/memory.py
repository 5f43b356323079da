"""A worker's memory budget: the bytes its calls hold, bounded, and refused at the door beyond it.

Admission control counts calls; a 12 MP phone photo holds ~200 times the memory of a
640 x 480 one (the message, then its decoded pixels), so a burst of large photos can take a
worker's memory long before it takes its call slots. Every Locate reserves what its image
will hold before anything is decoded or queued, and gives it back when the call ends; a call
that would go over the budget is refused at once with RESOURCE_EXHAUSTED (reason
``memory_budget``), which costs the service almost nothing and frees the message. A unary
call is also held at a door before its message is read (:meth:`MemoryBudget.enter`,
:class:`~swc_service.interceptors.MemoryDoor`): a burst of large messages is refused before
gRPC has received them, HTTP/2 flow control keeping them on the callers' side.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from visloc_client.preprocessing import as_file, draft_size

from . import metrics
from .errors import DeadlineExceeded, Overloaded

MEMORY_BUDGET = "memory_budget"  # the shed reason
# While a message is read: gRPC's receive buffer, the bytearray its Python layer joins it in and
# the message's bytes. A file upload then holds the bytes alone (the decode reads the image in
# place, see wire.py); the other two stay reserved as the margin for what the budget does not
# follow (the call's Python objects, Triton's buffers). A model input (pixels) is held three
# times: the bytes, protobuf's parse and the field read from it.
MESSAGE_COPIES = 3
PIXEL_COPIES = 2  # the decoded frame and one working copy (mode conversion, EXIF turn, resize)
BYTES_PER_PIXEL = 3  # RGB; a 4-band image is converted to 3 before its working copy


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20  # buffers this large and larger: mmap, and back to the OS when freed


def bound_allocator(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make buffers of ``threshold`` bytes and more (messages, decoded frames) come from mmap and
    go back to the OS when freed, so a worker's resident memory follows what its calls hold.

    glibc raises its mmap threshold to the largest mmapped buffer freed so far (up to 32 MB) and
    serves later buffers below it from the heap, where a freed one stays resident while anything
    allocated after it lives: in a burst of 12 MP photos the worker's RSS then grew past its memory
    budget although the calls held less. Fixing the threshold turns that off. glibc only (False
    elsewhere); a ``MALLOC_MMAP_THRESHOLD_`` the operator set wins (False)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


def file_cost(data: bytes | memoryview, *, draft: bool = False) -> int:
    """Bytes a call carrying the image file ``data`` holds at its peak: the message and the
    decoded pixels, the size read from the header (a header that cannot be read costs only its
    message: the decode refuses it)."""
    cost = MESSAGE_COPIES * len(data)
    try:
        with Image.open(as_file(data)) as img:
            w, h = img.size
            if draft and img.format == "JPEG":  # decoded at a reduced DCT scale
                w, h = draft_size(w, h)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return cost
    return cost + PIXEL_COPIES * BYTES_PER_PIXEL * w * h


def pixels_cost(data: bytes) -> int:
    """Bytes a call carrying the model input (``LocateRequest.pixels``) holds."""
    return MESSAGE_COPIES * len(data)


class MemoryBudget:
    """The bytes the calls of one worker (one event loop) hold, at most ``limit``; 0: unbounded.

    Two steps, because gRPC receives a unary call's whole message before any handler sees it:
    at the **door** (:meth:`enter`, before the message is read) a call counts as the largest
    message it could be (``message_limit`` bytes, held twice), and waits while readers fill the
    budget (reading takes milliseconds) or is refused while calls already read fill it; once
    read, it reserves what its image actually holds (:meth:`hold`). Not thread-safe: used from
    the worker's event loop only, like the admission controller.
    """

    def __init__(self, limit: int, message_limit: int = 0) -> None:
        if limit < 0 or message_limit < 0:
            raise ValueError(f"memory budget must be >= 0 bytes, got {limit} (messages {message_limit})")
        self.limit = limit
        self.held = 0
        self.reading = 0  # calls past the door whose message is being read
        self.per_reader = MESSAGE_COPIES * message_limit
        self._changed = asyncio.Event()
        metrics.MEMORY_BUDGET_BYTES.set(limit)

    def _refusal(self, nbytes: int, caller: str) -> Overloaded:
        metrics.ADMISSION_SHED.labels(reason=MEMORY_BUDGET, caller=caller).inc()
        mb = 1 << 20
        return Overloaded(
            f"memory budget: calls in flight hold {self.held / mb:.0f} MB of the worker's {self.limit / mb:.0f} MB "
            f"and this image needs ~{nbytes / mb:.0f} MB; retry later (or send its model input: a fraction "
            "of the file's memory)",
            MEMORY_BUDGET,
        )

    async def enter(self, caller: str, deadline: float | None = None) -> None:
        """The door, before a call's message is read: wait while other calls' messages being read
        fill the budget; raise :class:`Overloaded` at once when the calls already read leave no
        room for one more message, :class:`DeadlineExceeded` if the deadline passes waiting.
        Every successful ``enter`` is followed by one :meth:`read`."""
        while self.limit and (self.held or self.reading):
            if self.held + self.per_reader > self.limit:
                raise self._refusal(self.per_reader, caller)
            if self.held + (self.reading + 1) * self.per_reader <= self.limit:
                break
            self._changed.clear()
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise DeadlineExceeded("the deadline passed while the call waited to be read (memory budget)")
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                raise DeadlineExceeded("the deadline passed while the call waited to be read (memory budget)") from None
        self.reading += 1

    def read(self) -> None:
        """A call past the door has its message (or gave up): it no longer counts as a reader."""
        self.reading -= 1
        self._changed.set()

    @contextmanager
    def hold(self, nbytes: int, caller: str) -> Iterator[None]:
        """Reserve ``nbytes`` for the length of the block, or raise :class:`Overloaded`. A call
        larger than the whole budget goes ahead alone (the image limits bound it), never forever
        refused."""
        if self.limit and self.held and self.held + nbytes > self.limit:
            raise self._refusal(nbytes, caller)
        self.held += nbytes
        metrics.MEMORY_HELD_BYTES.inc(nbytes)
        try:
            yield
        finally:
            self.held -= nbytes
            metrics.MEMORY_HELD_BYTES.dec(nbytes)
            self._changed.set()
