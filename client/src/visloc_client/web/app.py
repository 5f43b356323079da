"""The web app's logic: settings, the static files, the service info cache and one locate call.

No HTTP here (``visloc_client.web.asgi`` is the HTTP layer, ``visloc_client.web.server`` the
server), and nothing beyond the client library: ``visloc`` imports this module for its flags
whether or not the ``web`` extra is installed.

Routes: ``GET /`` the page, ``GET /static/...`` its files (read into memory at start-up, so
no path ever reaches the file system), ``GET /api/info`` what is served and the upload limits,
``POST /api/locate`` an image (raw body, or multipart field ``image``) -> the prediction,
``GET /healthz`` liveness. Uploads are checked (size from Content-Length before reading, type
sniffed from magic bytes) before anything is sent to the service, and held in memory only for
the duration of the call: nothing is written to disk or logged.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from visloc_client import __version__, limits
from visloc_client.client import LocatorClient
from visloc_client.errors import LocateError
from visloc_client.limits import FLOAT_OPTIONS, INT_OPTIONS, MAX_TOP_CELLS, MAX_TOP_K, RANGES, option_error
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
    # Uploads located at once (after their body is read); more wait up to ``busy_wait_s``,
    # then get 503.
    max_concurrent: int = 8
    busy_wait_s: float = 10.0
    # Open connections; more are answered 503 and closed at once.
    max_connections: int = 64
    # Upload bytes held in memory at once, over all requests (0: 2 x max_concurrent uploads);
    # a request that would go beyond gets 503 BUSY.
    max_buffered_bytes: int = 0
    # Time limits: the request line and headers (and the draining of a refused body) within
    # ``header_timeout_s``; the whole body within ``body_timeout_s``, and after the first
    # ``body_grace_s`` at ``min_body_rate`` bytes/s on average, else 408.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 120.0
    body_grace_s: float = 10.0
    min_body_rate: int = 16 * 1024
    # Host header names accepted besides loopback (localhost, 127.0.0.0/8, ::1): the public
    # name behind a reverse proxy, e.g. ("visloc.example.org",); "*.example.org" matches the
    # subdomains; "*" accepts any (DNS rebinding then is the proxy's problem).
    allowed_hosts: tuple[str, ...] = ()
    # Optional raster tiles ("https://tile.example.org/{z}/{x}/{y}.png"): off by default; the
    # page then draws the offline Natural Earth outline only.
    tiles_url: str | None = None
    tiles_attribution: str = ""
    tiles_max_zoom: int = 18
    info_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_upload_bytes <= 0:
            raise ValueError("max_upload_bytes must be positive")
        if not 0 <= self.neighbours <= MAX_TOP_K:
            raise ValueError(f"neighbours must be in 0..{MAX_TOP_K}")
        if not 0 <= self.top_cells <= MAX_TOP_CELLS:
            raise ValueError(f"top_cells must be in 0..{MAX_TOP_CELLS}")
        if self.max_concurrent < 1 or self.max_connections < 1:
            raise ValueError("max_concurrent and max_connections must be at least 1")
        if self.max_buffered_bytes and self.max_buffered_bytes < self.max_upload_bytes:
            raise ValueError("max_buffered_bytes must hold at least one upload")
        for name in ("busy_wait_s", "header_timeout_s", "body_timeout_s", "body_grace_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds")
        if self.min_body_rate < 1:
            raise ValueError("min_body_rate must be at least 1 byte/s")
        for host in self.allowed_hosts:
            if not _HOST_PATTERN.fullmatch(host):
                raise ValueError(f"allowed host {host!r} is not a host name, address, *.domain or *")
        if self.tiles_url is not None:
            tile_origin(self.tiles_url)  # validates
        if not 0 <= self.tiles_max_zoom <= 22:
            raise ValueError("tiles_max_zoom must be in 0..22")

    @property
    def buffer_budget(self) -> int:
        """Upload bytes held in memory at once, over all requests."""
        return self.max_buffered_bytes or 2 * self.max_concurrent * (self.max_upload_bytes + upload.MULTIPART_OVERHEAD)


_HOST_PATTERN = re.compile(r"\*|(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?|[0-9a-f:.]+", re.IGNORECASE)


def host_allowed(host_header: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header names this server: loopback, or a name in ``allowed``. A foreign
    name is what a DNS-rebinding page in a visitor's browser would send."""
    if host_header is None:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
        if not port.isdigit():
            return False
    host = host.rstrip(".")
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


