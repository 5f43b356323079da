"""Probe images and the bundle model's outputs for them: the proof of which model a bundle holds.

Every bundle-writing path records them (``record_probes`` before ``BundleWriter.commit``);
``visloc-export add-probes`` adds them to a bundle written before they existed. The service
sends them through its backend and compares with :func:`swc_service.parity.compare_outputs`.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from swc_service import bundle as B
from swc_service.method import DEFAULT_SCALES_KM, DensityIndex, top_cell
from swc_service.preprocessing import prepare_image
from visloc_export import samples

from . import __version__

# (seed, source (width, height)): photo-like images whose preprocessing covers a downscale to
# 4:3 landscape, an image already at the model's size (the same shape: a batch of two), a
# portrait with an odd long side and a square.
PROBE_SOURCES = (
    (9_000_001, (640, 480)),  # -> 400x300
    (9_000_002, (400, 300)),  # -> 400x300, unchanged
    (9_000_003, (480, 722)),  # -> 300x451
    (9_000_004, (301, 301)),  # -> 300x300
)
TOP_CELLS_RECORDED = 5


def probe_images() -> list[np.ndarray]:
    """The probe images, preprocessed as the service preprocesses uploads (uint8 [H, W, 3])."""
    return [prepare_image(samples.photo(seed, size)) for seed, size in PROBE_SOURCES]


def run_model(model_path: str | os.PathLike[str], images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime (CPU) on the images, one batch per shape as the service's check sends them."""
    from .build import onnx_session

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


def compute(
    model_path: str | os.PathLike[str], centres: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, dict]:
    """(images, cell_probs [P, M], embeddings [P, D], manifest info) for one model."""
    images = probe_images()
    probs, emb = run_model(model_path, images)
    info = {
        "tool": f"visloc-export {__version__}",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "sources": [
            {"generator": "visloc_export.samples.photo", "seed": s, "size": list(wh)} for s, wh in PROBE_SOURCES
        ],
        **describe(centres, probs),
    }
    return images, probs, emb, info


def record_probes(writer: B.BundleWriter, centres: np.ndarray) -> None:
    """At export: the probes of the model just written into ``writer``."""
    writer.add_probes(*compute(writer.path(B.MODEL), centres))


def add_to_bundle(path: str | os.PathLike[str]) -> B.Bundle:
    """``visloc-export add-probes``: probes from an existing bundle's own ``model.onnx``."""
    bundle = B.load_bundle(path)
    if bundle.probes is not None:
        return bundle
    return B.add_probes(bundle.path, *compute(bundle.model_path, bundle.centres))
