"""The seed's way of doing things, kept as the baseline the benchmarks compare against and the
oracle the tests check the production code with.

As in the reference's evaluation.py / inference.py: background fully in RAM as float32 and
transposed, SwC via a full argsort and scikit-learn DBSCAN with a Python haversine callable,
PD via haversine from the top cell to every cell, per image. Only the tie rules are pinned
(stable sort), so results are comparable exactly.
"""

from __future__ import annotations

import math
import time

import numpy as np
from sklearn.cluster import DBSCAN

from swc_service.geo import haversine_km
from swc_service.method import DEFAULT_SCALES_KM


def _haversine_metric(x: np.ndarray, y: np.ndarray) -> float:
    return float(haversine_km(x[0], x[1], y[0], y[1]))


def _cluster_mean(cands: np.ndarray, eps_km: float) -> tuple[float, float, np.ndarray]:
    """The reference's spatial_clustering (a=0): DBSCAN, the largest cluster, mean unit vector."""
    db = DBSCAN(eps=eps_km, min_samples=1, metric=_haversine_metric).fit(cands)
    groups = [cands[db.labels_ == c] for c in np.unique(db.labels_)]
    members = sorted(groups, key=len, reverse=True)[0]  # stable: the lowest label on a size tie
    vec = np.sum(
        [[math.cos(la / 180 * math.pi) * math.cos(lo / 180 * math.pi),
          math.cos(la / 180 * math.pi) * math.sin(lo / 180 * math.pi),
          math.sin(la / 180 * math.pi)] for la, lo in members], axis=0,
    ) / len(members)  # fmt: skip
    return math.asin(vec[2]) / math.pi * 180, math.atan2(vec[1], vec[0]) / math.pi * 180, db.labels_


def reference_swc(
    embedding: np.ndarray, features: np.ndarray, labels: np.ndarray, top_k: int = 10, eps_km: float = 1.0
) -> tuple[float, float, np.ndarray]:
    """(lat, lon, DBSCAN labels) the reference's way; ``features`` are the cell's rows ``[n, D]``."""
    sims = np.asarray(features, dtype=np.float32) @ embedding.astype(np.float32)
    nns = np.argsort(-sims, kind="stable")[:top_k]
    return _cluster_mean(np.asarray(labels)[nns], eps_km)


def reference_pd(cell: int, cell_probs: np.ndarray, centres: np.ndarray, scales_km=DEFAULT_SCALES_KM) -> np.ndarray:
    """PD the reference's way: haversine from the top cell to every cell, then masked sums."""
    d = haversine_km(centres[cell, 0], centres[cell, 1], centres[:, 0], centres[:, 1])
    return np.array([cell_probs[d <= s].sum() for s in scales_km], dtype=np.float64)


class SeedBackground:
    """The reference's in-RAM background: all features as float32, transposed ([D, N])."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, assignments: dict[int, np.ndarray]):
        self.features_t = np.asarray(features).T.astype(np.float32)
        self.labels = np.asarray(labels)
        self.assignments = assignments

    @classmethod
    def from_hdf5(cls, path: str, assignments: dict[int, np.ndarray]) -> SeedBackground:
        import h5py

        with h5py.File(path, "r") as h5:
            return cls(h5["features"][:, :], h5["labels"][:, :], assignments)

    def postprocess(self, cell_probs: np.ndarray, embedding: np.ndarray, centres: np.ndarray,
                    top_k: int = 10, eps_km: float = 1.0) -> tuple[float, float, np.ndarray]:  # fmt: skip
        """One image's SwC + PD, the seed's way (idxs from the assignment, dot over [D, idxs])."""
        c = int(np.argmax(cell_probs))
        if c in self.assignments:
            idxs = self.assignments[c]
            sims = embedding.astype(np.float32) @ self.features_t[:, idxs]
            nns = np.argsort(-sims, kind="stable")[:top_k]
            lat, lon, _ = _cluster_mean(self.labels[idxs[nns]], eps_km)
        else:
            lat, lon = centres[c]
        return lat, lon, reference_pd(c, cell_probs, centres)


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t
