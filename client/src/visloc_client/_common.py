"""What the sync and asyncio clients share: connection settings, the retry policy and its
overload guards, and the attempts of a unary call (kept I/O-free so both drivers stay thin;
the ``LocateStream`` side is in ``_stream``)."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import grpc

from visloc_client import __version__
from visloc_client.errors import LocateError
from visloc_client.overload import OVERLOAD_CODES, AdaptiveThrottle, RetryBudget
from visloc_client.results import LocateOptions
from visloc_client.upload import Upload, available, check_mode, recipe_of
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 20 * 1024 * 1024
# Room for the request's other fields when checking an image against the message limit.
_ENVELOPE_BYTES = 4096
# Client-side load balancing policies (gRPC's names). None leaves gRPC's default, pick_first.
LOAD_BALANCING_POLICIES = ("pick_first", "round_robin")

ImageInput = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Claimed:
    """An image for ``locate_many`` with claims of its own: ``claims`` ((lat, lon), ...) replace
    the batch's for this image (e.g. each photo of a labelled set against its own claims)."""

    image: ImageInput
    claims: tuple[tuple[float, float], ...]


T = TypeVar("T")


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
    """Retry on the statuses in ``retry_on``: UNAVAILABLE only by default (the one status that
    says "try again"; everything else is an answer). Add RESOURCE_EXHAUSTED to retry an
    overloaded service's refusals (the client's retry budget keeps that bounded). Delays grow
    exponentially with "equal jitter": half fixed, half random, so clients that failed
    together do not come back together."""

    retries: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    retry_on: frozenset[grpc.StatusCode] = field(default=frozenset({grpc.StatusCode.UNAVAILABLE}))

    def __post_init__(self) -> None:
        if self.retries < 0 or self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("retry settings must be non-negative")
        codes = frozenset(self.retry_on)
        if not all(isinstance(c, grpc.StatusCode) and c != grpc.StatusCode.OK for c in codes):
            raise ValueError(f"retry_on holds grpc.StatusCode failure codes, not {self.retry_on!r}")
        object.__setattr__(self, "retry_on", codes)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return cap / 2 + random.uniform(0, cap / 2)


