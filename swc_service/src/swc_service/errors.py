"""Errors of the data plane and the one mapping of any exception to a gRPC status.

Every failure a caller can see is a :class:`LocateFailure` carrying its status; anything else
is a bug and becomes INTERNAL with a message that reveals nothing. :func:`classify` is the only
place that decides this, for unary calls, streams and each stream item alike.
"""

from __future__ import annotations

import asyncio

import grpc


class LocateFailure(Exception):
    """Base: a call that cannot be answered; ``code`` is the gRPC status it becomes."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(LocateFailure):
    """The request (image bytes or options) is wrong; the message says what to change."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(LocateFailure):
    """Triton is unreachable or not ready: the caller may retry (elsewhere)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LocateFailure):
    """The caller's deadline (or Triton's timeout) passed first."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InferenceFailed(LocateFailure):
    """Triton answered with an error that is not the caller's fault."""

    code = grpc.StatusCode.INTERNAL


class Unauthenticated(LocateFailure):
    """No valid bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


def classify(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """(status, public message) of a failure; bugs become INTERNAL without their details."""
    if isinstance(exc, LocateFailure):
        return exc.code, str(exc)
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "cancelled"
    return grpc.StatusCode.INTERNAL, f"internal error (request_id {request_id})" if request_id else "internal error"
