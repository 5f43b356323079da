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
import threading
from dataclasses import dataclass

import numpy as np

from . import _kernels
from .geo import EARTH_RADIUS_KM, haversine_km, latlon_to_unit

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


def similarities(embedding: np.ndarray, features: np.ndarray) -> np.ndarray:
    """float32 dot product of every row of ``features`` ``[n, D]`` with ``embedding`` ``[D]``.

    Computed by the compiled kernel straight from the bundle's float16 (or float32) rows, with no
    copy of the cell. Its summation order is fixed (32 partial sums, a fixed reduction tree), so
    the same row always gives the same bits, on every CPU: equal rows tie exactly, and values
    differ from a BLAS product only in the last bits of float32.
    """
    rows = np.ascontiguousarray(features)
    query = np.ascontiguousarray(embedding, dtype=np.float32)
    if rows.ndim != 2 or query.shape != (rows.shape[1],):
        raise ValueError(f"features [n, D] and an embedding [D] expected, got {rows.shape} and {query.shape}")
    out = np.empty(rows.shape[0], dtype=np.float32)
    if rows.shape[0] and rows.shape[1]:
        if rows.dtype == np.float16:
            _kernels.dot_f16(rows, query, out)
        else:
            _kernels.dot_f32(np.ascontiguousarray(rows, dtype=np.float32), query, out)
    else:
        out[:] = 0.0
    return out


def top_k_by_similarity(embedding: np.ndarray, features: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the ``top_k`` rows most similar to ``embedding``, and their similarities.

    A stable order puts the lower position first among equal similarities.
    """
    sims = similarities(embedding, features)
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


def _cluster(candidates: np.ndarray, eps_km: float) -> tuple[np.ndarray, int, float, float]:
    labels = np.empty(candidates.shape[0], dtype=np.int64)
    chosen, _, lat, lon = _kernels.swc_cluster(np.ascontiguousarray(candidates, dtype=np.float64), eps_km, labels)
    return labels, chosen, lat, lon


def cluster_labels(latlon: np.ndarray, eps_km: float) -> np.ndarray:
    """DBSCAN(min_samples=1, metric=haversine, eps) labels: components of ``d <= eps``.

    Labels are numbered in point order: point 0 is in cluster 0, the first point outside it
    starts cluster 1, and so on, as scikit-learn numbers them.
    """
    return _cluster(latlon, eps_km)[0]


def search_within_cell(
    embedding: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    top_k: int = DEFAULT_TOP_K,
    eps_km: float = DEFAULT_EPS_KM,
) -> SwcResult:
    """SwC over one cell's background rows (``features`` ``[n, D]``, ``labels`` ``[n, 2]``, n >= 1).

    The clustering, the choice of the largest cluster (lowest label on a tie) and the mean of
    its unit vectors run in the compiled kernel, with geo.py's arithmetic in the same order.
    """
    if features.shape[0] == 0:
        raise ValueError("search_within_cell needs at least one background row")
    order, sims = top_k_by_similarity(embedding, features, top_k)
    clusters, chosen, lat, lon = _cluster(np.asarray(labels[order], dtype=np.float64), eps_km)
    return SwcResult(lat, lon, order, sims, clusters, chosen)


class DensityIndex:
    """Prediction Density over fixed cell centres, exact and fast.

    ``haversine(c, all) <= s`` is decided by the dot product of unit vectors (monotone in the
    distance) and only cells within a hair's breadth of the boundary (|dot - cos(s/R)| <= 1e-12)
    are settled by the reference haversine itself, so the selected cells, and hence the sums,
    are the reference's. The pass over the cells and the sums run in the compiled kernel.
    """

    BAND = 1e-12

    def __init__(self, centres: np.ndarray, scales_km: tuple[float, ...] = DEFAULT_SCALES_KM):
        centres = np.asarray(centres, dtype=np.float64)
        if centres.ndim != 2 or centres.shape[1] != 2 or centres.shape[0] == 0:
            raise ValueError(f"cell centres must be [M, 2] with M >= 1, got {centres.shape}")
        if not scales_km or any(not (s > 0 and math.isfinite(s)) for s in scales_km):
            raise ValueError(f"PD scales must be positive km, got {scales_km}")
        if len(scales_km) > _kernels.MAX_SCALES:
            raise ValueError(f"at most {_kernels.MAX_SCALES} PD scales, got {len(scales_km)}")
        self.centres = centres
        self.scales_km = tuple(float(s) for s in scales_km)
        self._units = np.ascontiguousarray(latlon_to_unit(centres).T, dtype=np.float64)  # [3, M]
        # The kernel takes the scales largest first (cosines ascending); beyond half the
        # circumference every cell is within, and cos is not monotone past pi.
        self._order = np.argsort(-np.asarray(self.scales_km), kind="stable")
        self._sorted_km = np.asarray(self.scales_km)[self._order]
        self._thresholds = np.cos(np.minimum(self._sorted_km / EARTH_RADIUS_KM, math.pi))
        self._scratch = threading.local()  # per-thread work buffers: the kernels release the GIL

    def _buffers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        bufs = getattr(self._scratch, "bufs", None)
        if bufs is None:
            m = self.centres.shape[0]
            bufs = (
                np.empty(m, dtype=np.int32),  # near cells, in index order
                np.empty(m, dtype=np.uint32),  # level: within the `level` largest scales
                np.empty(m, dtype=np.uint32),  # how many next scales are too close to call
                np.empty(len(self.scales_km) * m, dtype=np.float32),  # each scale's selection
            )
            self._scratch.bufs = bufs
        return bufs

    def density(self, cell: int, cell_probs: np.ndarray) -> np.ndarray:
        """PD at every scale for top cell ``cell`` (float64 array aligned with ``scales_km``).

        ``cell_probs`` are the model's float32 probabilities. Each masked sum adds the same
        float32 values in the same order as the reference's ``probs[d <= s].sum()`` (numpy's
        pairwise summation, replicated in the kernel) and gives the same number, bit for bit.
        """
        m = self.centres.shape[0]
        probs = np.ascontiguousarray(cell_probs)
        if probs.dtype != np.float32 or probs.shape != (m,):
            raise ValueError(f"cell_probs must be float32 [{m}], got {probs.dtype} {probs.shape}")
        if not 0 <= cell < m:
            raise ValueError(f"cell {cell} outside the {m} cells")
        near, levels, unsure, values = self._buffers()
        n_near, n_band = _kernels.pd_select(self._units, cell, self._thresholds, self.BAND, near, levels, unsure)
        if n_band:
            self._settle_boundary(cell, near[:n_near], levels[:n_near], unsure[:n_near])
        sums = np.empty(len(self.scales_km), dtype=np.float64)
        _kernels.pd_sums(probs, near, levels, n_near, sums, values)
        out = np.empty_like(sums)
        out[self._order] = sums
        return out

    def _settle_boundary(self, cell: int, near: np.ndarray, levels: np.ndarray, unsure: np.ndarray) -> None:
        """Cells too close to a threshold for the dot product: the reference haversine decides."""
        for r in np.flatnonzero(unsure):
            c = self.centres[near[r]]
            d = haversine_km(self.centres[cell, 0], self.centres[cell, 1], c[0], c[1])
            first = int(levels[r])
            levels[r] = first + int(np.count_nonzero(d <= self._sorted_km[first : first + int(unsure[r])]))
