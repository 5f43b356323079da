"""The exporter's parity gate: the ONNX export against the network in float64.

onnxruntime runs the written ``model.onnx`` on the gate's photos (batches of 1 and 4 at four
shapes); its outputs' distance from the network's float64 outputs must be within the
``export`` class's allowance: a multiple of PyTorch float32's own distance on the same photos
on this machine (:mod:`swc_service.parity`). The same measurement gives the envelopes of the
other arithmetics that the bundle records for the service's model check.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from swc_service import bundle as B
from swc_service.method import DEFAULT_SCALES_KM
from swc_service.parity import ARITHMETICS, EXPORTED, QUANTITIES, Distances, ParityReport, compare_outputs
from visloc_client.preprocessing import prepare_image, preprocess
from visloc_export import samples

from .reference import Measurement, ReferenceModel, distinct, measure

PRECISION = "export"
VERIFY_SHAPES = ((300, 300), (400, 300), (300, 400), (533, 300))  # (width, height)


def onnx_session(path: str | os.PathLike[str], threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def parity_batches(images: list[bytes] | None = None) -> list[np.ndarray]:
    """Batches of 1 and 4 at each verify shape (16 photos), or the given images one by one."""
    if images:
        return [preprocess(data).array[None] for data in images]
    batches = []
    for i, size in enumerate(VERIFY_SHAPES):
        four = np.stack([prepare_image(samples.photo(100 * i + j, size)) for j in range(4)])
        batches += [four[:1], four]
    return batches


def check_parity(
    model: ReferenceModel,
    onnx_path: str | os.PathLike[str],
    centres: np.ndarray,
    batches: list[np.ndarray],
    *,
    extra_photos: Sequence[np.ndarray] = (),
    arithmetics: Sequence[str] = ARITHMETICS,
    measurement: Measurement | None = None,
    threads: int = 0,
    scales_km: Sequence[float] = DEFAULT_SCALES_KM,
    progress: bool = True,
) -> tuple[ParityReport, Measurement]:
    """onnxruntime on ``batches`` against ``model`` in float64, every image compared.

    The envelopes are measured on the batches' photos and ``extra_photos`` (the probes), or
    taken from ``measurement``; returned with the report (and onnxruntime's own distances as
    the ``onnx`` envelope) so the bundle can record them.
    """
    if measurement is None:
        photos = distinct([*(image for batch in batches for image in batch), *extra_photos])
        measurement = measure(model, photos, centres, arithmetics=arithmetics, scales_km=scales_km, progress=progress)
    sess = onnx_session(onnx_path, threads)
    rows, probs, embs, names = [], [], [], []
    for batch in batches:
        p, e = sess.run([B.OUTPUT_PROBS, B.OUTPUT_EMBEDDING], {B.INPUT_NAME: batch})
        probs.append(p)
        embs.append(e)
        rows += [measurement.index(image) for image in batch]
        names += [f"batch {batch.shape[0]} {batch.shape[2]}x{batch.shape[1]} image {i}" for i in range(batch.shape[0])]
    report = compare_outputs(
        measurement.reference(rows), np.concatenate(probs), np.concatenate(embs), centres, scales_km,
        precision=PRECISION, names=names,
    )  # fmt: skip
    if not report.nonfinite_values and all(math.isfinite(report.distance[q]) for q in QUANTITIES):
        # What the export itself computes on every measured photo: the model check accepts it anywhere.
        measurement.per_photo[EXPORTED] = _exported(measurement, sess, rows, report, scales_km, centres)
    return report, measurement


def _exported(measurement: Measurement, sess, rows: list[int], report: ParityReport, scales_km, centres) -> dict:
    """onnxruntime's distance on each measured photo: the gate's cases, and the other photos run here."""
    out = {q: np.zeros(len(measurement.photos)) for q in QUANTITIES}
    for row, case in zip(rows, report.cases, strict=True):
        for q in QUANTITIES:
            out[q][row] = max(out[q][row], case["pd_largest"] if q == "pd" else case[q])
    others = [i for i in range(len(measurement.photos)) if i not in set(rows)]
    if others:
        probs, embs = [], []
        images = [measurement.photos[i] for i in others]
        order = []
        for idx, batch in B.batches_by_shape(images):
            p, e = sess.run([B.OUTPUT_PROBS, B.OUTPUT_EMBEDDING], {B.INPUT_NAME: batch})
            probs.append(p)
            embs.append(e)
            order += [others[i] for i in idx]
        found = Distances(centres, scales_km).each(
            np.concatenate(probs), np.concatenate(embs), measurement.cell_probs[order], measurement.embeddings[order]
        )
        for q in QUANTITIES:
            out[q][order] = found[q]
    return out
