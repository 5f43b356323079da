"""What the sync and asyncio clients share: connection settings, retry policy, and the
bookkeeping of a ``LocateStream`` batch (kept I/O-free so both drivers stay thin)."""

from __future__ import annotations

import heapq
import json
import os
import random
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import grpc

from visloc_client import __version__
from visloc_client.errors import LocateError, status_code
from visloc_client.results import BatchItem, LocateOptions, LocateResult
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 20 * 1024 * 1024
# Room for the request's other fields when checking an image against the message limit.
_ENVELOPE_BYTES = 4096
# Client-side load balancing policies (gRPC's names). None leaves gRPC's default, pick_first.
LOAD_BALANCING_POLICIES = ("pick_first", "round_robin")

ImageInput = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings. ``ca``: PEM roots (None: the system's); ``cert``/``key``: a client
    certificate for mutual TLS; ``server_name``: override the name checked on the certificate."""

    ca: str | os.PathLike[str] | None = None
    cert: str | os.PathLike[str] | None = None
    key: str | os.PathLike[str] | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS client authentication needs both cert and key")

        def read(path: str | os.PathLike[str] | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca),
            private_key=read(self.key),
            certificate_chain=read(self.cert),
        )


@dataclass(frozen=True)
class RetryPolicy:
    """Retry on UNAVAILABLE only (the one status that says "try again"; everything else is an
    answer). Delays grow exponentially with "equal jitter": half fixed, half random, so
    clients that failed together do not come back together."""

    retries: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("retry settings must be non-negative")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return cap / 2 + random.uniform(0, cap / 2)


@dataclass(frozen=True)
class Connection:
    """Everything needed to open a channel and authorise calls, sync or aio alike."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None
    retry: RetryPolicy
    max_message_bytes: int

    def open_channel(self, channels: Any) -> Any:
        """A channel from ``grpc`` or ``grpc.aio`` (the same two calls exist on both)."""
        if self.credentials is None:
            return channels.insecure_channel(self.target, options=self.options)
        return channels.secure_channel(self.target, self.credentials, options=self.options)

    def deadline(self) -> float | None:
        """The ``time.monotonic()`` instant a unary call (its retries included) must end by."""
        return None if self.timeout is None else time.monotonic() + self.timeout

    def retry_delay(self, code: grpc.StatusCode, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before retrying a call that failed with ``code``, or None to give up:
        only UNAVAILABLE is retried, ``retry.retries`` times, and never past the deadline."""
        if code != grpc.StatusCode.UNAVAILABLE or attempt >= self.retry.retries:
            return None
        delay = self.retry.delay(attempt)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay

    def batch(
        self, images: Iterable[ImageInput], options: pb.LocateOptions, *, concurrency: int, ordered: bool
    ) -> Batch:
        """The bookkeeping of one ``locate_many`` call over this connection."""
        return Batch(
            images,
            options,
            concurrency=concurrency,
            ordered=ordered,
            retry=self.retry,
            max_message_bytes=self.max_message_bytes,
        )

    def locate_request(self, image: ImageInput, options: pb.LocateOptions) -> pb.LocateRequest:
        """Read the image (bytes or a path), check its size locally, build the request."""
        data = read_image(image)
        check_size(data, self.max_message_bytes)
        return pb.LocateRequest(image=data, options=options)


def build_channel_options(
    base: Sequence[tuple[str, Any]],
    extra: Sequence[tuple[str, Any]] = (),
    load_balancing: str | None = None,
) -> tuple[tuple[str, Any], ...]:
    """The channel options: the client's own (``base``), then the caller's (``extra``). A
    caller's option replaces the client's option of the same name (one entry per name, so
    the result never depends on which of two duplicates gRPC reads). ``load_balancing`` sets
    ``loadBalancingConfig`` in ``grpc.service_config``, merged into a service config the
    caller gave rather than replacing it."""
    if load_balancing is not None and (
        not isinstance(load_balancing, str) or load_balancing not in LOAD_BALANCING_POLICIES
    ):
        allowed = ", ".join(repr(p) for p in LOAD_BALANCING_POLICIES)
        raise ValueError(
            f"load_balancing must be {allowed} or None (gRPC's default, pick_first), not {load_balancing!r}"
        )
    if isinstance(extra, (str, bytes)):
        raise TypeError("channel_options is a sequence of (name, value) pairs")
    merged: dict[str, Any] = {}
    for option in (*base, *extra):
        if not (isinstance(option, (tuple, list)) and len(option) == 2 and isinstance(option[0], str)):
            raise TypeError(f"a channel option is a (name, value) pair, not {option!r}")
        merged[option[0]] = option[1]
    if load_balancing is not None:
        merged["grpc.service_config"] = _with_load_balancing(merged.get("grpc.service_config"), load_balancing)
    return tuple(merged.items())


def _with_load_balancing(service_config: Any, policy: str) -> str:
    """``service_config`` (JSON text, or None) with ``policy`` as its load balancing config."""
    config: Any = {}
    if service_config is not None:
        try:
            config = json.loads(service_config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"grpc.service_config is not JSON: {err}") from None
        if not isinstance(config, dict):
            raise ValueError("grpc.service_config must be a JSON object")
        if "loadBalancingConfig" in config or "loadBalancingPolicy" in config:
            raise ValueError("load_balancing is given twice: as an argument and in grpc.service_config; give it once")
    return json.dumps({**config, "loadBalancingConfig": [{policy: {}}]}, separators=(",", ":"))


def connection(
    target: str,
    *,
    tls: bool | TLSConfig,
    token: str | None,
    timeout: float | None,
    retries: int | RetryPolicy,
    max_message_bytes: int,
    load_balancing: str | None = None,
    channel_options: Sequence[tuple[str, Any]] = (),
) -> Connection:
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive (or None for no deadline)")
    if max_message_bytes <= _ENVELOPE_BYTES:
        raise ValueError("max_message_bytes is too small")
    tls_config = TLSConfig() if tls is True else tls or None
    own: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.primary_user_agent", f"visloc-client/{__version__}"),
    ]
    if tls_config is not None and tls_config.server_name:
        own.append(("grpc.ssl_target_name_override", tls_config.server_name))
    options = build_channel_options(own, channel_options, load_balancing)
    # Images are checked locally against the channel's send limit (gRPC would refuse them
    # anyway, and in a stream that kills the whole call), also when channel_options set it.
    send_limit = dict(options)["grpc.max_send_message_length"]
    if isinstance(send_limit, int) and not isinstance(send_limit, bool) and send_limit > 0:
        max_message_bytes = send_limit
    # Sent as plain metadata rather than call credentials so that it also works over a
    # plaintext hop to a TLS-terminating proxy; use TLS end to end in production.
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return Connection(
        target=target,
        credentials=tls_config.credentials() if tls_config is not None else None,
        options=options,
        metadata=metadata,
        timeout=timeout,
        retry=retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries=retries),
        max_message_bytes=max_message_bytes,
    )


class ClientBase:
    """The constructor both clients share: one channel from ``_channels`` (``grpc`` or
    ``grpc.aio``) to the Locator service; see ``LocatorClient`` for the arguments."""

    _channels: Any = grpc

    def __init__(
        self,
        target: str,
        *,
        tls: bool | TLSConfig = False,
        token: str | None = None,
        timeout: float | None = 30.0,
        retries: int | RetryPolicy = 3,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        load_balancing: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._conn = connection(
            target,
            tls=tls,
            token=token,
            timeout=timeout,
            retries=retries,
            max_message_bytes=max_message_bytes,
            load_balancing=load_balancing,
            channel_options=channel_options,
        )
        self._channel = self._conn.open_channel(self._channels)
        self._stub = pb_grpc.LocatorStub(self._channel)


def read_image(image: ImageInput) -> bytes:
    """Bytes as given, or the contents of a path. URLs are not fetched (the CLI does that)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    raise TypeError(f"an image is bytes or a path, not {type(image).__name__}")


def source_name(image: ImageInput) -> str | None:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else None


def check_size(data: bytes, max_message_bytes: int) -> None:
    """Refuse locally what gRPC would refuse anyway; in a stream it would kill the whole call."""
    if len(data) + _ENVELOPE_BYTES > max_message_bytes:
        raise LocateError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"image is {len(data)} bytes; the client's send limit (max_message_bytes) is {max_message_bytes}",
        )


def make_options(
    top_k: int | None,
    eps_km: float | None,
    conf_scale_km: float | None,
    conf_threshold: float | None,
    neighbours: int,
    top_cells: int,
) -> pb.LocateOptions:
    return LocateOptions(top_k, eps_km, conf_scale_km, conf_threshold, neighbours, top_cells).to_pb()


@dataclass
class _Pending:
    index: int
    source: str | None
    request: pb.LocateRequest
    attempts: int = 0


class Batch:
    """The state of one ``locate_many``: which requests are in flight, which wait for a retry,
    which results wait to be yielded. Drivers feed it responses and stream losses; it never
    blocks and does no network I/O (it reads image files lazily, one slot at a time).

    At most ``concurrency`` images are held at once (in flight or waiting to be retried), so
    memory stays bounded however long the input is. Finished items that cannot be yielded yet
    (``ordered``) are kept; they are small result objects, not images.
    """

    def __init__(
        self,
        images: Iterable[ImageInput],
        options: pb.LocateOptions,
        *,
        concurrency: int,
        ordered: bool,
        retry: RetryPolicy,
        max_message_bytes: int,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._images: Iterator[tuple[int, ImageInput]] = enumerate(images)
        self._options = options
        self._concurrency = concurrency
        self._ordered = ordered
        self._retry = retry
        self._max = max_message_bytes
        self._prefix = uuid.uuid4().hex[:12]
        self._exhausted = False
        self._sent: dict[str, _Pending] = {}
        self._resend: list[_Pending] = []
        self._delayed: list[tuple[float, int, _Pending]] = []
        self._finished: dict[int, BatchItem] = {}
        self._next_out = 0

    @property
    def awaiting(self) -> int:
        """Requests written on the current stream and not answered yet."""
        return len(self._sent)

    def _held(self) -> int:
        return len(self._sent) + len(self._resend) + len(self._delayed)

    def _finish(self, item: BatchItem) -> None:
        self._finished[item.index] = item

    def requests(self, now: float) -> list[pb.LocateRequest]:
        """The requests to write now: resends and due retries first, then new images."""
        while self._delayed and self._delayed[0][0] <= now:
            self._resend.append(heapq.heappop(self._delayed)[2])
        out = []
        for pending in self._resend:
            self._sent[pending.request.request_id] = pending
            out.append(pending.request)
        self._resend.clear()
        while not self._exhausted and self._held() < self._concurrency:
            try:
                index, image = next(self._images)
            except StopIteration:
                self._exhausted = True
                break
            source = source_name(image)
            try:
                data = read_image(image)
                check_size(data, self._max)
            except (OSError, LocateError) as err:
                self._finish(BatchItem(index, source, None, err))
                continue
            request = pb.LocateRequest(image=data, options=self._options, request_id=f"{self._prefix}-{index}")
            self._sent[request.request_id] = _Pending(index, source, request)
            out.append(request)
        return out

    def on_response(self, msg: pb.LocateStreamResponse, now: float) -> None:
        pending = self._sent.pop(msg.request_id, None)
        if pending is None:
            return  # not ours (or a duplicate after a resend): nothing to match it to
        outcome = msg.WhichOneof("outcome")
        if outcome == "result":
            self._finish(BatchItem(pending.index, pending.source, LocateResult.from_pb(msg.result)))
            return
        if outcome == "error":
            err = LocateError(status_code(msg.error.code), msg.error.message, request_id=msg.request_id)
        else:
            err = LocateError(grpc.StatusCode.UNKNOWN, "response carried neither result nor error")
        if err.code == grpc.StatusCode.UNAVAILABLE and pending.attempts < self._retry.retries:
            due = now + self._retry.delay(pending.attempts)
            pending.attempts += 1
            heapq.heappush(self._delayed, (due, pending.index, pending))
            return
        self._finish(BatchItem(pending.index, pending.source, None, err))

    def on_stream_lost(self) -> None:
        """The stream died: everything written on it goes out again on the next one."""
        self._resend.extend(sorted(self._sent.values(), key=lambda p: p.index))
        self._sent.clear()

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

    def next_due(self) -> float | None:
        """When the earliest delayed retry becomes due, if any."""
        return self._delayed[0][0] if self._delayed else None

    def wait_time(self, now: float, last_activity: float, timeout: float | None) -> float | None:
        """How long a driver may block for the next response (None: indefinitely)."""
        waits = []
        if self._sent and timeout is not None:
            waits.append(max(0.0, last_activity + timeout - now))
        due = self.next_due()
        if due is not None:
            waits.append(max(0.0, due - now))
        return min(waits) if waits else None

    def stalled(self, now: float, last_activity: float, timeout: float | None) -> bool:
        return bool(self._sent) and timeout is not None and now - last_activity >= timeout


def stall_error(timeout: float | None) -> LocateError:
    return LocateError(grpc.StatusCode.DEADLINE_EXCEEDED, f"LocateStream: no response for {timeout:g} s")


def unanswered_error(batch: Batch) -> LocateError:
    return LocateError(
        grpc.StatusCode.INTERNAL,
        f"LocateStream ended before the batch was done ({batch.awaiting} request(s) unanswered)",
    )
