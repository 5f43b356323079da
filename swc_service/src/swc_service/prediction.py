"""Prediction: the model's outputs for one image -> SwC location and PD confidence, as plain data
(the client library's protobuf-free result types: one definition of a cell, a neighbour, a PD value).

The bundle and its PD index travel together in one immutable :class:`ServingState`; the
:class:`~swc_service.locator.Locator` reads its state once per image, so replacing the state
(one assignment) swaps bundle and model version atomically for every later image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from visloc_client.results import Cell, Neighbour, ScaleDensity

from .bundle import Bundle
from .errors import InferenceFailed
from .method import DEFAULT_SCALES_KM, DensityIndex, PointDensity, search_within_cell, top_cell
from .options import Options


@dataclass(frozen=True)
class ServingState:
    """What one image is answered against: the bundle, its PD index and the model version."""

    bundle: Bundle
    density: DensityIndex
    model_version: str  # of the model that inference runs; must match the bundle's outputs
    triton_version: str = ""  # the exact Triton model version asked for ("" = the model's default)

    @classmethod
    def of(cls, bundle: Bundle, scales_km: tuple[float, ...] = DEFAULT_SCALES_KM) -> ServingState:
        return cls(bundle, DensityIndex(bundle.centres, scales_km), bundle.model_version, bundle.triton_version)

    @property
    def embedding_dim(self) -> int:
        return int(self.bundle.features.shape[1])


@dataclass(frozen=True)
class Prediction:
    method: str  # "swc", or "cell" when the top cell has no background rows
    lat: float
    lon: float
    top_cell: Cell
    confidence: float  # PD at the requested scale
    localizable: bool
    density: tuple[ScaleDensity, ...]  # PD at every served scale
    neighbours: tuple[Neighbour, ...]
    top_cells: tuple[Cell, ...]
    swc_s: float
    pd_s: float  # PD and the claims' masses: one pass over the cells
    claimed: tuple[PointDensity, ...] = ()  # the mass around each of opts.claims, in order


def top_cells(probs: np.ndarray, n: int) -> np.ndarray:
    """The n most probable cells, most probable first (lower id first on ties)."""
    n = min(n, probs.shape[0])
    part = np.argpartition(-probs, n - 1)[:n] if n < probs.shape[0] else np.arange(probs.shape[0])
    kth = probs[part].min()
    pool = np.flatnonzero(probs >= kth)
    return pool[np.argsort(-probs[pool], kind="stable")][:n]


def _cell(state: ServingState, probs: np.ndarray, c: int) -> Cell:
    lat, lon = state.bundle.centres[c]
    return Cell(int(c), float(lat), float(lon), float(probs[c]))


def predict(state: ServingState, probs: np.ndarray, emb: np.ndarray, opts: Options) -> Prediction:
    """SwC within the top cell, then PD (with the mass around every claim in the same pass);
    raises INTERNAL when the outputs do not fit the bundle."""
    bundle = state.bundle
    if probs.shape != (bundle.num_cells,) or emb.shape != (state.embedding_dim,):
        raise InferenceFailed(
            f"Triton's model returned {probs.shape[0]} cells / {emb.shape[0]}-d embeddings; the bundle "
            f"has {bundle.num_cells} / {state.embedding_dim}: model and bundle disagree"
        )
    t0 = time.perf_counter()
    c = top_cell(probs)
    feats, labels, row_ids = bundle.cell_slice(c)
    swc = search_within_cell(emb, feats, labels, opts.top_k, opts.eps_km) if feats.shape[0] else None
    t1 = time.perf_counter()
    pd, claimed = state.density.densities(c, opts.claims, probs)
    t2 = time.perf_counter()
    scales = state.density.scales_km
    confidence = float(pd[scales.index(opts.conf_scale_km)])
    best = _cell(state, probs, c)
    neighbours = ()
    if swc:
        picked = list(zip(swc.candidates, swc.similarities, swc.cluster_labels))[: opts.return_neighbours]
        neighbours = tuple(
            Neighbour(int(row_ids[pos]), float(sim), float(labels[pos, 0]), float(labels[pos, 1]), int(lab),
                      bool(lab == swc.chosen_cluster))
            for pos, sim, lab in picked
        )  # fmt: skip
    return Prediction(
        method="swc" if swc else "cell",
        lat=swc.lat if swc else best.lat,
        lon=swc.lon if swc else best.lon,
        top_cell=best,
        confidence=confidence,
        localizable=confidence > opts.conf_threshold,
        density=tuple(ScaleDensity(s, float(v)) for s, v in zip(scales, pd)),
        neighbours=neighbours,
        top_cells=tuple(_cell(state, probs, cell) for cell in top_cells(probs, opts.return_top_cells))
        if opts.return_top_cells
        else (),
        swc_s=t1 - t0,
        pd_s=t2 - t1,
        claimed=claimed,
    )
