"""The web page for the Locate service: drop a photo, see where it was taken, and why.

``visloc web --target HOST:PORT --port 8080`` serves it (docs/web.md). It calls the service
through ``LocatorClient`` like any other client; standard library only.

    from visloc_client import LocatorClient
    from visloc_client.web import WebApp, start

    server = start(WebApp(LocatorClient("127.0.0.1:50051")), "127.0.0.1", 8080)
    print(server.url)            # ... later: server.shutdown(); server.server_close()
"""

from visloc_client.web.app import WebApp, WebConfig, WebServer, start

__all__ = ["WebApp", "WebConfig", "WebServer", "start"]
