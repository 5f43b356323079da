"""Search within Cell (SwC) and Prediction Density (PD): the method of the papers.

Plain functions over numpy arrays, used by the service, the tests and the benchmarks.
Semantics (SPEC.md sections 3-4, the reference code):

* top cell: ``argmax(cell_probs)``, first index on ties;
* SwC: cosine similarity of the query embedding to the rows of the top cell, the ``top_k``
  most similar first (ties: lower row position, i.e. lower upstream row id, first);
  DBSCAN(min_samples=1, haversine, eps km) over their labels, which is exactly the connected
  components of the graph ``distance <= eps``, clusters numbered in candidate order; the
  largest cluster wins, the lowest label on a tie; the prediction is the mean of its members'
  unit vectors mapped back WITHOUT renormalising;
* PD(s): the sum of the probabilities of all cells within ``s`` km (``<=``) of the top cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .geo import EARTH_RADIUS_KM, haversine_km, latlon_to_unit, unit_to_latlon

DEFAULT_TOP_K = 10
DEFAULT_EPS_KM = 1.0
DEFAULT_SCALES_KM = (1.0, 25.0, 200.0, 750.0, 2500.0)
DEFAULT_CONF_SCALE_KM = 25.0
DEFAULT_CONF_THRESHOLD = 0.2


def top_cell(cell_probs: np.ndarray) -> int:
    """Index of the most probable cell; numpy's argmax takes the first on ties."""
    return int(np.argmax(cell_probs))


@dataclass(frozen=True)
class SwcResult:
    lat: float
    lon: float
    candidates: np.ndarray  # positions within the cell slice, most similar first
    similarities: np.ndarray  # float32, aligned with candidates
    cluster_labels: np.ndarray  # int, aligned with candidates
    chosen_cluster: int


# float16 -> float32 by table lookup: exact, and about twice as fast as ``astype`` in numpy 1.x
# (whose half-precision casts are scalar loops); float16 is the bundle's default storage.
_HALF_TO_FLOAT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def as_float32(features: np.ndarray) -> np.ndarray:
    if features.dtype == np.float16:
        return np.take(_HALF_TO_FLOAT, np.asarray(features).view(np.uint16))
    return np.asarray(features, dtype=np.float32)


def top_k_by_similarity(
    embedding: np.ndarray, features: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the ``top_k`` rows most similar to ``embedding``, and their similarities.

    Similarities are float32 dot products (the reference's precision); a stable sort puts the
    lower position first among equal similarities.
    """
    sims = as_float32(features) @ embedding.astype(np.float32, copy=False)
    k = min(top_k, sims.shape[0])
    if k < sims.shape[0] and sims.shape[0] > 4 * k:
        # Partial selection, then a stable order over everything at least as similar as the
        # k-th, so ties at the boundary are resolved by position exactly as a full sort would.
        kth = np.partition(sims, sims.shape[0] - k)[sims.shape[0] - k]
        pool = np.flatnonzero(sims >= kth)
        order = pool[np.argsort(-sims[pool], kind="stable")][:k]
    else:
        order = np.argsort(-sims, kind="stable")[:k]
    return order, sims[order]


def cluster_labels(latlon: np.ndarray, eps_km: float) -> np.ndarray:
    """DBSCAN(min_samples=1, metric=haversine, eps) labels: components of ``d <= eps``.

    Labels are numbered in point order: point 0 is in cluster 0, the first point outside it
    starts cluster 1, and so on, as scikit-learn numbers them. Computed by min-label
    propagation with pointer jumping, which converges to the lowest index of each component.
    """
    n = latlon.shape[0]
    lat = latlon[:, 0]
    lon = latlon[:, 1]
    adjacent = haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :]) <= eps_km
    np.fill_diagonal(adjacent, True)
    lowest = np.arange(n)
    while True:
        nxt = np.where(adjacent, lowest[None, :], n).min(axis=1)
        nxt = nxt[nxt]
        if np.array_equal(nxt, lowest):
            break
        lowest = nxt
    return np.unique(lowest, return_inverse=True)[1].astype(np.int64)


def search_within_cell(
    embedding: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    top_k: int = DEFAULT_TOP_K,
    eps_km: float = DEFAULT_EPS_KM,
) -> SwcResult:
    """SwC over one cell's background rows (``features`` ``[n, D]``, ``labels`` ``[n, 2]``, n >= 1)."""
    if features.shape[0] == 0:
        raise ValueError("search_within_cell needs at least one background row")
    order, sims = top_k_by_similarity(embedding, features, top_k)
    candidates = np.asarray(labels[order], dtype=np.float64)
    clusters = cluster_labels(candidates, eps_km)
    chosen = int(np.argmax(np.bincount(clusters)))  # first (lowest label) on a size tie
    members = candidates[clusters == chosen]
    mean = latlon_to_unit(members).sum(axis=0) / members.shape[0]
    lat, lon = unit_to_latlon(mean)
    return SwcResult(lat, lon, order, sims, clusters, chosen)


class DensityIndex:
    """Prediction Density over fixed cell centres, exact and fast.

    ``haversine(c, all) <= s`` is decided by the dot product of unit vectors (monotone in the
    distance) and only cells within a hair's breadth of the boundary (|dot - cos(s/R)| <= 1e-12)
    are settled by the reference haversine itself, so the selected cells, and hence the sums,
    are the reference's.
    """

    BAND = 1e-12

    def __init__(self, centres: np.ndarray, scales_km: tuple[float, ...] = DEFAULT_SCALES_KM):
        centres = np.asarray(centres, dtype=np.float64)
        if centres.ndim != 2 or centres.shape[1] != 2:
            raise ValueError(f"cell centres must be [M, 2], got {centres.shape}")
        if not scales_km or any(not (s > 0 and math.isfinite(s)) for s in scales_km):
            raise ValueError(f"PD scales must be positive km, got {scales_km}")
        self.centres = centres
        self.scales_km = tuple(float(s) for s in scales_km)
        self._units = latlon_to_unit(centres)
        self._thresholds = np.cos(np.asarray(self.scales_km) / EARTH_RADIUS_KM)

    def density(self, cell: int, cell_probs: np.ndarray) -> np.ndarray:
        """PD at every scale for top cell ``cell`` (float64 array aligned with ``scales_km``).

        Work happens on the cells that can be within the largest scale (one pass over all M),
        kept in index order, so each masked sum adds the same float32 values in the same order
        as the reference's ``probs[d <= s].sum()`` and gives the same number, bit for bit.
        """
        dots = self._units @ self._units[cell]
        near = np.flatnonzero(dots >= self._thresholds.min() - self.BAND)
        d, p = dots[near], cell_probs[near]
        out = np.empty(len(self.scales_km), dtype=np.float64)
        for i, (scale, t) in enumerate(zip(self.scales_km, self._thresholds)):
            within = d > t + self.BAND
            band = np.flatnonzero(np.abs(d - t) <= self.BAND)
            if band.size:
                c = self.centres[near[band]]
                within[band] = haversine_km(self.centres[cell, 0], self.centres[cell, 1], c[:, 0], c[:, 1]) <= scale
            out[i] = p[within].sum()
        return out
