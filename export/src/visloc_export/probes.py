"""Probe images, the bundle model's outputs for them, and its float64 reference: the proof of
which model a bundle holds.

Every bundle-writing path records them (:func:`record` before ``BundleWriter.commit``), with
the network's float64 outputs for the probes and the envelopes measured at export
(:mod:`visloc_export.reference`). ``visloc-export add-probes`` gives them to a bundle written
before probes, or before the float64 reference, existed. The service sends the probes through
its backend and holds the answers to :func:`swc_service.parity.compare_outputs`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from swc_service import bundle as B
from swc_service.method import DEFAULT_SCALES_KM, DensityIndex, top_cell
from visloc_client.preprocessing import prepare_image
from visloc_export import samples

from . import __version__
from .parity import check_parity, onnx_session, parity_batches
from .reference import ReferenceModel

# (seed, source (width, height)): photo-like images whose preprocessing covers a downscale to
# 4:3 landscape, an image already at the model's size (the same shape: a batch of two), a
# portrait with an odd long side and a square.
PROBE_SOURCES = (
    (9_000_001, (640, 480)),  # -> 400x300
    (9_000_002, (400, 300)),  # -> 400x300, unchanged
    (9_000_003, (480, 722)),  # -> 300x451
    (9_000_004, (301, 301)),  # -> 300x300
)
CANDIDATES = 6  # photos tried for each probe: the one with the largest top-1 margin is kept
CANDIDATE_SEED_STEP = 1_000
TOP_CELLS_RECORDED = 5


def candidate_seeds(seed: int) -> list[int]:
    return [seed + CANDIDATE_SEED_STEP * j for j in range(CANDIDATES)]


def choose(model: ReferenceModel) -> tuple[list[np.ndarray], list[dict]]:
    """One probe per source, of its candidates the one whose top cell leads the second by the
    most (in ln p, float32): a backend that computes the model can never flip it, so a refusal is
    never a coin toss. Returns the images (preprocessed as the service preprocesses uploads,
    uint8 [H, W, 3]) and where each came from."""
    images, sources = [], []
    for seed, size in PROBE_SOURCES:
        seeds = candidate_seeds(seed)
        batch = np.stack([prepare_image(samples.photo(s, size)) for s in seeds])
        probs, _ = model.outputs(batch, "fp32")
        top2 = -np.sort(-probs, axis=1)[:, :2]
        margins = np.log(top2[:, 0] + 1e-6) - np.log(top2[:, 1] + 1e-6)
        best = int(np.argmax(margins))
        images.append(batch[best])
        sources.append({"generator": "visloc_export.samples.photo", "seed": seeds[best], "size": list(size)})
    return images, sources


def run_model(model_path: str | os.PathLike[str], images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime (CPU) on the images, one batch per shape as the service's check sends them."""
    sess = onnx_session(model_path)
    probs: list[np.ndarray | None] = [None] * len(images)
    embs: list[np.ndarray | None] = [None] * len(images)
    for idx, batch in B.batches_by_shape(images):
        p, e = sess.run([B.OUTPUT_PROBS, B.OUTPUT_EMBEDDING], {B.INPUT_NAME: batch})
        for row, i in enumerate(idx):
            probs[i], embs[i] = p[row], e[row]
    return np.stack(probs).astype(np.float32, copy=False), np.stack(embs).astype(np.float32, copy=False)


def describe(centres: np.ndarray, probs: np.ndarray) -> dict:
    """What the manifest shows a reader: each probe's top cells and PD (the arrays hold the rest)."""
    density = DensityIndex(centres, DEFAULT_SCALES_KM)
    top, pd = [], []
    for p in probs:
        order = np.argsort(-p, kind="stable")[:TOP_CELLS_RECORDED]
        top.append([[int(c), float(p[c])] for c in order])
        pd.append([float(x) for x in density.density(top_cell(p), p)])
    return {"top_cells": top, "pd_scales_km": list(DEFAULT_SCALES_KM), "pd": pd}


def _info(centres: np.ndarray, probs: np.ndarray, sources: Sequence[dict]) -> dict:
    return {
        "tool": f"visloc-export {__version__}",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "sources": list(sources),
        **describe(centres, probs),
    }


def record(
    writer: B.BundleWriter,
    centres: np.ndarray,
    images: list[np.ndarray],
    sources: Sequence[dict],
    reference: B.ProbeReference,
) -> None:
    """At export: the probes of the model just written into ``writer``, with their reference."""
    probs, emb = run_model(writer.path(B.MODEL), images)
    writer.add_probes(images, probs, emb, _info(centres, probs, sources), reference)


def add_to_bundle(path: str | os.PathLike[str], model: ReferenceModel) -> B.Bundle:
    """``visloc-export add-probes``: probes, or the float64 reference of its existing probes, for
    a bundle written before them, from ``model`` (the network the bundle's ``model.onnx`` was
    exported from). The gate runs first on the bundle's own ``model.onnx``: a network that does
    not compute it is refused and nothing changes."""
    bundle = B.load_bundle(path)
    if bundle.probes is not None and bundle.probes.reference is not None:
        return bundle
    cells = getattr(getattr(model, "net", None), "num_cells", bundle.num_cells)
    if cells != bundle.num_cells:
        raise ValueError(
            f"the network given has M={cells} cells, bundle {bundle.bundle_id}'s {B.MODEL} M={bundle.num_cells}: "
            f"not its network; nothing changed. Pass the checkpoints it was exported from"
        )
    if bundle.probes is None:
        images, sources = choose(model)
    else:
        images, sources = list(bundle.probes.images), []
    report, measurement = check_parity(model, bundle.model_path, bundle.centres, parity_batches(), extra_photos=images)
    print(report.summary(), file=sys.stderr)
    if not report.ok:
        raise ValueError(
            f"the network given does not compute bundle {bundle.bundle_id}'s {B.MODEL} "
            f"({report.failures[0]}); nothing changed. Pass the checkpoints it was exported from"
        )
    reference = measurement.reference([measurement.index(image) for image in images])
    if bundle.probes is not None:
        return B.add_reference(bundle.path, reference)
    probs, emb = run_model(bundle.model_path, images)
    return B.add_probes(bundle.path, images, probs, emb, _info(bundle.centres, probs, sources), reference)
