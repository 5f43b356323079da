"""The claim check: how much of the model's belief lies near where a photo is said to be.

The model already holds the answer to "was this taken where the post says?": its probability
over all cells. Prediction Density measures the mass near the predicted cell; the same mass
measured around a claimed point, at every served scale, says how plausible the claim is to the
model (:meth:`~swc_service.method.DensityIndex.density_at`: PD's exact rules, centred on the
claim). With it, from the same kernel call: the cell nearest the claim and its rank; then the
distance from the prediction and the background images near the claim that look most like the
photo. A belief, not a proof.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from visloc_client.results import Cell, ClaimNeighbour

from .bundle import Bundle
from .geo import distance_km, haversine_km
from .method import PointDensity, search_within_cell
from .prediction import ServingState


class ClaimResult(NamedTuple):
    lat: float
    lon: float
    mass: tuple[float, ...]  # aligned with scales_km
    scales_km: tuple[float, ...]
    cell: Cell
    rank: int
    cell_distance_km: float
    distance_km: float
    neighbours: tuple[ClaimNeighbour, ...]


_extents: dict[str, float] = {}  # by bundle id (a content hash); a few bundles over a process's life


def row_extent_km(bundle: Bundle) -> float:
    """The farthest any background image lies from its cell's centre (km): a claim's radius plus
    this reaches every cell that can hold an image within the radius. Once per bundle."""
    extent = _extents.get(bundle.bundle_id)
    if extent is None:
        counts = np.diff(bundle.offsets)
        cell_of_row = np.repeat(np.arange(bundle.num_cells), counts)
        centres = bundle.centres[cell_of_row]
        labels = np.asarray(bundle.labels)
        distances = haversine_km(labels[:, 0], labels[:, 1], centres[:, 0], centres[:, 1])
        extent = float(distances.max()) if len(labels) else 0.0
        if len(_extents) >= 4:
            _extents.pop(next(iter(_extents)))
        _extents[bundle.bundle_id] = extent
    return extent


def neighbours_near(
    state: ServingState, embedding: np.ndarray, lat: float, lon: float, radius_km: float, n: int
) -> tuple[ClaimNeighbour, ...]:
    """The ``n`` background images within ``radius_km`` of (lat, lon) most similar to the photo
    (SwC's similarity kernel; the lower position first on a tie)."""
    bundle = state.bundle
    cells = state.density.cells_within(lat, lon, radius_km + row_extent_km(bundle))
    ranges = [np.arange(*bundle.cell_rows(int(c))) for c in cells]
    rows = np.concatenate(ranges) if ranges else np.empty(0, np.int64)
    if not len(rows):  # no cell, or only cells without images, near the claim
        return ()
    labels = np.asarray(bundle.labels[rows])
    d = haversine_km(lat, lon, labels[:, 0], labels[:, 1])
    inside = np.flatnonzero(d <= radius_km)
    if not len(inside):
        return ()
    rows, labels, d = rows[inside], labels[inside], d[inside]
    found = search_within_cell(embedding, bundle.features[rows], labels, top_k=n, eps_km=1.0)
    return tuple(
        ClaimNeighbour(int(bundle.row_ids[rows[k]]), float(sim), float(labels[k, 0]), float(labels[k, 1]), float(d[k]))
        for k, sim in zip(found.candidates, found.similarities)
    )


def check_claim(
    state: ServingState,
    probs: np.ndarray,
    embedding: np.ndarray,
    claim: tuple[float, float],
    predicted: tuple[float, float],
    radius_km: float,
    neighbours: int,
    at: PointDensity | None = None,
) -> ClaimResult:
    """One claim against one image's model outputs and prediction; ``at``: the claim's mass and
    nearest cell when :func:`~swc_service.prediction.predict` computed them with PD."""
    lat, lon = claim
    if at is None:
        at = state.density.density_at(lat, lon, probs)
    cell_lat, cell_lon = state.bundle.centres[at.cell].tolist()
    return ClaimResult(
        lat=lat,
        lon=lon,
        mass=tuple(at.mass.tolist()),
        scales_km=state.density.scales_km,
        cell=Cell(at.cell, cell_lat, cell_lon, float(probs[at.cell])),
        rank=at.rank,
        cell_distance_km=at.cell_km,
        distance_km=distance_km(float(predicted[0]), float(predicted[1]), lat, lon),
        neighbours=neighbours_near(state, embedding, lat, lon, radius_km, neighbours) if neighbours else (),
    )