def rpc_name(request: Any) -> str:
    """The Locator method a request message is for (``LocateRequest`` -> ``Locate``)."""
    return type(request).__name__.removesuffix("Request")


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
    budget: RetryBudget | None = None
    throttle: AdaptiveThrottle | None = None

    def open_channel(self, channels: Any) -> Any:
        """A channel from ``grpc`` or ``grpc.aio`` (the same two calls exist on both)."""
        if self.credentials is None:
            return channels.insecure_channel(self.target, options=self.options)
        return channels.secure_channel(self.target, self.credentials, options=self.options)

    def deadline(self) -> float | None:
        """The ``time.monotonic()`` instant a unary call (its retries included) must end by."""
        return None if self.timeout is None else time.monotonic() + self.timeout

    def admit(self) -> LocateError | None:
        """None to send an attempt now; the error that stands for it when the adaptive throttle
        refuses it locally (RESOURCE_EXHAUSTED, like the service's own refusal)."""
        if self.throttle is None or self.throttle.admit():
            return None
        return LocateError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"throttled client-side, not sent: {self.throttle.describe()}",
        )

    def settle(self, code: grpc.StatusCode, *, answered: bool = True) -> None:
        """Account how an attempt ended (OK or a failure) in the throttle and the retry budget.
        ``answered=False``: a whole stream failed, which counts against the budget only."""
        overloaded = code in OVERLOAD_CODES
        if answered and self.throttle is not None:
            self.throttle.record(accepted=not overloaded)
        if self.budget is None:
            return
        if code == grpc.StatusCode.OK:
            self.budget.on_success()
        elif overloaded or code in self.retry.retry_on:
            self.budget.on_failure()

    def retry_delay(self, code: grpc.StatusCode, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before retrying a call that failed with ``code``, or None to give up:
        only ``retry.retry_on`` statuses are retried, ``retry.retries`` times, while the retry
        budget allows, and never past the deadline."""
        if code not in self.retry.retry_on or attempt >= self.retry.retries:
            return None
        if self.budget is not None and not self.budget.allows_retry():
            return None
        delay = self.retry.delay(attempt)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay

    def locate_request(
        self, image: ImageInput, options: dict[str, Any], upload: Upload = Upload()
    ) -> tuple[pb.LocateRequest, bytes]:
        """Read the image (bytes or a path), check its size locally, build the request (the
        file, or the model input as ``upload`` says); ``options`` are ``LocateOptions`` fields.
        Returns the request and the file's bytes (to send instead if pixels are refused)."""
        data = read_image(image)
        check_size(data, self.max_message_bytes)
        return pb.LocateRequest(**upload.fields(data), options=LocateOptions(**options).to_pb()), data


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


def _guard(value: bool | Any, kind: type) -> Any:
    """True: a fresh ``kind`` with its defaults; False: none; an instance: that one (it may
    be shared with other clients)."""
    if value is True:
        return kind()
    if value is False:
        return None
    if isinstance(value, kind):
        return value
    raise TypeError(f"expected True, False or a {kind.__name__}, not {value!r}")


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
        retry_budget: bool | RetryBudget = True,
        throttle: bool | AdaptiveThrottle = True,
        preprocess: str = "auto",
    ) -> None:
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
        self._conn = Connection(
            target=target,
            credentials=tls_config.credentials() if tls_config is not None else None,
            options=options,
            metadata=metadata,
            timeout=timeout,
            retry=retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries=retries),
            max_message_bytes=max_message_bytes,
            budget=_guard(retry_budget, RetryBudget),
            throttle=_guard(throttle, AdaptiveThrottle),
        )
        self._channel = self._conn.open_channel(self._channels)
        self._stub = pb_grpc.LocatorStub(self._channel)
        self._preprocess = check_mode(preprocess)
        # How images are sent; None: not known yet (GetInfo is asked on the first call).
        self._upload: Upload | None = Upload() if preprocess == "server" or not available() else None

    def _learned(self, info: pb.GetInfoResponse | LocateError) -> Upload:
        """The upload after asking GetInfo for the recipe: files only if it failed, and kept
        unless the failure may pass (asked again on the next call)."""
        if isinstance(info, LocateError):
            if info.code in _TRANSIENT:
                return Upload()
            self._upload = Upload()
        else:
            self._upload = Upload(self._preprocess, recipe_of(info))
        return self._upload

    def _refused_pixels(self, err: LocateError, request: pb.LocateRequest) -> bool:
        """The service refused the model input sent (its recipe changed, or another replica has
        another): forget the recipe; the caller sends the file."""
        if err.code is grpc.StatusCode.FAILED_PRECONDITION and request.HasField("pixels"):
            self._upload = None
            return True
        return False


_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)


def read_image(image: ImageInput) -> bytes:
    """Bytes as given, or the contents of a path. URLs are not fetched (the CLI does that)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    raise TypeError(f"an image is bytes or a path, not {type(image).__name__}")


def source_name(image: ImageInput) -> str | None:
    if isinstance(image, Claimed):
        return source_name(image.image)
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else None


def check_size(data: bytes, max_message_bytes: int) -> None:
    """Refuse locally what gRPC would refuse anyway; in a stream it would kill the whole call."""
    if len(data) + _ENVELOPE_BYTES > max_message_bytes:
        raise LocateError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"image is {len(data)} bytes; the client's send limit (max_message_bytes) is {max_message_bytes}",
        )


class UnaryCall:
    """The attempts of one unary call, I/O-free: both clients drive it the same way, sending
    each attempt with ``next_timeout()`` and sleeping for what ``failed()`` returns.

    The timeout bounds the whole call, retries included. Every attempt passes the adaptive
    throttle first and is accounted in it and in the retry budget when it ends.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._deadline = conn.deadline()
        self._attempt = 0

    def next_timeout(self) -> float | None:
        """Admit the next attempt and give its timeout: what is left of the call's deadline.
        Raises ``LocateError`` (RESOURCE_EXHAUSTED) when the throttle refuses it."""
        refused = self._conn.admit()
        if refused is not None:
            raise refused
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def succeeded(self, response: T) -> T:
        self._conn.settle(grpc.StatusCode.OK)
        return response

    def failed(self, err: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt; raises ``LocateError`` when there is none."""
        error = LocateError.from_rpc(err)
        self._conn.settle(error.code)
        delay = self._conn.retry_delay(error.code, self._attempt, self._deadline)
        if delay is None:
            raise error from err
        self._attempt += 1
        return delay