def security_headers(csp: str) -> list[tuple[str, str]]:
    """The headers every answer carries, the server's own error answers included."""
    return [
        ("Content-Security-Policy", csp),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
        ("Cross-Origin-Resource-Policy", "same-origin"),
        ("Permissions-Policy", "camera=(), microphone=(), geolocation=(), interest-cohort=()"),
    ]


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

# A number as typed: ASCII digits, one dot, an exponent; no "_", spaces, "inf" or "nan".
_INT = re.compile(r"[0-9]{1,12}")
_FLOAT = re.compile(r"[0-9]{0,24}(\.[0-9]{0,24})?([eE][+-]?[0-9]{1,3})?")


def bad_option(name: str, raw: Any) -> UploadError:
    return UploadError(400, "BAD_OPTION", "A setting is not valid", f"{name} must be {RANGES[name]}, got {raw!r}.")


def parse_options(query: Mapping[str, list[str]]) -> dict[str, Any]:
    """Locate options from the query string (unknown names are ignored), each checked against
    the service's range (``visloc_client.limits``) before anything else is done: a 400 naming
    the option, never a protobuf error."""
    options: dict[str, Any] = {}
    for name in INT_OPTIONS + FLOAT_OPTIONS:
        values = query.get(name)
        if not values or values[-1] == "":
            continue
        raw = values[-1]
        pattern = _INT if name in INT_OPTIONS else _FLOAT
        if not pattern.fullmatch(raw) or not any(c.isdigit() for c in raw):
            raise bad_option(name, raw)
        options[name] = int(raw) if name in INT_OPTIONS else float(raw)
        if option_error({name: options[name]}) is not None:
            raise bad_option(name, raw)
    name = option_error(options)  # neighbours against the given top_k
    if name is not None:
        raise bad_option(name, options[name])
    claims = query.get("claim")
    if claims and claims[-1] != "":
        options["claims"] = (parse_claim(claims[-1]),)
    return options


def parse_claim(raw: str) -> tuple[float, float]:
    """``claim=LAT,LON`` (decimal degrees) -> (lat, lon), or a 400 that says what is wrong."""
    try:
        return limits.parse_claim(raw)
    except ValueError as exc:
        raise UploadError(400, "BAD_OPTION", "The claimed location is not valid", f"{exc}.") from None


class WebApp:
    """What the HTTP layer calls (from worker threads: the client is blocking and
    thread-safe); holds the one ``LocatorClient``."""

    def __init__(self, client: LocatorClient, config: WebConfig | None = None) -> None:
        self.client = client
        self.config = config or WebConfig()
        self.csp = content_security_policy(self.config)
        self.static = _load_static()
        self._info_lock = threading.Lock()
        self._info: tuple[float, ServiceInfo] | None = None
        self._info_failed = -math.inf  # when GetInfo last failed (monotonic)

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

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The page's defaults added (neighbours capped at top_k), then every option checked
        against the service's ranges and served scales; ``UploadError`` 400 names the one."""
        info = self.cached_info()
        defaults = info.defaults if info is not None else None
        options = dict(options)
        if "neighbours" not in options:
            top_k = options.get("top_k") or (defaults.top_k if defaults is not None else None)
            options["neighbours"] = min(self.config.neighbours, top_k) if top_k else self.config.neighbours
        options.setdefault("top_cells", self.config.top_cells)
        if options.get("claims"):  # the photos near the claim, as many as the page shows neighbours
            options.setdefault("claim_neighbours", self.config.neighbours)
        name = option_error(
            options,
            default_top_k=defaults.top_k if defaults is not None else None,
            pd_scales_km=info.pd_scales_km if info is not None else (),
        )
        if name is not None:
            raise bad_option(name, options[name])
        return options

    def locate(self, data: bytes, options: dict[str, Any]) -> dict[str, Any]:
        """Check ``data`` and locate it; raises ``UploadError`` or ``LocateError``."""
        fmt = upload.check_image(data, self.upload_limit())
        options = self.resolve_options(options)
        info = self.cached_info()
        defaults = info.defaults if info is not None else None
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
