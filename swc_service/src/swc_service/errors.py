"""Errors of the data plane and the one mapping of any exception to a gRPC status.

Every failure a caller can see is a :class:`LocateFailure` carrying its status; anything else
is a bug and becomes INTERNAL with a message that reveals nothing. :func:`classify` is the only
place that decides this, for unary calls, streams and each stream item alike.
"""

from __future__ import annotations

import asyncio

import grpc

from visloc_client.errors import ImageError


class LocateFailure(Exception):
    """Base: a call that cannot be answered; ``code`` is the gRPC status it becomes."""

    code = grpc.StatusCode.INTERNAL

    def __init_subclass__(cls, code: grpc.StatusCode | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code


_S = grpc.StatusCode


class InvalidArgument(LocateFailure, code=_S.INVALID_ARGUMENT):
    """The request (image bytes or options) is wrong; the message says what to change."""


class RecipeMismatch(LocateFailure, code=_S.FAILED_PRECONDITION):
    """Pixels made with another preprocessing recipe than the service's: the caller should
    send the file (or preprocess again with GetInfo's recipe)."""


class Unavailable(LocateFailure, code=_S.UNAVAILABLE):
    """Triton is unreachable or not ready: the caller may retry (elsewhere)."""


class DeadlineExceeded(LocateFailure, code=_S.DEADLINE_EXCEEDED):
    """The caller's deadline (or Triton's timeout) passed first."""


class Overloaded(LocateFailure):
    """The service refused the call to protect the calls it serves (admission control): the
    caller should back off and retry later. ``reason`` says which limit refused it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, reason: str = "overloaded") -> None:
        super().__init__(message)
        self.reason = reason


class InferenceFailed(LocateFailure):
    """Triton answered with an error that is not the caller's fault (INTERNAL)."""


class Unauthenticated(LocateFailure, code=_S.UNAUTHENTICATED):
    """No valid bearer token."""


def classify(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """(status, public message) of a failure; bugs become INTERNAL without their details."""
    if isinstance(exc, LocateFailure):
        return exc.code, str(exc)
    if isinstance(exc, ImageError):  # raised by the one preprocessing (visloc_client.preprocessing)
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "cancelled"
    return grpc.StatusCode.INTERNAL, f"internal error (request_id {request_id})" if request_id else "internal error"
