"""The HTTP server: uvicorn (HTTP/1.1 by h11) with the limits it does not have on its own.

uvicorn brings a kept HTTP/1.1 parser, keep-alive, graceful shutdown and default headers (our
security headers go on every answer that way, its own 500/503 included; its ``Server:
uvicorn`` header is off). What it lacks is added by a small subclass of its h11 protocol:

- a connection cap: past ``max_connections`` a connection is answered 503 and closed at once;
- a time limit on the request line and headers (slowloris), which also bounds how long a
  refused body is drained afterwards: 408 and close;
- a gentle close: a connection refused while the client still sends is shut on our side and
  drained, never closed under it (which the kernel turns into a reset that can hide the answer);
- its own 400 for an unreadable request (bad request line, malformed HTTP version, control
  characters) carries the security headers and the JSON error shape, like every answer.

The body's pace, the upload memory budget and the slots are the app's (``asgi``, ``body``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from visloc_client.web.app import WebApp, WebConfig, security_headers
from visloc_client.web.asgi import build, error_body
from visloc_client.web.log import log


def raw_response(status: int, error: dict[str, str], headers: list[tuple[str, str]]) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, for the protocol's own refusals
    (written before or instead of any request the app would see)."""
    body = json.dumps({"error": error}, separators=(",", ":")).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += ["Content-Type: application/json", f"Content-Length: {len(body)}", "Cache-Control: no-store"]
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a connection cap, a header deadline and JSON 400s."""

    web_config: ClassVar[WebConfig]
    web_headers: ClassVar[list[tuple[str, str]]]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._socket = transport
        self.transport = _GentleClose(transport, self)  # uvicorn's closes come here too
        self._deadline: asyncio.TimerHandle | None = None
        self._lingering = False
        self._lost = False
        if len(self.connections) > self.web_config.max_connections:
            busy = error_body("BUSY", "The web app is busy", "Too many connections. Try again in a moment.")
            self._refuse(503, busy, "connection cap")
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered already: what follows is dropped until the client closes
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server stops: a connection lingering after its answer is not waited for."""
        if self._lingering:
            self._socket.close()
        else:
            super().shutdown()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request's headers, or the rest of a refused body, in time

    def send_400_response(self, msg: str) -> None:
        error = error_body("BAD_REQUEST", "The request could not be read", f"{msg} Send a valid HTTP/1.1 request.")
        self._refuse(400, error, "unreadable request")

    # --- the deadline ----------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.web_config.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()  # type: ignore[union-attr]
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._socket.is_closing():
            return
        if self._lingering:
            self._socket.close()  # the client neither closed nor stopped sending: cut it off
        elif self.cycle is not None and not self.cycle.response_complete:
            return  # the app holds this request; its own limits apply (it re-arms when done)
        elif self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self._socket.close()  # idle: nothing was asked (keep-alive or a browser's preconnect)
        elif self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE:
            slow = error_body("TOO_SLOW", "The request was too slow", "The request headers did not arrive in time.")
            self._refuse(408, slow, "headers too slow")
        else:  # the rest of a body already answered: stop reading it
            self._socket.close()

    def _refuse(self, status: int, error: dict[str, str], why: str) -> None:
        """Answer with ``status`` and end the connection gently (``_close``)."""
        client = self.client[0] if self.client else "-"
        log(client, "-", '"-"', status, why)
        if self._socket.is_closing() or self._lingering:
            return
        self.transport.write(raw_response(status, error, self.web_headers))
        self._close(linger=True)

    # --- closing ---------------------------------------------------------------------------

    def _close(self, *, linger: bool = False) -> None:
        """End the connection without losing the answer just written.

        Closing a socket while the client is still sending (the rest of a body we refused, a
        request after a refusal at connect) makes the kernel answer with a reset, and a client
        that gets the reset before reading the answer sees "connection reset" instead of the
        408/413/503. So then (``linger``, or a request body not read to its end) our side is shut
        (FIN), what still arrives is read and dropped until the client closes or the deadline
        passes ("lingering close", as Apache and nginx do); otherwise the socket closes now."""
        if self._lost or self._socket.is_closing() or self._lingering:
            return
        unread = self.conn.their_state in (h11.SEND_BODY, h11.ERROR)
        if (linger or unread) and self._socket.can_write_eof():
            self._lingering = True
            self._socket.write_eof()
            self._socket.resume_reading()  # uvicorn pauses reading a body the app does not take
            self._arm()
        else:
            self._socket.close()


class _GentleClose:
    """The transport as uvicorn sees it: ``close`` is the protocol's gentle close, and a
    lingering connection counts as closing, so nothing more is written to it."""

    def __init__(self, transport: asyncio.Transport, protocol: LimitedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._protocol._close()

    def is_closing(self) -> bool:
        return self._transport.is_closing() or self._protocol._lingering

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class WebServer:
    """The page on ``host:port`` (the socket is bound at construction; ``url`` is where the
    page is). ``serve_forever()`` serves until ``shutdown()``; ``server_close()`` frees the
    rest. ``grace_s``: how long uploads in progress may finish when stopping."""

    def __init__(self, app: WebApp, host: str = "127.0.0.1", port: int = 8080, *, grace_s: float = 10.0) -> None:
        self.app = app
        config = app.config
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.server_address: tuple[Any, ...] = self.socket.getsockname()
        # Locate calls (in slots) plus GetInfo calls: the gRPC client is blocking.
        self.executor = ThreadPoolExecutor(config.max_concurrent + 2, thread_name_prefix="visloc-web-call")
        headers = security_headers(app.csp)
        protocol = type("WebH11Protocol", (LimitedH11Protocol,), {"web_config": config, "web_headers": headers})
        self.asgi = build(app, self.executor)
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(
                self.asgi,
                http=protocol,
                ws="none",
                lifespan="off",
                log_config=None,
                access_log=False,  # the app's own escaped line instead
                server_header=False,  # no "uvicorn", no version
                headers=headers,
                timeout_keep_alive=5,
                timeout_graceful_shutdown=max(1, round(grace_s)),
                h11_max_incomplete_event_size=16 * 1024,
            )
        )
        self._done = threading.Event()
        self._running = False

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        if ":" in str(host):
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    @property
    def started(self) -> bool:
        return bool(self.uvicorn.started)

    def serve_forever(self) -> None:
        self._running = True
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let requests in progress finish (up to ``grace_s``), return."""
        self.uvicorn.should_exit = True
        if self._running:
            self._done.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def start(app: WebApp, host: str = "127.0.0.1", port: int = 8080, *, grace_s: float = 5.0) -> WebServer:
    """Serve ``app`` on a daemon thread until ``server.shutdown()`` (then ``server_close()``);
    returns once the server accepts requests (``make demo`` runs the page this way)."""
    server = WebServer(app, host, port, grace_s=grace_s)
    thread = threading.Thread(target=server.serve_forever, name="visloc-web", daemon=True)
    thread.start()
    while not server.started:
        if server._done.wait(0.02):
            raise RuntimeError("the web server stopped while starting")
    return server
