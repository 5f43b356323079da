"""Great-circle geometry exactly as the reference computes it (degrees in, km out).

One implementation: the compiled kernel's (``_kernels.c``), which SwC's clustering and mean use
directly; these wrappers give it numpy's broadcasting for everything else.
"""

from __future__ import annotations

import numpy as np

from . import _kernels

EARTH_RADIUS_KM = 6371.0


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Haversine distance in km; arguments broadcast like numpy arrays.

    Same operation order as the reference. ``a`` is clipped at 1 so antipodal rounding gives
    20015 km instead of the reference's NaN.
    """
    if all(isinstance(x, (float, int)) for x in (lat1, lon1, lat2, lon2)):  # one pair: no broadcasting
        return np.float64(distance_km(lat1, lon1, lat2, lon2))
    args = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (lat1, lon1, lat2, lon2)))
    out = np.empty(args[0].shape, dtype=np.float64)
    _kernels.haversine(*(np.ascontiguousarray(a).reshape(-1) for a in args), out.reshape(-1))
    return out[()]


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance in km between two points, as :func:`haversine_km` computes it."""
    return _kernels.distance_km(lat1, lon1, lat2, lon2)


def latlon_to_unit(latlon: np.ndarray) -> np.ndarray:
    """``[..., 2]`` (lat, lon) degrees -> ``[..., 3]`` unit vectors (reference's latlon_to_cart)."""
    latlon = np.ascontiguousarray(latlon, dtype=np.float64)
    if latlon.shape[-1:] != (2,):
        raise ValueError(f"(lat, lon) pairs expected, got shape {latlon.shape}")
    out = np.empty(latlon.shape[:-1] + (3,), dtype=np.float64)
    _kernels.latlon_to_unit(latlon, out)
    return out
