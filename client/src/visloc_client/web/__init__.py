"""The web page for the Locate service: drop a photo, see where it was taken, and why.

``visloc web --target HOST:PORT --port 8080`` serves it (docs/web.md). It calls the service
through ``LocatorClient`` like any other client. The server (uvicorn, Starlette and
python-multipart) comes with the ``web`` extra: ``pip install "visloc-client[web]"``.

    from visloc_client import LocatorClient
    from visloc_client.web import WebApp, start

    server = start(WebApp(LocatorClient("127.0.0.1:50051")), "127.0.0.1", 8080)
    print(server.url)            # ... later: server.shutdown(); server.server_close()
"""

from __future__ import annotations

from typing import Any

from visloc_client.web.app import WebApp, WebConfig

__all__ = ["WebApp", "WebConfig", "WebServer", "start"]


def __getattr__(name: str) -> Any:
    # The server needs the `web` extra; `visloc` imports this package for its flags without it.
    if name in ("WebServer", "start"):
        from visloc_client.web import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
