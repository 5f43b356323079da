"""Great-circle geometry exactly as the reference computes it (degrees in, km out)."""

from __future__ import annotations

import math

import numpy as np

EARTH_RADIUS_KM = 6371.0


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Haversine distance in km; arguments broadcast like numpy arrays.

    Same operation order as the reference. ``a`` is clipped at 1 so antipodal rounding gives
    20015 km instead of the reference's NaN.
    """
    lat1, lon1, lat2, lon2 = map(np.radians, (lat1, lon1, lat2, lon2))
    dlon = lon2 - lon1
    dlat = lat2 - lat1
    a = np.sin(dlat / 2.0) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin(dlon / 2.0) ** 2
    c = 2 * np.arcsin(np.sqrt(np.minimum(a, 1.0)))
    return EARTH_RADIUS_KM * c


def latlon_to_unit(latlon: np.ndarray) -> np.ndarray:
    """``[..., 2]`` (lat, lon) degrees -> ``[..., 3]`` unit vectors (reference's latlon_to_cart)."""
    latlon = np.asarray(latlon, dtype=np.float64)
    lat = latlon[..., 0] / 180 * math.pi
    lon = latlon[..., 1] / 180 * math.pi
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def unit_to_latlon(v: np.ndarray) -> tuple[float, float]:
    """A (not necessarily unit) 3-vector -> (lat, lon) degrees, WITHOUT renormalising.

    lat = asin(z), lon = atan2(y, x), as the reference's cart_to_latlon does.
    """
    x, y, z = (float(c) for c in v)
    lat = math.asin(max(-1.0, min(1.0, z))) / math.pi * 180
    lon = math.atan2(y, x) / math.pi * 180
    return lat, lon
