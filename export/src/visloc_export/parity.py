"""The ONNX-vs-PyTorch parity gate, on what the service serves.

A sharp model's tail probabilities (1e-13 .. 1e-25, or exactly 0) move by more than any
log-probability tolerance under float32 rounding alone, and ``log 0 - log 0`` is NaN, so the
gate compares what the service uses, per image:

* the top 5 cells, identical and in the same order;
* cell probabilities: within ``PROB_REL_TOL`` relative on every cell with
  ``p >= PROB_REL_FLOOR`` in either output (the others then differ by less than
  ``PROB_REL_FLOOR`` absolute);
* PD at every served scale around the reference's top cell, computed from each output with
  the service's own :class:`~swc_service.method.DensityIndex`, within
  ``PD_ABS_TOL + PD_REL_TOL * PD`` (so tail cells, each below the floor, cannot add up unseen);
* embeddings within ``EMB_ABS_TOL`` and with cosine ``>= EMB_COS_MIN``.

NaN or infinity anywhere in either output fails, and the report says where.

Why not 1e-6 absolute on every probability and on PD: PyTorch and onnxruntime compute the
EfficientNet-B4 features in float32 with different kernels, and they differ by ~1e-5 relative
(measured on BatchNorm-re-estimated weights; 9e-6 even with onnxruntime's graph optimisations
off). A top cell of p = 0.3 then moves by ~1e-5 absolute, in any faithful export of a model
whose features decide its top cell. 1e-6 absolute there would be 3e-6 relative: no sharp
model passes it, while a weight off by 1e-3 moves probabilities by more than 1e-3 relative.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import torch

from swc_service import bundle as B
from swc_service.method import DEFAULT_SCALES_KM, DensityIndex, top_cell

from .model import VislocNet

TOP_K = 5
PROB_REL_TOL = 1e-3
PROB_REL_FLOOR = 1e-6
PD_ABS_TOL = 1e-6
PD_REL_TOL = 1e-3
EMB_ABS_TOL = 1e-4
EMB_COS_MIN = 1 - 1e-6
TOLERANCES = {
    "top_k_identical": TOP_K,
    "prob_rel": PROB_REL_TOL,
    "prob_rel_floor": PROB_REL_FLOOR,
    "pd_abs": PD_ABS_TOL,
    "pd_rel": PD_REL_TOL,
    "embedding_abs": EMB_ABS_TOL,
    "embedding_cosine_min": EMB_COS_MIN,
}


@dataclass
class ParityReport:
    """Per-batch cases, the worst value of every measure, and one line per failure."""

    cases: list[dict]
    scales_km: tuple[float, ...]
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def worst(self, key: str, pick=max) -> float | None:
        values = [c[key] for c in self.cases if c.get(key) is not None]
        return pick(values) if values else None

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "failures": self.failures,
            "tolerances": TOLERANCES,
            "pd_scales_km": list(self.scales_km),
            "top5_equal": all(c["top5_equal"] for c in self.cases),
            "max_prob_abs_diff": self.worst("max_prob_abs_diff"),
            "max_prob_rel_diff": self.worst("max_prob_rel_diff"),
            "max_pd_diff": self.worst("max_pd_diff"),
            "max_embedding_diff": self.worst("max_embedding_diff"),
            "min_embedding_cosine": self.worst("min_embedding_cosine", min),
            "cases": self.cases,
        }

    def summary(self) -> str:
        d = self.as_dict()

        def g(key: str) -> str:
            return "n/a" if d[key] is None else f"{d[key]:.3g}"

        head = (
            f"parity {'OK' if self.ok else 'FAILED'}: top-5 {'equal' if d['top5_equal'] else 'DIFFER'}, "
            f"max|dp|={g('max_prob_abs_diff')}, max rel dp={g('max_prob_rel_diff')}, "
            f"max|dPD|={g('max_pd_diff')}, max|demb|={g('max_embedding_diff')}, "
            f"min cos={g('min_embedding_cosine')}"
        )
        return "\n".join([head, *(f"  {f}" for f in self.failures)])


def onnx_session(path: str | os.PathLike[str], threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _nonfinite(where: str, array: np.ndarray) -> str | None:
    bad = ~np.isfinite(array)
    if not bad.any():
        return None
    idx = np.argwhere(bad)
    first = tuple(int(i) for i in idx[0])
    kinds = sorted({"NaN" if np.isnan(v) else "inf" for v in array[bad][:1000]})
    return f"{where}: {int(bad.sum())} {'/'.join(kinds)} value(s), first at index {list(first)}"


def compare(
    case: str,
    ref: tuple[np.ndarray, np.ndarray],
    got: tuple[np.ndarray, np.ndarray],
    density: DensityIndex,
) -> tuple[dict, list[str]]:
    """One batch: reference (PyTorch) vs served (ONNX) outputs -> (measures, failures)."""
    (rp, re_), (gp, ge) = ref, got
    nonfinite = [
        msg
        for msg in (
            _nonfinite(f"{case} reference {B.OUTPUT_PROBS}", rp),
            _nonfinite(f"{case} reference {B.OUTPUT_EMBEDDING}", re_),
            _nonfinite(f"{case} ONNX {B.OUTPUT_PROBS}", gp),
            _nonfinite(f"{case} ONNX {B.OUTPUT_EMBEDDING}", ge),
        )
        if msg
    ]
    failures = list(nonfinite)
    top_r = np.argsort(-rp, axis=1, kind="stable")[:, :TOP_K]
    top_g = np.argsort(-gp, axis=1, kind="stable")[:, :TOP_K]
    top5 = bool(np.array_equal(top_r, top_g))
    out: dict = {"top5_equal": top5}
    if not top5:
        row = int(np.flatnonzero(np.any(top_r != top_g, axis=1))[0])
        failures.append(f"{case} image {row}: top {TOP_K} cells {top_r[row].tolist()} vs ONNX {top_g[row].tolist()}")
    if nonfinite:  # no numbers to compare: NaN must never pass through a max()
        return out | {k: None for k in _MEASURES}, failures
    r64, g64 = rp.astype(np.float64), gp.astype(np.float64)
    diff = np.abs(r64 - g64)
    big = np.maximum(r64, g64) >= PROB_REL_FLOOR
    rel = np.where(big, diff / np.maximum(np.maximum(r64, g64), PROB_REL_FLOOR), 0.0)
    pd_diff, pd_excess, pd_at = 0.0, 0.0, ""
    for i in range(rp.shape[0]):
        cell = top_cell(rp[i])
        pr, pg = density.density(cell, rp[i]), density.density(cell, gp[i])
        d = np.abs(pr - pg)
        excess = d - (PD_ABS_TOL + PD_REL_TOL * np.maximum(pr, pg))
        pd_diff = max(pd_diff, float(d.max()))
        if excess.max() > pd_excess:
            j = int(np.argmax(excess))
            pd_excess = float(excess.max())
            pd_at = f"image {i}, {density.scales_km[j]:g} km: PD {pr[j]:.9g} vs ONNX {pg[j]:.9g}"
    emb = np.abs(re_.astype(np.float64) - ge.astype(np.float64))
    a, b = re_.astype(np.float64), ge.astype(np.float64)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    out |= {
        "max_prob_abs_diff": float(diff.max()),
        "max_prob_rel_diff": float(rel.max()),
        "max_pd_diff": pd_diff,
        "max_embedding_diff": float(emb.max()),
        "min_embedding_cosine": float(cos.min()),
    }
    checks = (
        (f"cell probability relative dp (p >= {PROB_REL_FLOOR:g})", out["max_prob_rel_diff"], PROB_REL_TOL, rel),
        ("embedding |de|", out["max_embedding_diff"], EMB_ABS_TOL, emb),
    )
    for what, value, tol, array in checks:
        if value > tol:
            at = [int(i) for i in np.unravel_index(np.argmax(array), array.shape)]
            failures.append(f"{case}: {what} = {value:.3g} > {tol:g} at index {at}")
    if pd_excess > 0:
        failures.append(f"{case}: PD differs by more than {PD_ABS_TOL:g} + {PD_REL_TOL:g} * PD ({pd_at})")
    if out["min_embedding_cosine"] < EMB_COS_MIN:
        failures.append(f"{case}: embedding cosine {out['min_embedding_cosine']:.9f} < {EMB_COS_MIN}")
    return out, failures


_MEASURES = ("max_prob_abs_diff", "max_prob_rel_diff", "max_pd_diff", "max_embedding_diff", "min_embedding_cosine")


@torch.no_grad()
def check_parity(
    net: VislocNet,
    onnx_path: str | os.PathLike[str],
    batches: list[np.ndarray],
    scales_km: tuple[float, ...] = DEFAULT_SCALES_KM,
) -> ParityReport:
    """PyTorch vs onnxruntime on the same uint8 batches, gated as the module docstring says."""
    net = net.eval()
    sess = onnx_session(onnx_path)
    density = DensityIndex(net.cell_head.centres.numpy().astype(np.float64), scales_km)
    report = ParityReport([], tuple(scales_km))
    for batch in batches:
        ref = tuple(t.numpy() for t in net(torch.from_numpy(batch)))
        got = tuple(sess.run([B.OUTPUT_PROBS, B.OUTPUT_EMBEDDING], {B.INPUT_NAME: batch}))
        case = f"batch {batch.shape[0]} {batch.shape[2]}x{batch.shape[1]}"
        measures, failures = compare(case, ref, got, density)
        report.cases.append({"batch": batch.shape[0], "height": batch.shape[1], "width": batch.shape[2]} | measures)
        report.failures += failures
    return report
