"""Errors of the data plane; the interceptor maps each to one gRPC status."""

from __future__ import annotations

import grpc


class LocateFailure(Exception):
    """Base: a call that cannot be answered; ``code`` is the gRPC status it becomes."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(LocateFailure):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(LocateFailure):
    """Triton is unreachable or not ready: the caller may retry (elsewhere)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LocateFailure):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Overloaded(LocateFailure):
    """The service refused the call to protect the calls it serves (admission control): the
    caller should back off and retry later. ``reason`` says which limit refused it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, reason: str = "overloaded") -> None:
        super().__init__(message)
        self.reason = reason


class InferenceFailed(LocateFailure):
    """Triton answered with an error that is not the caller's fault."""

    code = grpc.StatusCode.INTERNAL


class Unauthenticated(LocateFailure):
    code = grpc.StatusCode.UNAUTHENTICATED
