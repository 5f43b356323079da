"""A request's options with the service's defaults applied and every range checked."""

from __future__ import annotations

import math
from dataclasses import dataclass

from visloc_client.v1 import locator_pb2 as pb

from .config import Settings
from .errors import InvalidArgument

MAX_TOP_K = 1000
MAX_TOP_CELLS = 100
MAX_EPS_KM = 20_015.1  # half the Earth's circumference
MAX_CLAIMS = 16


@dataclass(frozen=True)
class Options:
    """What SwC and PD run with (defaults resolved), and how much of it the reply shows."""

    top_k: int
    eps_km: float
    conf_scale_km: float  # one of the served PD scales
    conf_threshold: float

    return_neighbours: int  # <= top_k
    return_top_cells: int
    claims: tuple[tuple[float, float], ...] = ()  # (lat, lon) degrees, checked
    claim_radius_km: float = 25.0
    claim_neighbours: int = 0


def resolve_options(req: pb.LocateOptions, settings: Settings, scales: tuple[float, ...]) -> Options:
    """Apply defaults and check ranges; a bad value is an INVALID_ARGUMENT naming it."""
    top_k = req.top_k if req.HasField("top_k") else settings.top_k
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be in [1, {MAX_TOP_K}], got {top_k}")
    eps = req.eps_km if req.HasField("eps_km") else settings.eps_km
    if not (math.isfinite(eps) and 0 < eps <= MAX_EPS_KM):
        raise InvalidArgument(f"eps_km must be in (0, {MAX_EPS_KM}], got {eps}")
    scale = req.conf_scale_km if req.HasField("conf_scale_km") else settings.conf_scale_km
    if scale not in scales:
        raise InvalidArgument(f"conf_scale_km {scale} is not a served PD scale; choose one of {list(scales)}")
    thres = req.conf_threshold if req.HasField("conf_threshold") else settings.conf_threshold
    if not (math.isfinite(thres) and 0 <= thres <= 1):
        raise InvalidArgument(f"conf_threshold must be in [0, 1], got {thres}")
    if req.return_neighbours > top_k:
        raise InvalidArgument(f"return_neighbours ({req.return_neighbours}) cannot exceed top_k ({top_k})")
    if req.return_top_cells > MAX_TOP_CELLS:
        raise InvalidArgument(f"return_top_cells must be in [0, {MAX_TOP_CELLS}], got {req.return_top_cells}")
    if len(req.claims) > MAX_CLAIMS:
        raise InvalidArgument(f"at most {MAX_CLAIMS} claims a request, got {len(req.claims)}")
    for i, claim in enumerate(req.claims):
        if not (
            math.isfinite(claim.lat) and math.isfinite(claim.lon) and abs(claim.lat) <= 90 and abs(claim.lon) <= 180
        ):
            raise InvalidArgument(
                f"claims[{i}] ({claim.lat}, {claim.lon}): latitude must be in [-90, 90] and longitude in [-180, 180]"
            )
    radius = req.claim_radius_km if req.HasField("claim_radius_km") else scale
    if not (math.isfinite(radius) and 0 < radius <= MAX_EPS_KM):
        raise InvalidArgument(f"claim_radius_km must be in (0, {MAX_EPS_KM}], got {radius}")
    if req.claim_neighbours > MAX_TOP_K:
        raise InvalidArgument(f"claim_neighbours must be in [0, {MAX_TOP_K}], got {req.claim_neighbours}")
    claims = tuple((c.lat, c.lon) for c in req.claims)
    return Options(
        top_k, eps, scale, thres, req.return_neighbours, req.return_top_cells, claims, radius, req.claim_neighbours
    )
