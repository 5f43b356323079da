"""The ranges of the Locate options, as the service checks them (locator.proto comments).

Defined once here, in the client package, so that a caller can refuse a bad value before any
protobuf is built: a value beyond 32 bits would otherwise make protobuf raise, and one in
range for protobuf but not for the service costs a round trip to learn it. The service
answers INVALID_ARGUMENT for the same ranges (it may share these constants: the dependency
points from the service to the client).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

MAX_TOP_K = 1000
MAX_TOP_CELLS = 100
MAX_EPS_KM = 20_015.1  # half the Earth's circumference

INT_OPTIONS = ("top_k", "neighbours", "top_cells")
FLOAT_OPTIONS = ("eps_km", "conf_scale_km", "conf_threshold")

# What each range is, in words, for error messages.
RANGES = {
    "top_k": f"an integer in 1..{MAX_TOP_K}",
    "neighbours": f"an integer in 0..top_k (at most {MAX_TOP_K})",
    "top_cells": f"an integer in 0..{MAX_TOP_CELLS}",
    "eps_km": f"a number in (0, {MAX_EPS_KM}]",
    "conf_scale_km": "one of the served PD scales (km)",
    "conf_threshold": "a number in [0, 1]",
}


def option_error(
    options: dict[str, Any], *, default_top_k: int | None = None, pd_scales_km: Sequence[float] = ()
) -> str | None:
    """The name of the first option out of its range (None when all are fine).

    ``default_top_k`` (the service's default) bounds ``neighbours`` when ``top_k`` is not
    given; ``pd_scales_km`` (the served scales), when known, is the set ``conf_scale_km`` must
    come from. Values must already be ``int`` / ``float``."""
    top_k = options.get("top_k")
    checks = {
        "top_k": lambda v: 1 <= v <= MAX_TOP_K,
        "neighbours": lambda v: 0 <= v <= min(MAX_TOP_K, top_k or default_top_k or MAX_TOP_K),
        "top_cells": lambda v: 0 <= v <= MAX_TOP_CELLS,
        "eps_km": lambda v: math.isfinite(v) and 0 < v <= MAX_EPS_KM,
        "conf_scale_km": lambda v: math.isfinite(v) and v > 0 and (not pd_scales_km or v in pd_scales_km),
        "conf_threshold": lambda v: math.isfinite(v) and 0 <= v <= 1,
    }
    for name, ok in checks.items():
        if name in options and options[name] is not None and not ok(options[name]):
            return name
    return None


# A claimed place as people type it: decimal degrees, south and west negative; at most 12
# decimals (0.1 um), so a text cannot be longer than 34 characters.
_CLAIM = re.compile(r"(-?[0-9]{1,2}(?:\.[0-9]{1,12})?),(-?[0-9]{1,3}(?:\.[0-9]{1,12})?)")


def parse_claim(text: str) -> tuple[float, float]:
    """``LAT,LON`` (``48.8584,2.2945``, ``-33.8568,151.2153``) -> (lat, lon); the CLI's ``--claim``
    and the web page's ``claim=`` both read it here. ValueError says what is wrong."""
    m = _CLAIM.fullmatch(text)
    if m is None:
        raise ValueError(
            f"claim must be LAT,LON in decimal degrees, e.g. 48.8584,2.2945 or -33.8568,151.2153; got {text[:40]!r}"
        )
    lat, lon = float(m.group(1)), float(m.group(2))
    if abs(lat) > 90 or abs(lon) > 180:
        raise ValueError(f"claim must be LAT,LON with latitude -90 to 90 and longitude -180 to 180; got {text[:40]!r}")
    return lat, lon
