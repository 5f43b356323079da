"""One comparison of two model outputs: the exporter's parity gate and the service's model check.

Both ask the same question, "does this backend compute the bundle's model?", so both use
:func:`compare_outputs`. It gates on what the service serves (issue 14, section 2):

``fp32`` (an exact re-implementation: onnxruntime vs PyTorch, or Triton's ONNX backend):

* NaN or infinity anywhere in either output fails, and the report says where;
* the top 5 cells identical, in the same order;
* every cell probability within 1e-6 absolute, and within 1e-3 relative on the cells where
  either output has p >= 1e-6 (relative to the larger of the two, so the rule is symmetric);
  log-probabilities are not compared: in the far tail (p ~ 1e-20) float32 rounding alone moves
  log p by more than any useful tolerance, and where p underflows to 0 it is undefined;
* Prediction Density at every served scale, computed from both outputs around the reference's
  top cell with the service's own :class:`~swc_service.method.DensityIndex`, within 1e-6;
* embeddings within 1e-4 absolute, cosine >= 1 - 1e-6.

``export`` (the exporter's gate: PyTorch against its onnxruntime export): as ``fp32``, except
that probabilities at or above 1e-6 are held to the relative rule only, and PD to
``1e-6 + 1e-3 * PD``. The two frameworks compute the backbone in float32 with different
kernels and their features differ by ~1e-5 relative (measured on EfficientNet-B4 with
re-estimated BatchNorm statistics), so a faithful export moves a top-cell probability of 0.3 by
~1e-5: 1e-6 absolute there would refuse every sharp model, while a wrong export (a weight off by
1e-3, BGR, no normalisation) still fails the relative rule.

``fp16`` (a declared reduced-precision backend, e.g. a TensorRT FP16 engine): the same top cell
and embedding cosine >= 0.999 on every probe; every fp32 deviation is still measured and
reported, and non-finite values still fail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .method import DEFAULT_SCALES_KM, DensityIndex

PRECISIONS = ("fp32", "export", "fp16")
TOP_N = 5
PROB_ABS_TOL = 1e-6
PROB_REL_TOL = 1e-3
PROB_REL_FLOOR = 1e-6  # the relative rule applies where either probability is at least this
PD_TOL = 1e-6
PD_REL_TOL = 1e-3  # export: PD within PD_TOL + PD_REL_TOL * PD
EMBEDDING_ABS_TOL = 1e-4
EMBEDDING_COS_TOL = 1e-6  # fp32: cosine >= 1 - this
FP16_MIN_COSINE = 0.999


def tolerances(precision: str) -> dict[str, float | int]:
    """The rules a precision is held to (recorded with every report)."""
    if precision in ("fp32", "export"):
        rules = {
            "top_n_equal": TOP_N,
            "prob_abs": PROB_ABS_TOL,
            "prob_rel": PROB_REL_TOL,
            "prob_rel_floor": PROB_REL_FLOOR,
            "pd_abs": PD_TOL,
            "embedding_abs": EMBEDDING_ABS_TOL,
            "embedding_min_cosine": 1.0 - EMBEDDING_COS_TOL,
        }
        if precision == "export":
            rules |= {"prob_abs_below_floor_only": True, "pd_rel": PD_REL_TOL}
        return rules
    if precision == "fp16":
        return {"top_n_equal": 1, "embedding_min_cosine": FP16_MIN_COSINE}
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


@dataclass
class ParityReport:
    """The verdict and the measured maxima over all probes (``cases`` holds each probe's)."""

    ok: bool
    precision: str
    failures: list[str]
    probes: int
    max_abs_prob_diff: float
    max_rel_prob_diff: float
    max_pd_diff: float
    max_embedding_diff: float
    min_embedding_cosine: float
    top1_equal: bool
    top5_equal: bool
    nonfinite_values: int
    cases: list[dict] = field(default_factory=list)
    tolerances: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Strict-JSON-safe: NaN and infinities become the strings "nan", "inf", "-inf"."""
        return _json_safe(asdict(self))

    def summary(self) -> str:
        """One line for logs and the CLI."""
        verdict = "OK" if self.ok else f"FAILED ({len(self.failures)} failures)"
        return (
            f"parity {verdict} [{self.precision}, {self.probes} probes]: "
            f"max|dp|={self.max_abs_prob_diff:.3g} max rel dp={self.max_rel_prob_diff:.3g} "
            f"max|dPD|={self.max_pd_diff:.3g} max|demb|={self.max_embedding_diff:.3g} "
            f"min cos={self.min_embedding_cosine:.9f} top-1 {'equal' if self.top1_equal else 'DIFFER'} "
            f"top-5 {'equal' if self.top5_equal else 'DIFFER'}"
            + (f" non-finite={self.nonfinite_values}" if self.nonfinite_values else "")
        )


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _nonfinite(label: str, array: np.ndarray, names: Sequence[str], column: str) -> tuple[int, str | None]:
    """How many non-finite values ``array`` [B, K] holds, and a message naming the first."""
    bad = ~np.isfinite(array)
    count = int(np.count_nonzero(bad))
    if not count:
        return 0, None
    i, j = (int(x) for x in np.argwhere(bad)[0])
    v = float(array[i, j])
    kind = "NaN" if math.isnan(v) else ("+inf" if v > 0 else "-inf")
    rows = sorted({int(r) for r in np.flatnonzero(bad.any(axis=1))})
    where = ", ".join(names[r] for r in rows[:5]) + (" ..." if len(rows) > 5 else "")
    return count, (
        f"{label} has {count} non-finite value(s): first {kind} at {names[i]} {column} {j}; probes affected: {where}"
    )


def _top(p: np.ndarray, n: int) -> list[int]:
    """The ``n`` most probable cells, most probable first; ties: lower index first (argmax's rule)."""
    return [int(c) for c in np.argsort(-p, kind="stable")[:n]]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / (na * nb))


def compare_outputs(
    ref_probs: np.ndarray,
    ref_emb: np.ndarray,
    got_probs: np.ndarray,
    got_emb: np.ndarray,
    centres: np.ndarray,
    scales_km: Sequence[float] = DEFAULT_SCALES_KM,
    *,
    precision: str = "fp32",
    names: Sequence[str] | None = None,
) -> ParityReport:
    """Compare a backend's outputs (``got``) with the reference outputs for the same images.

    ``ref_probs``/``got_probs`` are ``[B, M]`` cell probabilities, ``ref_emb``/``got_emb``
    ``[B, D]`` embeddings, row ``i`` of each for the same image; ``centres`` the bundle's
    ``[M, 2]`` cell centres and ``scales_km`` the served PD scales. ``names`` label the rows in
    failure messages (default ``probe i``). A ``got`` of the wrong shape is a failure (a backend
    serving another model); an inconsistent reference raises :class:`ValueError`.
    """
    rules = tolerances(precision)
    ref_probs = np.asarray(ref_probs)
    ref_emb = np.asarray(ref_emb)
    got_probs = np.asarray(got_probs)
    got_emb = np.asarray(got_emb)
    if ref_probs.ndim != 2 or ref_emb.ndim != 2 or ref_probs.shape[0] != ref_emb.shape[0] or ref_probs.shape[0] == 0:
        raise ValueError(
            f"reference outputs must be cell_probs [B, M] and embedding [B, D] with B >= 1, "
            f"got {list(ref_probs.shape)} and {list(ref_emb.shape)}"
        )
    b, m = ref_probs.shape
    centres = np.asarray(centres, dtype=np.float64)
    if centres.shape != (m, 2):
        raise ValueError(f"cell centres must be [{m}, 2] for {m} cells, got {list(centres.shape)}")
    labels = list(names) if names is not None else [f"probe {i}" for i in range(b)]
    if len(labels) != b:
        raise ValueError(f"{len(labels)} names for {b} probes")
    density = DensityIndex(centres, tuple(scales_km))

    failures: list[str] = []
    if got_probs.shape != ref_probs.shape or got_emb.shape != ref_emb.shape:
        failures.append(
            f"outputs have shapes cell_probs {list(got_probs.shape)} and embedding {list(got_emb.shape)}, "
            f"the reference {list(ref_probs.shape)} and {list(ref_emb.shape)}: not the same model"
        )
        return _report(precision, rules, failures, b, [], nonfinite=0)

    nonfinite = 0
    for label, array, column in (
        ("reference cell_probs", ref_probs, "cell"),
        ("reference embedding", ref_emb, "element"),
        ("output cell_probs", got_probs, "cell"),
        ("output embedding", got_emb, "element"),
    ):
        count, message = _nonfinite(label, array, labels, column)
        nonfinite += count
        if message:
            failures.append(message)
    finite_rows = (
        np.isfinite(ref_probs).all(axis=1)
        & np.isfinite(ref_emb).all(axis=1)
        & np.isfinite(got_probs).all(axis=1)
        & np.isfinite(got_emb).all(axis=1)
    )

    cases = []
    for i in range(b):
        if not finite_rows[i]:
            cases.append({"probe": labels[i], "nonfinite": True})
            continue
        case, problems = _compare_one(labels[i], ref_probs[i], ref_emb[i], got_probs[i], got_emb[i], density, precision)
        cases.append(case)
        failures += problems
    return _report(precision, rules, failures, b, cases, nonfinite)


def _compare_one(
    name: str,
    ref_p: np.ndarray,
    ref_e: np.ndarray,
    got_p: np.ndarray,
    got_e: np.ndarray,
    density: DensityIndex,
    precision: str,
) -> tuple[dict, list[str]]:
    """One probe (all values finite): its measured deviations and the rules it breaks."""
    problems: list[str] = []
    r = ref_p.astype(np.float64)
    g = got_p.astype(np.float64)
    ref_top, got_top = _top(r, TOP_N), _top(g, TOP_N)
    top1_equal, top5_equal = ref_top[0] == got_top[0], ref_top == got_top

    diff = np.abs(g - r)
    worst = int(np.argmax(diff))
    larger = np.maximum(r, g)
    significant = larger >= PROB_REL_FLOOR
    rel = np.zeros_like(diff)
    rel[significant] = diff[significant] / larger[significant]
    worst_rel = int(np.argmax(rel))

    cell = ref_top[0]
    pd_ref = density.density(cell, np.ascontiguousarray(ref_p, dtype=np.float32))
    pd_got = density.density(cell, np.ascontiguousarray(got_p, dtype=np.float32))
    pd_diff = np.abs(pd_got - pd_ref)
    worst_pd = int(np.argmax(pd_diff))

    e_diff = np.abs(got_e.astype(np.float64) - ref_e.astype(np.float64))
    worst_e = int(np.argmax(e_diff))
    cosine = _cosine(ref_e.astype(np.float64), got_e.astype(np.float64))

    case = {
        "probe": name,
        "reference_top5": ref_top,
        "output_top5": got_top,
        "reference_top_prob": float(r[cell]),
        "output_top_prob": float(g[cell]),
        "top1_equal": top1_equal,
        "top5_equal": top5_equal,
        "max_abs_prob_diff": float(diff[worst]),
        "max_rel_prob_diff": float(rel[worst_rel]),
        "max_pd_diff": float(pd_diff[worst_pd]),
        "reference_pd": [float(x) for x in pd_ref],
        "output_pd": [float(x) for x in pd_got],
        "max_embedding_diff": float(e_diff[worst_e]),
        "embedding_cosine": cosine,
    }

    if precision == "fp16":
        if not top1_equal:
            problems.append(
                f"{name}: top cell {got_top[0]} (p {g[got_top[0]]:.6g}) differs from the reference's "
                f"{cell} (p {r[cell]:.6g})"
            )
        if not cosine >= FP16_MIN_COSINE:
            problems.append(f"{name}: embedding cosine {cosine:.6f} < {FP16_MIN_COSINE}")
        return case, problems

    if not top5_equal:
        problems.append(f"{name}: top-{TOP_N} cells {got_top} differ from the reference's {ref_top}")
    exporting = precision == "export"
    over = int(np.count_nonzero((diff > PROB_ABS_TOL) & ~(exporting & significant)))
    if over:
        problems.append(
            f"{name}: cell {worst} probability {g[worst]:.9g} vs reference {r[worst]:.9g}: "
            f"|diff| {diff[worst]:.3g} > {PROB_ABS_TOL:g} ({over} cells over)"
        )
    over = int(np.count_nonzero(rel > PROB_REL_TOL))
    if over:
        problems.append(
            f"{name}: cell {worst_rel} probability {g[worst_rel]:.9g} vs reference {r[worst_rel]:.9g}: "
            f"relative diff {rel[worst_rel]:.3g} > {PROB_REL_TOL:g} ({over} cells with p >= {PROB_REL_FLOOR:g} over)"
        )
    pd_allowed = PD_TOL + (PD_REL_TOL * np.maximum(pd_ref, pd_got) if exporting else 0.0)
    pd_excess = pd_diff - pd_allowed
    if pd_excess.max() > 0:
        j = int(np.argmax(pd_excess))
        rule = f"{PD_TOL:g} + {PD_REL_TOL:g} * PD" if exporting else f"{PD_TOL:g}"
        problems.append(
            f"{name}: PD at {density.scales_km[j]:g} km around cell {cell}: {pd_got[j]:.9g} vs "
            f"reference {pd_ref[j]:.9g}: |diff| {pd_diff[j]:.3g} > {rule}"
        )
    if e_diff[worst_e] > EMBEDDING_ABS_TOL:
        problems.append(
            f"{name}: embedding element {worst_e}: {got_e[worst_e]:.7g} vs reference {ref_e[worst_e]:.7g}: "
            f"|diff| {e_diff[worst_e]:.3g} > {EMBEDDING_ABS_TOL:g}"
        )
    if not cosine >= 1.0 - EMBEDDING_COS_TOL:
        problems.append(f"{name}: embedding cosine {cosine:.9f} < {1.0 - EMBEDDING_COS_TOL:.6f}")
    return case, problems


def _report(
    precision: str, rules: dict, failures: list[str], probes: int, cases: list[dict], nonfinite: int
) -> ParityReport:
    compared = [c for c in cases if not c.get("nonfinite")]

    def worst(key: str, pick=max) -> float:
        return float(pick(c[key] for c in compared)) if compared else math.nan

    complete = len(compared) == probes
    return ParityReport(
        ok=not failures,
        precision=precision,
        failures=failures,
        probes=probes,
        max_abs_prob_diff=worst("max_abs_prob_diff"),
        max_rel_prob_diff=worst("max_rel_prob_diff"),
        max_pd_diff=worst("max_pd_diff"),
        max_embedding_diff=worst("max_embedding_diff"),
        min_embedding_cosine=worst("embedding_cosine", min),
        top1_equal=complete and all(c["top1_equal"] for c in compared),
        top5_equal=complete and all(c["top5_equal"] for c in compared),
        nonfinite_values=nonfinite,
        cases=cases,
        tolerances=dict(rules),
    )
