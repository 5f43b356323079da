"""The HTTP layer: the page and its JSON API as an ASGI app (Starlette) in front of ``WebApp``.

Every answer is JSON with one error shape, ``{"error": {code, title, message, reason,
request_id}}``, and carries ``X-Request-Id`` (the security headers are the server's default
headers, ``visloc_client.web.server``). An upload goes: options checked (400 naming the
option), Content-Length checked (411/413), body read at the required pace into the shared
memory budget (408/503), image sniffed (415), then a slot to call the service (503 after
``busy_wait_s``), the call in a worker thread. Any exception ends as a JSON 500 with the
request id, and one escaped log line.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial
from typing import Any, TypeVar
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visloc_client.errors import LocateError
from visloc_client.web import messages, upload
from visloc_client.web.app import WebApp, host_allowed, parse_options
from visloc_client.web.body import BodyReader, Budget, ClientGone, FormSink, Pace, RawSink
from visloc_client.web.log import log
from visloc_client.web.upload import UploadError

T = TypeVar("T")
METHODS = ("GET", "HEAD", "POST")
# Query parameters read at most (the options are six).
_MAX_QUERY_FIELDS = 32
# A refused body up to this many times the upload limit is read and dropped (so that a
# browser sees the answer, not a reset); a larger one closes the connection.
_DRAIN_FACTOR = 4


def error_body(code: str, title: str, message: str, reason: str = "", request_id: str = "") -> dict[str, str]:
    """The one shape of every error the API answers."""
    return {"code": code, "title": title, "message": message, "reason": reason, "request_id": request_id}


def json_response(status: int, payload: Any, *, close: bool = False, headers: dict[str, str] | None = None) -> Response:
    extra = {"Cache-Control": "no-store", **(headers or {})}
    if close:
        extra["Connection"] = "close"
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type="application/json", headers=extra)


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", ""))


def error_response(request: Request, status: int, error: dict[str, Any], *, close: bool = False) -> Response:
    return json_response(status, {"error": {**error, "request_id": _request_id(request)}}, close=close)


class Handlers:
    """The routes, bound to one ``WebApp`` and its executor, slots and memory budget."""

    def __init__(self, app: WebApp, executor: Executor) -> None:
        self.app = app
        self.executor = executor
        c = app.config
        self.slots = asyncio.Semaphore(c.max_concurrent)
        self.budget = Budget(c.buffer_budget)
        self.pace = Pace(c.body_timeout_s, c.body_grace_s, c.min_body_rate)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking call (the gRPC client) on a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    async def static(self, request: Request) -> Response:
        path = request.scope["path"]
        entry = self.app.static.get("/static/index.html" if path == "/" else path)
        if entry is None:
            return error_response(request, 404, error_body("NOT_FOUND", "Not found", path))
        data, ctype, etag = entry
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        return Response(data, media_type=ctype, headers={"ETag": etag, "Cache-Control": "no-cache"})

    async def healthz(self, request: Request) -> Response:
        return Response(b"ok\n", media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-store"})

    async def info(self, request: Request) -> Response:
        status, payload = await self.run(self.app.info_payload)
        return json_response(status, payload)

    async def locate(self, request: Request) -> Response:
        declared = request.headers.get("content-length")
        reader: BodyReader | None = None
        try:
            try:
                query = parse_qs(request.scope["query_string"].decode("latin-1"), max_num_fields=_MAX_QUERY_FIELDS)
            except ValueError:
                raise UploadError(400, "BAD_OPTION", "Too many settings", "The query string is too long.") from None
            options = parse_options(query)
            ctype = request.headers.get("content-type")
            if "transfer-encoding" in request.headers:
                raise UploadError(
                    411, "LENGTH_REQUIRED", "No upload size given", "Send the image with a Content-Length, not chunked."
                )
            length = _content_length(declared)
            limit = await self.run(self.app.upload_limit)
            multipart = upload.is_multipart(ctype)
            upload.check_declared_length(length, limit, multipart=multipart)
            sink = FormSink(ctype or "") if multipart else RawSink()
            reader = BodyReader(sink, self.pace, self.budget)
            data = await reader.read(request.receive)
            upload.check_image(data, limit)
            return await self._locate(request, data, options)
        except UploadError as err:
            # A slow body is not waited for; a huge declared one is not drained.
            close = err.status == 408 or _too_big_to_drain(declared, self.app.config.max_upload_bytes)
            return error_response(request, err.status, err.to_dict(), close=close)
        except ClientGone:
            return json_response(499, {}, close=True)  # nobody reads it
        finally:
            if reader is not None:
                reader.release()

    async def _locate(self, request: Request, data: bytearray, options: dict[str, Any]) -> Response:
        try:
            await asyncio.wait_for(self.slots.acquire(), self.app.config.busy_wait_s)
        except asyncio.TimeoutError:
            busy = "Too many photos are being located. Try again in a moment."
            return error_response(request, 503, error_body("BUSY", "The web app is busy", busy))
        try:
            payload = await self.run(self.app.locate, data, options)
        except LocateError as err:
            status, error = messages.service_error(err)
            return error_response(request, status, error)
        finally:
            self.slots.release()
        return json_response(200, payload)


def _content_length(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise UploadError(400, "BAD_LENGTH", "Bad upload size", "Content-Length is not a number.")
    return int(raw)


def _too_big_to_drain(declared: str | None, limit: int) -> bool:
    return declared is not None and (not declared.isdigit() or int(declared) > _DRAIN_FACTOR * limit)


def build(app: WebApp, executor: Executor) -> ASGIApp:
    """The whole HTTP app: routes in Starlette, inside the ``Guard``."""
    h = Handlers(app, executor)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            error = error_body("METHOD_NOT_ALLOWED", "Method not allowed", f"Use {allowed} here.")
            return json_response(405, {"error": {**error, "request_id": _request_id(request)}}, headers=exc.headers)
        error = error_body("NOT_FOUND", "Not found", request.scope["path"])
        return error_response(request, exc.status_code, error)

    async def crash(request: Request, exc: Exception) -> Response:
        # Starlette answers with this, then re-raises for the Guard to log.
        return error_response(request, 500, _internal_error())

    routes = [
        Route("/", h.static, methods=["GET"]),
        Route("/static/{path:path}", h.static, methods=["GET"]),
        Route("/healthz", h.healthz, methods=["GET"]),
        Route("/api/info", h.info, methods=["GET"]),
        Route("/api/locate", h.locate, methods=["POST"]),
    ]
    inner = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: crash})
    guard = Guard(inner, app.config.allowed_hosts)
    guard.budget = h.budget  # for a look at what uploads hold
    return guard


def _internal_error() -> dict[str, str]:
    return error_body("INTERNAL", "Something went wrong in the web app", "This is not a problem with your photo.")


class Guard:
    """Around every request: a request id, the Host allowlist (421 for a foreign name; the
    health check is exempt: probes use the pod's address), 501 for methods the app never
    serves, one escaped log line, and any exception answered as a JSON 500."""

    def __init__(self, inner: ASGIApp, allowed_hosts: tuple[str, ...]) -> None:
        self.inner = inner
        self.allowed_hosts = allowed_hosts
        self.budget: Budget | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        rid = secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        loop = asyncio.get_running_loop()
        start = loop.time()
        note = ""
        try:
            host = _header(scope, b"host")
            if scope["method"] not in METHODS:
                error = error_body("NOT_IMPLEMENTED", "Not implemented", f"{scope['method']} is not served here.")
                await _answer(scope, receive, send_with_id, 501, error, rid)
            elif scope["path"] != "/healthz" and not host_allowed(host, self.allowed_hosts):
                note = f"host={host}"
                error = error_body("MISDIRECTED", "Wrong address", "This server does not serve that host name.")
                await _answer(scope, receive, send_with_id, 421, error, rid)
            else:
                await self.inner(scope, receive, send_with_id)
        except Exception as exc:  # the one place every failure ends: logged, and a JSON 500
            note = f"error={type(exc).__name__}: {exc}"
            if status == 0:
                await _answer(scope, receive, send_with_id, 500, _internal_error(), rid)
        finally:
            target = scope.get("raw_path", b"").decode("latin-1")
            if scope.get("query_string"):
                target += "?" + scope["query_string"].decode("latin-1")
            client = scope.get("client") or ("-", 0)
            ms = f"{(loop.time() - start) * 1000:.0f}ms"
            log(client[0], rid, f'"{scope["method"]} {target}"', status, ms, *([note] if note else []))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _answer(scope: Scope, receive: Receive, send: Send, status: int, error: dict[str, str], rid: str) -> None:
    response = json_response(status, {"error": {**error, "request_id": rid}}, close=status >= 500)
    await response(scope, receive, send)
