"""``visloc web``: its flags and the serving loop (the CLI builds the client)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from visloc_client.client import LocatorClient
from visloc_client.errors import LocateError
from visloc_client.web.app import MiB, WebApp, WebConfig

EXTRA_HINT = 'visloc web needs the web extra: pip install "visloc-client[web]"'


# The page's flags: (flag, type, environment variable or None, default, help). The help says
# the variable and the default, so they are written once, here.
_FLAGS: tuple[tuple[str, type, str | None, object, str], ...] = (
    ("--host", str, "VISLOC_WEB_HOST", "127.0.0.1", "address to listen on (0.0.0.0 in containers)"),
    ("--port", int, "VISLOC_WEB_PORT", 8080, "HTTP port"),
    ("--max-upload-mb", float, "VISLOC_WEB_MAX_UPLOAD_MB", 10.0,
     "largest photo accepted, in MiB (lowered to the service's own limit if that is smaller)"),
    ("--neighbours", int, None, 10, "background neighbours shown as evidence (at most the service's top_k)"),
    ("--top-cells", int, None, 5, "most probable cells shown"),
    ("--max-concurrent", int, None, 8, "photos located at once"),
    ("--max-connections", int, "VISLOC_WEB_MAX_CONNECTIONS", 64, "open connections; more are answered 503"),
    ("--allowed-hosts", str, "VISLOC_WEB_ALLOWED_HOSTS", "",
     "comma-separated Host names served besides loopback, e.g. the public name behind a reverse proxy; "
     "*.example.org for subdomains, * for any (default: loopback only; others get 421)"),
    ("--body-timeout-s", float, "VISLOC_WEB_BODY_TIMEOUT_S", 120.0,
     "an upload must arrive within this (and after 10 s at 16 KiB/s at least), else 408"),
    ("--tiles-url", str, "VISLOC_WEB_TILES_URL", None,
     "optional raster tiles under the map, e.g. https://tiles.example.org/{z}/{x}/{y}.png "
     "(default: none, the offline world outline only)"),
    ("--tiles-attribution", str, "VISLOC_WEB_TILES_ATTRIBUTION", "",
     "attribution shown under the map when tiles are used"),
    ("--grace-s", float, "VISLOC_WEB_GRACE_S", 10.0, "on SIGTERM, seconds to let uploads in progress finish"),
    ("--tiles-max-zoom", int, None, 18, "highest tile zoom level"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("web page")
    for flag, kind, var, default, text in _FLAGS:
        raw = os.environ.get(var) if var else None
        value = kind(raw) if raw else default  # an empty variable means the default
        notes = ([f"env {var}"] if var else []) + ([f"default {default}"] if default not in ("", None) else [])
        g.add_argument(flag, type=kind, default=value, help=f"{text} ({'; '.join(notes)})" if notes else text)


def config_from_args(args: argparse.Namespace) -> WebConfig:
    return WebConfig(
        max_upload_bytes=int(args.max_upload_mb * MiB),
        neighbours=args.neighbours,
        top_cells=args.top_cells,
        max_concurrent=args.max_concurrent,
        max_connections=args.max_connections,
        allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
        body_timeout_s=args.body_timeout_s,
        tiles_url=args.tiles_url,
        tiles_attribution=args.tiles_attribution,
        tiles_max_zoom=args.tiles_max_zoom,
    )


def serve(args: argparse.Namespace, client: LocatorClient) -> int:
    """Serve until SIGINT/SIGTERM; raises ValueError (bad settings, no web extra) or OSError
    (port)."""
    config = config_from_args(args)
    try:
        from visloc_client.web.server import WebServer
    except ImportError as err:
        raise ValueError(f"{EXTRA_HINT} ({err})") from None
    with client:
        app = WebApp(client, config)
        server = WebServer(app, args.host, args.port, grace_s=args.grace_s)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        thread = threading.Thread(target=server.serve_forever, name="visloc-web", daemon=True)
        thread.start()
        print(f"visloc web: serving {server.url}", flush=True)
        try:
            info = client.info()
            print(
                f"visloc web: Locate service {args.target}: {info.model_name} {info.model_version}, "
                f"bundle {info.bundle_id} ({info.bundle_source})",
                file=sys.stderr,
            )
            if info.bundle_warning:
                print(f"visloc web: WARNING: {info.bundle_warning}", file=sys.stderr)
        except LocateError as err:
            print(
                f"visloc web: the Locate service at {args.target} does not answer yet "
                f"({err.code.name}: {err.reason}); the page will say so",
                file=sys.stderr,
            )
        try:
            while not stop.wait(1.0):
                pass
        finally:
            # Stop accepting, let the photos being located finish (SIGTERM in a rollout).
            server.shutdown(args.grace_s + 5)
            server.server_close()
            thread.join(5)
    return 0
