"""Client library and CLI for the visloc Locate gRPC service.

from visloc_client import LocatorClient

with LocatorClient("127.0.0.1:50051") as client:
    result = client.locate("photo.jpg", neighbours=5)
    print(result.lat, result.lon, result.confidence, result.localizable)
"""

__version__ = "0.1.0"

from visloc_client._common import Claimed, RetryPolicy, TLSConfig  # noqa: E402
from visloc_client.aio import AsyncLocatorClient  # noqa: E402
from visloc_client.client import LocatorClient  # noqa: E402
from visloc_client.errors import LocateError  # noqa: E402
from visloc_client.overload import AdaptiveThrottle, RetryBudget  # noqa: E402
from visloc_client.results import (  # noqa: E402
    BatchItem,
    Cell,
    ClaimCheck,
    ClaimNeighbour,
    LocateOptionArgs,
    LocateOptions,
    LocateResult,
    Method,
    Neighbour,
    ScaleDensity,
    ServiceInfo,
    Timings,
)

__all__ = [
    "AdaptiveThrottle",
    "AsyncLocatorClient",
    "BatchItem",
    "Cell",
    "ClaimCheck",
    "Claimed",
    "ClaimNeighbour",
    "LocateError",
    "LocateOptionArgs",
    "LocateOptions",
    "LocateResult",
    "LocatorClient",
    "Method",
    "Neighbour",
    "RetryBudget",
    "RetryPolicy",
    "ScaleDensity",
    "ServiceInfo",
    "TLSConfig",
    "Timings",
    "__version__",
]
