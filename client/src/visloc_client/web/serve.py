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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    g = parser.add_argument_group("web page")
    g.add_argument(
        "--host",
        default=env("VISLOC_WEB_HOST", "127.0.0.1"),
        help="address to listen on (env VISLOC_WEB_HOST; default 127.0.0.1; 0.0.0.0 in containers)",
    )
    g.add_argument(
        "--port",
        type=int,
        default=int(env("VISLOC_WEB_PORT", "8080")),
        help="HTTP port (env VISLOC_WEB_PORT; default 8080)",
    )
    g.add_argument(
        "--max-upload-mb",
        type=float,
        default=float(env("VISLOC_WEB_MAX_UPLOAD_MB", "10")),
        help="largest photo accepted, in MiB (env VISLOC_WEB_MAX_UPLOAD_MB; default 10; "
        "lowered to the service's own limit if that is smaller)",
    )
    g.add_argument(
        "--neighbours",
        type=int,
        default=10,
        help="background neighbours shown as evidence (default 10, at most the service's top_k)",
    )
    g.add_argument("--top-cells", type=int, default=5, help="most probable cells shown (default 5)")
    g.add_argument("--max-concurrent", type=int, default=8, help="photos located at once (default 8)")
    g.add_argument(
        "--max-connections",
        type=int,
        default=int(env("VISLOC_WEB_MAX_CONNECTIONS", "64")),
        help="open connections; more are answered 503 (env VISLOC_WEB_MAX_CONNECTIONS; default 64)",
    )
    g.add_argument(
        "--allowed-hosts",
        default=env("VISLOC_WEB_ALLOWED_HOSTS", ""),
        help="comma-separated Host names served besides loopback, e.g. the public name behind a "
        "reverse proxy; *.example.org for subdomains, * for any (env VISLOC_WEB_ALLOWED_HOSTS; "
        "default: loopback only; others get 421)",
    )
    g.add_argument(
        "--body-timeout-s",
        type=float,
        default=float(env("VISLOC_WEB_BODY_TIMEOUT_S", "120")),
        help="an upload must arrive within this (and after 10 s at 16 KiB/s at least), else 408 "
        "(env VISLOC_WEB_BODY_TIMEOUT_S; default 120)",
    )
    g.add_argument(
        "--tiles-url",
        default=env("VISLOC_WEB_TILES_URL") or None,
        help="optional raster tiles under the map, e.g. https://tiles.example.org/{z}/{x}/{y}.png "
        "(env VISLOC_WEB_TILES_URL; default: none, the offline world outline only)",
    )
    g.add_argument(
        "--tiles-attribution",
        default=env("VISLOC_WEB_TILES_ATTRIBUTION", ""),
        help="attribution shown under the map when tiles are used",
    )
    g.add_argument(
        "--grace-s",
        type=float,
        default=float(env("VISLOC_WEB_GRACE_S", "10")),
        help="on SIGTERM, seconds to let uploads in progress finish (env VISLOC_WEB_GRACE_S; default 10)",
    )
    g.add_argument("--tiles-max-zoom", type=int, default=18, help="highest tile zoom level (default 18)")


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
