"""The web app: one page and a small JSON API in front of the Locate service.

Standard library only (``http.server.ThreadingHTTPServer``): the page is a handful of static
files and two API calls that hand the image to ``LocatorClient``, so a framework would add
dependencies and nothing else. Put it behind the usual reverse proxy / Ingress for TLS.

Routes: ``GET /`` the page, ``GET /static/...`` its files (read into memory at start-up, so
no path ever reaches the file system), ``GET /api/info`` what is served and the upload limits,
``POST /api/locate`` an image (raw body, or multipart field ``image``) -> the prediction,
``GET /healthz`` liveness. Uploads are checked (size from Content-Length before reading, type
sniffed from magic bytes) before anything is sent to the service, and held in memory only for
the duration of the call: nothing is written to disk or logged.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from visloc_client import __version__
from visloc_client.client import LocatorClient
from visloc_client.errors import LocateError
from visloc_client.results import ServiceInfo
from visloc_client.web import messages, upload
from visloc_client.web.upload import UploadError

MiB = 1024 * 1024

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


@dataclass(frozen=True)
class WebConfig:
    """Settings of the web app (the CLI's ``visloc web`` flags)."""

    max_upload_bytes: int = 10 * MiB
    # Evidence asked of the service for each photo (neighbours are capped at top_k).
    neighbours: int = 10
    top_cells: int = 5
    # Uploads processed at once; more wait up to ``busy_wait_s``, then get 503.
    max_concurrent: int = 8
    busy_wait_s: float = 10.0
    # Optional raster tiles ("https://tile.example.org/{z}/{x}/{y}.png"): off by default; the
    # page then draws the offline Natural Earth outline only.
    tiles_url: str | None = None
    tiles_attribution: str = ""
    tiles_max_zoom: int = 18
    info_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_upload_bytes <= 0:
            raise ValueError("max_upload_bytes must be positive")
        if self.neighbours < 0 or self.top_cells < 0:
            raise ValueError("neighbours and top_cells must be non-negative")
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if self.tiles_url is not None:
            tile_origin(self.tiles_url)  # validates
        if not 0 <= self.tiles_max_zoom <= 22:
            raise ValueError("tiles_max_zoom must be in 0..22")


def tile_origin(url: str) -> str:
    """The origin (scheme://host[:port]) of a tile URL template, which the CSP must allow."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or "{" in parts.netloc:
        raise ValueError(f"tiles URL must be http(s)://HOST/...{{z}}/{{x}}/{{y}}..., got {url!r}")
    if not all(key in url for key in ("{z}", "{x}", "{y}")):
        raise ValueError(f"tiles URL must contain {{z}}, {{x}} and {{y}}, got {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy(config: WebConfig) -> str:
    """Only this origin, except ``blob:`` images (the local preview of the chosen photo, which
    never leaves the browser as a URL) and the tile server when tiles are configured."""
    images = "'self' blob:" + (f" {tile_origin(config.tiles_url)}" if config.tiles_url else "")
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        f"img-src {images}; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def _load_static() -> dict[str, tuple[bytes, str, str]]:
    """Every file under ``static/``, by URL path: (bytes, content type, ETag)."""
    files: dict[str, tuple[bytes, str, str]] = {}

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
                continue
            name = child.name
            suffix = name[name.rfind(".") :] if "." in name else ""
            ctype = _CONTENT_TYPES.get(suffix, "text/plain; charset=utf-8")
            data = child.read_bytes()
            etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
            files[f"{prefix}{name}"] = (data, ctype, etag)

    walk(resources.files("visloc_client.web").joinpath("static"), "/static/")
    return files


# After a failed GetInfo, uploads do not ask again for this long (Locate reports the failure).
_INFO_RETRY_S = 5.0

_INT_OPTIONS = ("top_k", "neighbours", "top_cells")
_FLOAT_OPTIONS = ("eps_km", "conf_scale_km", "conf_threshold")


def parse_options(query: Mapping[str, list[str]]) -> dict[str, Any]:
    """Locate options from the query string (unknown names are ignored)."""
    options: dict[str, Any] = {}
    for name in _INT_OPTIONS + _FLOAT_OPTIONS:
        values = query.get(name)
        if not values or values[-1] == "":
            continue
        raw = values[-1]
        try:
            value: Any = int(raw) if name in _INT_OPTIONS else float(raw)
        except ValueError:
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)) or value < 0:
            kind = "a non-negative integer" if name in _INT_OPTIONS else "a non-negative number"
            raise UploadError(400, "BAD_OPTION", "A setting is not valid", f"{name} must be {kind}, got {raw!r}.")
        options[name] = value
    return options


class WebApp:
    """What the HTTP handler calls; holds the one ``LocatorClient`` (thread-safe)."""

    def __init__(self, client: LocatorClient, config: WebConfig | None = None) -> None:
        self.client = client
        self.config = config or WebConfig()
        self.csp = content_security_policy(self.config)
        self.static = _load_static()
        self.slots = threading.BoundedSemaphore(self.config.max_concurrent)
        self._info_lock = threading.Lock()
        self._info: tuple[float, ServiceInfo] | None = None
        self._info_failed = -math.inf  # when GetInfo last failed (monotonic)

    def drain(self, timeout: float) -> bool:
        """Wait until no upload is being processed (for a graceful stop); False on timeout."""
        deadline = time.monotonic() + timeout
        taken = 0
        try:
            while taken < self.config.max_concurrent:
                if not self.slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    return False
                taken += 1
            return True
        finally:
            for _ in range(taken):
                self.slots.release()

    # --- service info (cached: the page asks on every load) --------------------------------

    def service_info(self) -> ServiceInfo:
        """GetInfo, cached for ``info_ttl_s``; raises ``LocateError``."""
        with self._info_lock:
            if self._info is not None and time.monotonic() - self._info[0] < self.config.info_ttl_s:
                return self._info[1]
        try:
            info = self.client.info()
        except LocateError:
            self._info_failed = time.monotonic()
            raise
        with self._info_lock:
            self._info = (time.monotonic(), info)
        return info

    def cached_info(self) -> ServiceInfo | None:
        """The service info if it can be had, without waiting on a service that just failed
        to answer (Locate itself then says what is wrong)."""
        with self._info_lock:
            if self._info is not None and time.monotonic() - self._info[0] < self.config.info_ttl_s:
                return self._info[1]
        if time.monotonic() - self._info_failed < _INFO_RETRY_S:
            return None
        try:
            return self.service_info()
        except LocateError:
            return None

    def upload_limit(self) -> int:
        """The web app's limit, lowered to the service's own ``max_image_bytes`` if smaller."""
        info = self.cached_info()
        limit = self.config.max_upload_bytes
        if info is not None and info.max_image_bytes:
            limit = min(limit, info.max_image_bytes)
        return limit

    def web_settings(self) -> dict[str, Any]:
        c = self.config
        tiles = None
        if c.tiles_url:
            tiles = {"url": c.tiles_url, "attribution": c.tiles_attribution, "max_zoom": c.tiles_max_zoom}
        return {
            "version": __version__,
            "max_upload_bytes": self.upload_limit(),
            "accepted_formats": list(upload.ACCEPTED_FORMATS),
            "neighbours": c.neighbours,
            "top_cells": c.top_cells,
            "tiles": tiles,
        }

    def info_payload(self) -> tuple[int, dict[str, Any]]:
        """``GET /api/info``: the web settings always; the service's info or why it is missing."""
        payload: dict[str, Any] = {"web": self.web_settings()}
        try:
            payload["service"] = self.service_info().to_dict()
        except LocateError as err:
            status, error = messages.service_error(err)
            payload["service"] = None
            payload["error"] = error
            return status, payload
        return 200, payload

    # --- locate ----------------------------------------------------------------------------

    def locate(self, data: bytes, options: dict[str, Any]) -> dict[str, Any]:
        """Check ``data`` and locate it; raises ``UploadError`` or ``LocateError``."""
        fmt = upload.check_image(data, self.upload_limit())
        info = self.cached_info()
        defaults = info.defaults if info is not None else None
        options = dict(options)
        if "neighbours" not in options:
            top_k = options.get("top_k") or (defaults.top_k if defaults is not None else None)
            options["neighbours"] = min(self.config.neighbours, top_k) if top_k else self.config.neighbours
        options.setdefault("top_cells", self.config.top_cells)
        result = self.client.locate(data, **options)
        scale = options.get("conf_scale_km", defaults.conf_scale_km if defaults is not None else None)
        threshold = options.get("conf_threshold", defaults.conf_threshold if defaults is not None else None)
        return {
            "result": result.to_dict(),
            "verdict": messages.verdict(result.localizable),
            "conf_scale_km": scale,
            "conf_threshold": threshold,
            "upload": {"format": fmt, "bytes": len(data)},
        }


def _error_body(code: str, title: str, message: str, reason: str = "") -> dict[str, str]:
    """The one shape of every error the API answers: {"error": {code, title, message, reason}}."""
    return {"code": code, "title": title, "message": message, "reason": reason}


class Handler(BaseHTTPRequestHandler):
    server: WebServer
    server_version = f"visloc-web/{__version__}"
    sys_version = ""
    # Seconds a socket read may block: a stalled client cannot hold a thread for long.
    timeout = 30

    # --- responses -------------------------------------------------------------------------

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", self.server.app.csp)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Permissions-Policy", "camera=(), microphone=(), geolocation=(), interest-cohort=()")
        super().end_headers()

    def _send(self, status: int, body: bytes, ctype: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self._send(status, body, "application/json", {"Cache-Control": "no-store"})

    def _error(self, status: int, error: dict[str, Any]) -> None:
        self._json(status, {"error": error})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unsupported method) as JSON too."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        self.close_connection = True
        self._error(code, _error_body(phrase.upper().replace(" ", "_"), phrase, message or phrase))

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        # The request line and status only: never bodies, never image bytes.
        sys.stderr.write(f"visloc-web {self.address_string()} {format % args}\n")

    # --- routes ----------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlsplit(self.path).path
        if path == "/":
            path = "/static/index.html"
        if path in self.server.app.static:
            data, ctype, etag = self.server.app.static[path]
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send(200, data, ctype, {"ETag": etag, "Cache-Control": "no-cache"})
        elif path == "/api/info":
            status, payload = self.server.app.info_payload()
            self._json(status, payload)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8", {"Cache-Control": "no-store"})
        elif path == "/api/locate":
            self._error(405, _error_body("METHOD_NOT_ALLOWED", "Use POST", "POST the image to /api/locate."))
        else:
            self._error(404, _error_body("NOT_FOUND", "Not found", path))

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        self._drained = False
        split = urlsplit(self.path)
        if split.path != "/api/locate":
            self._discard_body()
            self._error(404, _error_body("NOT_FOUND", "Not found", split.path))
            return
        app = self.server.app
        if not app.slots.acquire(timeout=app.config.busy_wait_s):
            self._discard_body()
            busy = "Too many photos are being located. Try again in a moment."
            self._error(503, _error_body("BUSY", "The web app is busy", busy))
            return
        try:
            self._locate(app, split.query)
        finally:
            app.slots.release()

    def _locate(self, app: WebApp, query: str) -> None:
        try:
            options = parse_options(parse_qs(query))
            ctype = self.headers.get("Content-Type")
            if self.headers.get("Transfer-Encoding"):
                raise UploadError(
                    411, "LENGTH_REQUIRED", "No upload size given", "Send the image with a Content-Length, not chunked."
                )
            length = self._content_length()
            upload.check_declared_length(length, app.upload_limit(), multipart=upload.is_multipart(ctype))
            body = self.rfile.read(length)
            self._drained = True
            if len(body) != length:
                raise UploadError(400, "INCOMPLETE", "The upload was cut short", "Try again.")
            payload = app.locate(upload.extract_image(ctype, body), options)
        except UploadError as err:
            self._discard_body()
            self._error(err.status, err.to_dict())
            return
        except LocateError as err:
            status, error = messages.service_error(err)
            self._error(status, error)
            return
        except (TimeoutError, ConnectionError):
            self.close_connection = True
            return
        self._json(200, payload)

    def _content_length(self) -> int | None:
        raw = self.headers.get("Content-Length")
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            raise UploadError(400, "BAD_LENGTH", "Bad upload size", "Content-Length is not a number.") from None
        return value

    def _discard_body(self) -> None:
        """Read (and drop) a refused body of modest size, so that the browser sees the answer
        instead of a reset connection; larger ones just close the connection."""
        self.close_connection = True
        if self._drained:
            return
        self._drained = True
        try:
            remaining = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        if remaining > 4 * self.server.app.config.max_upload_bytes:
            return
        try:
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 64 * 1024))
                if not chunk:
                    return
                remaining -= len(chunk)
        except OSError:
            return


class WebServer(ThreadingHTTPServer):
    """The HTTP server; ``url`` is where the page is."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: WebApp, host: str = "127.0.0.1", port: int = 8080) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.app = app
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        if ":" in str(host):
            host = f"[{host}]"
        return f"http://{host}:{port}/"


def start(app: WebApp, host: str = "127.0.0.1", port: int = 8080) -> WebServer:
    """Serve ``app`` on a daemon thread; ``server.shutdown()`` then ``server.server_close()``
    stop it (``make demo`` runs the page next to the service this way)."""
    server = WebServer(app, host, port)
    threading.Thread(target=server.serve_forever, args=(0.1,), name="visloc-web", daemon=True).start()
    return server
