"""Plain words for the page: the Locate service's errors and the localizability verdict."""

from __future__ import annotations

from typing import Any

import grpc

from visloc_client.errors import LocateError

LOCALIZABLE = "Localizable: the model is confident about the region"
NOT_LOCALIZABLE = "Not localizable: treat this location as a guess"

# gRPC status -> (HTTP status, title, what it means for the person at the page).
_SERVICE_ERRORS: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (
        422,
        "The service could not use this image",
        "The file may be damaged, truncated, too large in pixels, or in an unusual format.",
    ),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (
        503,
        "The service is busy or the image is too large",
        "Try again in a moment, or with a smaller photo.",
    ),
    grpc.StatusCode.UNAVAILABLE: (
        503,
        "The location service is not available right now",
        "It may be starting or restarting. Try again in a moment.",
    ),
    grpc.StatusCode.DEADLINE_EXCEEDED: (
        504,
        "The location service took too long to answer",
        "It may be overloaded. Try again in a moment.",
    ),
    grpc.StatusCode.CANCELLED: (
        503,
        "The request was cancelled",
        "Try again.",
    ),
    grpc.StatusCode.UNAUTHENTICATED: (
        502,
        "This web page may not use the location service",
        "The web app's credentials were refused: its operator should check its token.",
    ),
    grpc.StatusCode.PERMISSION_DENIED: (
        502,
        "This web page may not use the location service",
        "The web app's credentials were refused: its operator should check its token.",
    ),
    grpc.StatusCode.UNIMPLEMENTED: (
        502,
        "The location service does not offer this call",
        "The web app and the service are of different versions.",
    ),
}
_DEFAULT = (502, "The location service failed", "This is not a problem with your photo. Try again later.")


def service_error(err: LocateError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON error body for a failed Locate/GetInfo call. The reason is the
    service's own text (which never holds image bytes); the title and message are plain words."""
    status, title, message = _SERVICE_ERRORS.get(err.code, _DEFAULT)
    return status, {"code": err.code.name, "title": title, "message": message, "reason": err.reason}


def verdict(localizable: bool) -> str:
    return LOCALIZABLE if localizable else NOT_LOCALIZABLE
