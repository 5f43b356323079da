"""Search within Cell (SwC) and Prediction Density (PD): the method of the papers.

Functions over numpy arrays, used by the service, the tests and the benchmarks; their inner
loops are the compiled kernels of ``_kernels.c``. Semantics (SPEC.md sections 3-4, the
reference code):

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
from typing import NamedTuple

import numpy as np

from . import _kernels
from .geo import EARTH_RADIUS_KM, latlon_to_unit

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


def search_within_cell(
    embedding: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    top_k: int = DEFAULT_TOP_K,
    eps_km: float = DEFAULT_EPS_KM,
) -> SwcResult:
    """SwC over one cell's background rows (``features`` ``[n, D]``, ``labels`` ``[n, 2]``, n >= 1).

    One call into the compiled kernel: float32 dot products straight from the bundle's float16
    (or float32) rows, with a fixed summation order (32 partial sums, a fixed reduction tree), so
    a row always gives the same bits on every CPU, equal rows tie exactly, and values differ from
    a BLAS product only in the last bits of float32; the ``top_k`` most similar rows (a stable
    order: the lower position first among equal similarities, NaN last); their clusters,
    DBSCAN(min_samples=1, haversine, eps) numbered in candidate order as scikit-learn numbers
    them; the largest cluster (lowest label on a tie) and the mean of its unit vectors, with
    geo.py's arithmetic in the same order.
    """
    rows = np.ascontiguousarray(features)
    query = np.ascontiguousarray(embedding, dtype=np.float32)
    latlon = np.ascontiguousarray(labels, dtype=np.float64)
    n = rows.shape[0]
    if n == 0:
        raise ValueError("search_within_cell needs at least one background row")
    if rows.ndim != 2 or query.shape != (rows.shape[1],) or rows.shape[1] == 0 or latlon.shape != (n, 2):
        raise ValueError(
            f"features [n, D], labels [n, 2] and an embedding [D] expected, got {rows.shape}, {latlon.shape}, "
            f"{query.shape}"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    half = rows.dtype == np.float16
    if not half:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
    k = min(top_k, n)
    order = np.empty(k, dtype=np.int64)
    sims = np.empty(k, dtype=np.float32)
    clusters = np.empty(k, dtype=np.int64)
    chosen, _, lat, lon = _kernels.swc(rows, half, latlon, query, eps_km, order, sims, clusters)
    return SwcResult(lat, lon, order, sims, clusters, chosen)


class PointDensity(NamedTuple):
    """The mass around a point at every scale, and the cell nearest it: by the reference
    haversine (the dot product ranks, near-ties go to haversine; distances within a micrometre,
    as two centres mirrored across the antimeridian give, are a tie: the lower id), its distance
    in km and its rank by probability (1 + the cells more probable, or as probable with a lower
    id: the order of top cells and argmax)."""

    mass: np.ndarray  # float64, aligned with scales_km
    cell: int
    cell_km: float
    rank: int


class DensityIndex:
    """Prediction Density over fixed cell centres, exact and fast.

    ``haversine(c, all) <= s`` is decided by the dot product of unit vectors (monotone in the
    distance) and only cells within a hair's breadth of the boundary (|dot - cos(s/R)| <= 1e-12)
    are settled by the reference haversine itself, so the selected cells, and hence the sums,
    are the reference's. The cells are indexed by a 5-degree grid, each group with the
    spherical cap that holds it, so a query touches only the groups that reach the largest
    scale; the selection and the sums run in the compiled kernel.
    """

    BAND = 1e-12
    GRID_DEG = 5.0
    CAP_MARGIN_RAD = 1e-6  # ~6 m added to every group's radius: the skip test stays conservative

    def __init__(self, centres: np.ndarray, scales_km: tuple[float, ...] = DEFAULT_SCALES_KM):
        centres = np.ascontiguousarray(centres, dtype=np.float64)
        if centres.ndim != 2 or centres.shape[1] != 2 or centres.shape[0] == 0:
            raise ValueError(f"cell centres must be [M, 2] with M >= 1, got {centres.shape}")
        if not np.all(np.isfinite(centres)) or np.any(np.abs(centres[:, 0]) > 90):
            raise ValueError("cell centres must be finite, with latitudes in [-90, 90]")
        if centres.shape[0] >= 2**31:
            raise ValueError(f"at most 2^31 - 1 cells, got {centres.shape[0]}")
        if not scales_km or any(not (s > 0 and math.isfinite(s)) for s in scales_km):
            raise ValueError(f"PD scales must be positive km, got {scales_km}")
        if len(scales_km) > _kernels.MAX_SCALES:
            raise ValueError(f"at most {_kernels.MAX_SCALES} PD scales, got {len(scales_km)}")
        self.centres = centres
        self.scales_km = tuple(float(s) for s in scales_km)
        # The kernel takes the scales largest first (cosines ascending); beyond half the
        # circumference every cell is within, and cos is not monotone past pi.
        self._order = np.argsort(-np.asarray(self.scales_km), kind="stable").astype(np.int64)
        self._sorted_km = np.ascontiguousarray(np.asarray(self.scales_km)[self._order])
        angles = np.minimum(self._sorted_km / EARTH_RADIUS_KM, math.pi)
        self._thresholds = np.cos(angles)
        self._theta_max = float(angles[0])
        self._index = self._build_index(centres)
        self._scratch = threading.local()  # per-thread work buffers: the kernels release the GIL

    @classmethod
    def _build_index(cls, centres: np.ndarray) -> tuple[np.ndarray, ...]:
        """Cells grouped by grid square: (units [3, M] in group order, cell index at each
        position, position of each cell, group starts [G + 1], caps [G, 6])."""
        m = centres.shape[0]
        rows = np.clip(np.floor((centres[:, 0] + 90.0) / cls.GRID_DEG), 0, 180 / cls.GRID_DEG - 1)
        cols = np.clip(np.floor(np.mod(centres[:, 1] + 180.0, 360.0) / cls.GRID_DEG), 0, 360 / cls.GRID_DEG - 1)
        group = (rows * (360 / cls.GRID_DEG) + cols).astype(np.int64)
        cell_at = np.argsort(group, kind="stable")
        grouped = group[cell_at]
        firsts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        starts = np.r_[firsts, m]
        units = latlon_to_unit(centres)[cell_at]  # [M, 3] in group order
        centre = np.add.reduceat(units, firsts, axis=0)
        centre /= np.linalg.norm(centre, axis=1, keepdims=True)  # a grid square spans < 90 degrees
        member_of = np.repeat(np.arange(len(firsts)), np.diff(starts))
        spread = np.arccos(np.clip(np.einsum("ij,ij->i", units, centre[member_of]), -1.0, 1.0))
        radius = np.maximum.reduceat(spread, firsts) + cls.CAP_MARGIN_RAD
        caps = np.column_stack([centre, np.cos(radius), np.sin(radius), radius])
        position_of = np.empty(m, dtype=np.int32)
        position_of[cell_at] = np.arange(m, dtype=np.int32)
        index = (
            np.ascontiguousarray(units.T),
            cell_at.astype(np.int32),
            position_of,
            starts.astype(np.int32),
            np.ascontiguousarray(caps),
        )
        for array in index:
            array.flags.writeable = False  # the kernel trusts this structure: nothing may change it
        return index

    def _buffers(self) -> tuple[np.ndarray, ...]:
        """Per thread (the kernels release the GIL): near cells, their levels, the sums' scratch,
        and each origin's bitmap of selected cells (all zero between kernel calls)."""
        bufs = getattr(self._scratch, "bufs", None)
        if bufs is None:
            m = self.centres.shape[0]
            bufs = (
                np.empty(m, dtype=np.int32),  # cells_within: the cells, in id order
                np.empty(m, dtype=np.uint8),  # cells_within: their levels
                np.empty(len(self.scales_km) * m, dtype=np.float32),  # pd_mass: the selections' ids, values, levels
                np.zeros(_kernels.MAX_ORIGINS * ((m + 63) // 64), dtype=np.uint64),  # one bitmap per origin
            )
            self._scratch.bufs = bufs
        return bufs

    def density(self, cell: int, cell_probs: np.ndarray) -> np.ndarray:
        """PD at every scale for top cell ``cell`` (float64 array aligned with ``scales_km``).

        ``cell_probs`` are the model's float32 probabilities. Each masked sum adds the same
        float32 values in the same order as the reference's ``probs[d <= s].sum()`` (numpy's
        pairwise summation, replicated in the kernel) and gives the same number, bit for bit.
        """
        return self.densities(cell, (), cell_probs)[0]

    def density_at(self, lat: float, lon: float, cell_probs: np.ndarray) -> PointDensity:
        """The same sums around any point (a claimed location), with the cell nearest the point
        and its rank: :meth:`densities` for one point and no cell."""
        return self.densities(None, ((lat, lon),), cell_probs)[1][0]

    def densities(
        self, cell: int | None, points: tuple[tuple[float, float], ...], cell_probs: np.ndarray
    ) -> tuple[np.ndarray | None, tuple[PointDensity, ...]]:
        """PD around top cell ``cell`` and the mass around each point (a claimed location) by the
        same rules (dot products, the boundary settled by the reference haversine, numpy's float32
        summation), with each point's nearest cell and its rank, in one kernel call: one pass
        over the cell index for all of them. A point within 1/25 of the largest scale of the
        cell (a claim near the prediction) reuses the cell's selection: the triangle inequality
        settles its levels from the cell's dot products except in thin bands around each
        boundary, where its own decide, and it is summed again only at the scales where a cell
        in a band changes its selection; the result is the point's computed alone, bit for bit."""
        m = self.centres.shape[0]
        probs = np.ascontiguousarray(cell_probs)
        if probs.dtype != np.float32 or probs.shape != (m,):
            raise ValueError(f"cell_probs must be float32 [{m}], got {probs.dtype} {probs.shape}")
        if cell is not None and not 0 <= cell < m:
            raise ValueError(f"cell {cell} outside the {m} cells")
        if len(points) + (cell is not None) > _kernels.MAX_ORIGINS:
            raise ValueError(f"at most {_kernels.MAX_ORIGINS - 1} points with a cell, got {len(points)}")
        rows = [(float(cell), 0.0, 0.0)] if cell is not None else []
        for lat, lon in points:
            lat, lon = float(lat), float(lon)
            if not (math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180):
                raise ValueError(f"a point needs lat in [-90, 90] and lon in [-180, 180], got ({lat}, {lon})")
            rows.append((-1.0, lat, lon))
        if not rows:
            return None, ()
        origins = np.array(rows, dtype=np.float64)
        n = len(rows)
        out = np.empty((n, len(self.scales_km)), dtype=np.float64)
        nearest, rank = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        km = np.empty(n, dtype=np.float64)
        _, _, values, bitmap = self._buffers()
        _kernels.pd_mass(
            *self._index, self.centres, self._theta_max, self._thresholds, self._sorted_km, self.BAND, bitmap,
            self._codes(n), probs, self._order, values, origins, out, nearest, km, rank,
        )  # fmt: skip
        first = 1 if cell is not None else 0
        at = tuple(map(PointDensity, out[first:], nearest[first:].tolist(), km[first:].tolist(), rank[first:].tolist()))
        return (out[0] if cell is not None else None), at

    def _codes(self, origins: int) -> np.ndarray:
        """Per thread: one byte per cell per origin, all zero between kernel calls."""
        codes = getattr(self._scratch, "codes", None)
        need = origins * self.centres.shape[0]
        if codes is None or len(codes) < need:
            codes = self._scratch.codes = np.zeros(need, dtype=np.uint8)
        return codes

    def cells_within(self, lat: float, lon: float, km: float) -> np.ndarray:
        """The cells whose centre lies within ``km`` of (lat, lon) (``<=``, exact as PD), ascending:
        the same selection kernel with one threshold, the boundary settled by the reference haversine."""
        if not (km > 0 and math.isfinite(km)):
            raise ValueError(f"a radius must be positive km, got {km}")
        if not (math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180):
            raise ValueError(f"a point needs lat in [-90, 90] and lon in [-180, 180], got ({lat}, {lon})")
        angle = min(km / EARTH_RADIUS_KM, math.pi)
        near, levels, _, bitmap = self._buffers()
        n_near, _ = _kernels.pd_select(
            *self._index, self.centres, angle, np.array([math.cos(angle)]), np.array([float(km)]), self.BAND, bitmap,
            self._codes(1), near, levels, np.array([-1.0, float(lat), float(lon)]),
        )  # fmt: skip
        return near[:n_near].astype(np.int64)
