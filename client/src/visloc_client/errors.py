"""The one error type callers catch: a failed call, with the server's status and reason; and
the one for bytes that are not a locatable image (raised by preprocessing, on either side)."""

from __future__ import annotations

import grpc

_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """Map a numeric google.rpc.Code (as carried in a stream ``Error``) to ``grpc.StatusCode``."""
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


class LocateError(Exception):
    """A call (or, in a stream, one image) failed.

    ``code`` is the gRPC status, ``reason`` the server's (or the client's) explanation, e.g.
    ``INVALID_ARGUMENT: image is truncated``.
    """

    def __init__(self, code: grpc.StatusCode, reason: str, *, request_id: str = "") -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason
        self.request_id = request_id

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> LocateError:
        """Wrap a grpc error (sync or aio); both expose ``code()`` and ``details()``."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
        details = err.details() if hasattr(err, "details") else str(err)  # type: ignore[attr-defined]
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.name, "reason": self.reason}


class ImageError(ValueError):
    """The bytes are not an image we can locate; the message says why. The service answers it
    as INVALID_ARGUMENT; a client that preprocesses on its side sends such bytes as they are,
    so that the service gives its answer."""
