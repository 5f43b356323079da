"""One rule for "these two computations are the same model": the exporter's gate and the service's model check.

Float32 results differ between machines and kernels (AVX-512 or AVX2, fused multiply-adds,
blocking, Winograd convolutions, a GPU's TF32 tensor cores), so two float32 outputs are never
compared with each other under a fixed tolerance. Each output is measured by its **distance
from a float64 reference** of the same network on the same photos, in what the service serves:

``cell_probs``
    the largest ``|ln(p + tau) - ln(p64 + tau)|`` over all cells, ``tau`` = 1e-6: a relative
    error on every probability above ``tau``, an absolute one below it (a tail cell at 1e-20
    moving by 100 % changes nothing served, and ``ln 0`` is undefined);
``pd``
    ``|PD(s) - PD64(s)|`` at each served scale ``s`` (the envelope: the largest), both around the float64
    reference's top cell; the output's PD is computed exactly as the service serves it
    (:class:`~swc_service.method.DensityIndex` on float32), the reference's in float64;
``embedding``
    ``||e - e64||``: it bounds the error of every similarity SwC computes with the embedding
    (``|e.x - e64.x| <= ||e - e64||`` for a unit background row ``x``);
top cells
    ranked as in the float64 reference wherever that ranking is decided: the top ``k`` cells
    must be the reference's top ``k`` when the float64 gap between ranks ``k`` and ``k + 1``
    (in ``ln p``) exceeds twice the allowed ``cell_probs`` distance. A near-tie is a tie.

The allowed distance is ``MULTIPLE x envelope + FLOOR`` per quantity; PD at each scale gets
at least what the allowed ``cell_probs`` distance lets it move (:func:`pd_allowances`), since
no cell may move further. The **envelope** is the
largest distance from float64 that a known arithmetic showed on the photos measured at
export (recorded in the bundle with the reference, see :class:`~swc_service.bundle.ProbeReference`):

``fp32``  PyTorch float32 on the exporting machine;
``tf32``  every convolution's and matmul's inputs and weights rounded to a 10-bit mantissa,
          as a GPU's TF32 tensor cores compute them (onnxruntime's CUDA provider by default);
``fp16``  the same rounded to float16, outputs too (a TensorRT FP16 engine);
``onnx``  the written ``model.onnx`` in onnxruntime there (what the gate measured).

A precision class accepts the arithmetics it names (:data:`CLASSES`): the exporter's gate
(``export``: onnxruntime against float64 on the same machine) only fp32's envelope; the
model check's ``fp32`` class any fp32 implementation of the export, TF32 included; ``fp16``
also FP16.
A wrong model (BGR, no normalisation, a layer from another seed, another bundle's heads) is
hundreds to tens of thousands of envelopes away; the report gives each distance as a
fraction of its allowance (``ratio``), so the margin of every verdict is visible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .bundle import ProbeReference
from .geo import haversine_km
from .method import DEFAULT_SCALES_KM, DensityIndex

# Bumped whenever the rule below changes what passes (measurements under another rule are
# not comparable: bench/gate_seeds.py starts afresh).
RULE_VERSION = 2
QUANTITIES = ("cell_probs", "pd", "embedding")
ARITHMETICS = ("fp32", "tf32", "fp16")  # run with the network at export
EXPORTED = "onnx"  # the written model.onnx in onnxruntime on the exporting machine (the gate's measurement)
# The arithmetics whose envelopes each precision class accepts.
CLASSES: dict[str, tuple[str, ...]] = {
    "export": ("fp32",),
    "fp32": ("fp32", "tf32", EXPORTED),
    "fp16": ("fp32", "tf32", EXPORTED, "fp16"),
}
PRECISIONS = tuple(CLASSES)
# Measured over 20 demo seeds: onnxruntime's largest distance from float64 is at most 4.7x
# PyTorch float32's on the same photos (README "The parity gate"; PD, bounded through
# cell_probs, up to 8.9x: see pd_allowances); 8 leaves room for kernels this was not measured
# on, while every wrong model lands >= 2.4x beyond the model check's per-probe allowance (and
# thousands of times beyond the gate's).
MULTIPLE = 8.0
FLOOR = 1e-6  # eight float32 ulps at 1: a distance no float32 computation can promise below
PROB_TAU = 1e-6  # cell_probs: relative above, absolute below
TOP_N = 5  # ranks of the top cells held to the reference's order (where decided)


def _top(p: np.ndarray, n: int) -> list[int]:
    """The ``n`` most probable cells, most probable first; ties: lower index first (argmax's rule)."""
    return [int(c) for c in np.argsort(-p, kind="stable")[:n]]


class Distances:
    """Distances from a float64 reference, per photo: the one measure of the gate, the check and
    the envelope measured at export."""

    def __init__(self, centres: np.ndarray, scales_km: Sequence[float] = DEFAULT_SCALES_KM):
        self.centres = np.asarray(centres, dtype=np.float64)
        self.scales_km = tuple(float(s) for s in scales_km)
        self.density = DensityIndex(self.centres, self.scales_km)

    def within(self, cell: int) -> list[np.ndarray]:
        """For every scale, which cells lie within it of ``cell`` (the same cells as the service's)."""
        d = haversine_km(self.centres[cell, 0], self.centres[cell, 1], self.centres[:, 0], self.centres[:, 1])
        return [d <= s for s in self.scales_km]

    def one(self, probs: np.ndarray, emb: np.ndarray, ref_probs: np.ndarray, ref_emb: np.ndarray) -> dict:
        """One photo (all values finite): each quantity's distance, and the PD pair it came from."""
        ref_p = np.asarray(ref_probs, dtype=np.float64)
        got_p = np.asarray(probs, dtype=np.float64)
        cell = _top(ref_p, 1)[0]
        within = self.within(cell)
        pd_ref = np.array([float(np.sum(ref_p[inside], dtype=np.float64)) for inside in within])
        pd_got = self.density.density(cell, np.ascontiguousarray(probs, dtype=np.float32))
        return {
            "cell_probs": float(np.max(np.abs(np.log(got_p + PROB_TAU) - np.log(ref_p + PROB_TAU)))),
            "pd": float(np.max(np.abs(pd_got - pd_ref))),
            "embedding": float(np.linalg.norm(np.asarray(emb, np.float64) - np.asarray(ref_emb, np.float64))),
            "reference_pd": [float(x) for x in pd_ref],
            "output_pd": [float(x) for x in pd_got],
            "pd_cells": [int(np.count_nonzero(inside)) for inside in within],
        }

    def each(self, probs: np.ndarray, emb: np.ndarray, ref_probs: np.ndarray, ref_emb: np.ndarray) -> dict:
        """Each quantity's distance on every photo of ``[N, ...]`` outputs: ``{quantity: [N]}``."""
        rows = [self.one(probs[i], emb[i], ref_probs[i], ref_emb[i]) for i in range(len(ref_probs))]
        return {q: np.array([r[q] for r in rows], dtype=np.float64) for q in QUANTITIES}


def allowed(envelope: Mapping[str, Mapping[str, float]], precision: str) -> dict[str, float]:
    """``MULTIPLE x`` the largest envelope among the class's arithmetics ``+ FLOOR``, per quantity."""
    if precision not in CLASSES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    missing = [a for a in CLASSES[precision] if a not in envelope]
    if missing:
        raise ValueError(f"the reference has no {', '.join(missing)} envelope, which the {precision} class needs")
    return {q: MULTIPLE * max(float(envelope[a][q]) for a in CLASSES[precision]) + FLOOR for q in QUANTITIES}


def allowances(reference: ProbeReference, precision: str) -> list[dict[str, float]]:
    """Each photo's allowance. The exporter's gate (``export``) gives every photo the same:
    ``MULTIPLE x`` the largest distance float32 showed on any photo, so that kernels measured on
    other photos are judged alike. The model check gives each probe ``MULTIPLE x`` the distance
    the class's arithmetics showed on that probe, at least their median over all the photos
    measured: a photo that rounding hardly moves is held close, so a wrong model (off by O(1))
    cannot hide under an allowance that another, ill-conditioned photo set (when recorded)."""
    n = int(np.shape(reference.cell_probs)[0])
    if precision == "export" or reference.per_probe is None or reference.typical is None:
        return [allowed(reference.envelope, precision)] * n
    allowed(reference.envelope, precision)  # the class's arithmetics must all be there
    return [
        {
            q: MULTIPLE * max(max(reference.per_probe[a][q][i], reference.typical[a][q]) for a in CLASSES[precision])
            + FLOOR
            for q in QUANTITIES
        }
        for i in range(n)
    ]


def pd_allowances(limits: Mapping[str, float], reference_pd: Sequence[float], cells: Sequence[int]) -> list[float]:
    """PD's allowance at each scale: ``limits["pd"]``, or what ``limits["cell_probs"]`` lets PD move.

    A cell within its allowance ``d`` has ``|p - p64| <= (p64 + tau) (e^d - 1)``, so PD over
    ``n`` cells moves by at most ``(PD64 + n tau) (e^d - 1)``. PD's own float32 envelope cannot
    stand alone: PD's error is mostly the top cell's, which rounding moves by 1e-8 on one photo
    and 2e-4 on the next, with no regard to how two implementations compare elsewhere (measured
    on 20 demo seeds: onnxruntime's PD distance was 0.5 to 8.9x PyTorch float32's, its
    cell_probs distance 0.7 to 4.7x). So PD gets at least what the cell allowance implies.
    """
    grow = math.expm1(limits["cell_probs"])
    return [
        max(limits["pd"], (float(pd) + n * PROB_TAU) * grow + FLOOR) for pd, n in zip(reference_pd, cells, strict=True)
    ]


@dataclass
class ParityReport:
    """The verdict; ``distance`` and ``ratio`` are the largest over all photos (``cases``: each one's)."""

    ok: bool
    precision: str
    failures: list[str]
    probes: int
    distance: dict[str, float]  # per quantity, the distance from float64 of the photo nearest its allowance
    allowed: dict[str, float]  # per quantity, that photo's allowance
    ratio: float  # the largest distance / allowed: <= 1 passes; a wrong model's margin is its size
    top_ranks_decided: int  # (photo, rank) pairs whose order the float64 margins decide
    top_cells_equal: bool  # every decided rank as in the reference
    nonfinite_values: int
    cases: list[dict] = field(default_factory=list)
    rules: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Strict-JSON-safe: NaN and infinities become the strings "nan", "inf", "-inf"."""
        return _json_safe(asdict(self))

    def summary(self) -> str:
        """One line for logs and the CLI."""
        verdict = "OK" if self.ok else f"FAILED ({len(self.failures)} failures)"
        parts = ", ".join(f"{q} {self.distance.get(q, math.nan):.3g} of {self.allowed[q]:.3g}" for q in QUANTITIES)
        each = " (each photo's)" if self.rules.get("per_photo_allowance") else ""
        return (
            f"parity {verdict} [{self.precision}: {'+'.join(CLASSES[self.precision])} envelope{each} x{MULTIPLE:g}, "
            f"{self.probes} photos]: distance from float64 {parts}; worst ratio {self.ratio:.3g}; "
            f"top cells {'as' if self.top_cells_equal else 'NOT as'} the reference's at {self.top_ranks_decided} "
            f"decided ranks" + (f"; non-finite={self.nonfinite_values}" if self.nonfinite_values else "")
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
        f"{label} has {count} non-finite value(s): first {kind} at {names[i]} {column} {j}; photos affected: {where}"
    )


def compare_outputs(
    reference: ProbeReference,
    got_probs: np.ndarray,
    got_emb: np.ndarray,
    centres: np.ndarray,
    scales_km: Sequence[float] = DEFAULT_SCALES_KM,
    *,
    precision: str = "fp32",
    names: Sequence[str] | None = None,
    distances: Distances | None = None,
) -> ParityReport:
    """Hold a backend's outputs for the reference's photos (row ``i`` for photo ``i``) to ``precision``.

    ``centres`` are the bundle's ``[M, 2]`` cell centres and ``scales_km`` the served PD scales
    (or pass a ready ``distances``). ``names`` label the photos in failure messages (default
    ``probe i``). Outputs of the wrong shape fail (a backend serving another model); an
    inconsistent reference raises :class:`ValueError`.
    """
    limits = allowances(reference, precision)
    ref_probs, ref_emb = np.asarray(reference.cell_probs), np.asarray(reference.embeddings)
    got_probs, got_emb = np.asarray(got_probs), np.asarray(got_emb)
    if ref_probs.ndim != 2 or ref_emb.ndim != 2 or ref_probs.shape[0] != ref_emb.shape[0] or ref_probs.shape[0] == 0:
        raise ValueError(
            f"reference outputs must be cell_probs [B, M] and embedding [B, D] with B >= 1, "
            f"got {list(ref_probs.shape)} and {list(ref_emb.shape)}"
        )
    b, m = ref_probs.shape
    if distances is None:
        if np.shape(centres) != (m, 2):
            raise ValueError(f"cell centres must be [{m}, 2] for {m} cells, got {list(np.shape(centres))}")
        distances = Distances(centres, scales_km)
    elif distances.centres.shape != (m, 2):
        raise ValueError(f"cell centres must be [{m}, 2] for {m} cells, got {list(distances.centres.shape)}")
    labels = list(names) if names is not None else [f"probe {i}" for i in range(b)]
    if len(labels) != b:
        raise ValueError(f"{len(labels)} names for {b} photos")
    rules = {
        "classes": {precision: list(CLASSES[precision])},
        "multiple": MULTIPLE,
        "floor": FLOOR,
        "prob_tau": PROB_TAU,
        "top_n": TOP_N,
        "envelope": {a: dict(reference.envelope[a]) for a in CLASSES[precision]},
        "per_photo_allowance": precision != "export" and reference.per_probe is not None,
    }

    def report(failures: list[str], cases: list[dict], nonfinite: int) -> ParityReport:
        compared = [c for c in cases if not c.get("nonfinite")]
        nearest = {q: max(compared, key=lambda c: c["ratios"][q], default=None) for q in QUANTITIES}
        complete = len(compared) == b
        return ParityReport(
            ok=not failures,
            precision=precision,
            failures=failures,
            probes=b,
            distance={q: c[q] if c else math.nan for q, c in nearest.items()},
            allowed={q: c["allowed"][q] if c else max(lim[q] for lim in limits) for q, c in nearest.items()},
            ratio=max((c["ratio"] for c in compared), default=math.nan) if complete else math.nan,
            top_ranks_decided=sum(c["top_ranks_decided"] for c in compared),
            top_cells_equal=complete and all(c["top_cells_equal"] for c in compared),
            nonfinite_values=nonfinite,
            cases=cases,
            rules=rules,
        )

    if got_probs.shape != ref_probs.shape or got_emb.shape != ref_emb.shape:
        return report(
            [
                f"outputs have shapes cell_probs {list(got_probs.shape)} and embedding {list(got_emb.shape)}, "
                f"the reference {list(ref_probs.shape)} and {list(ref_emb.shape)}: not the same model"
            ],
            [],
            0,
        )

    failures: list[str] = []
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
    finite = (
        np.isfinite(ref_probs).all(axis=1)
        & np.isfinite(ref_emb).all(axis=1)
        & np.isfinite(got_probs).all(axis=1)
        & np.isfinite(got_emb).all(axis=1)
    )
    cases = []
    for i in range(b):
        if not finite[i]:
            cases.append({"probe": labels[i], "nonfinite": True})
            continue
        case, problems = _compare_one(
            labels[i], ref_probs[i], ref_emb[i], got_probs[i], got_emb[i], distances, limits[i]
        )
        cases.append(case)
        failures += problems
    return report(failures, cases, nonfinite)


def _compare_one(
    name: str,
    ref_p: np.ndarray,
    ref_e: np.ndarray,
    got_p: np.ndarray,
    got_e: np.ndarray,
    distances: Distances,
    limits: dict[str, float],
) -> tuple[dict, list[str]]:
    """One photo (all values finite): its distances, their ratios to the allowance, the rules it breaks."""
    measured = distances.one(got_p, got_e, ref_p, ref_e)
    # PD at each scale is held to its own envelope, or to what the allowed cell_probs distance
    # lets PD move there, whichever is larger (see pd_allowances).
    pd_limits = pd_allowances(limits, measured["reference_pd"], measured["pd_cells"])
    pd_ratios = [
        abs(o - r) / a for o, r, a in zip(measured["output_pd"], measured["reference_pd"], pd_limits, strict=True)
    ]
    at = int(np.argmax(pd_ratios))
    limits = {**limits, "pd": pd_limits[at]}
    shown = {
        **{q: measured[q] for q in QUANTITIES},
        "pd": abs(measured["output_pd"][at] - measured["reference_pd"][at]),
    }
    ratios = {q: shown[q] / limits[q] for q in QUANTITIES}
    r = np.asarray(ref_p, dtype=np.float64)
    g = np.asarray(got_p, dtype=np.float64)
    ref_top, got_top = _top(r, TOP_N + 1), _top(g, TOP_N)
    log_r = np.log(r[ref_top] + PROB_TAU)
    gaps = log_r[:-1] - log_r[1:]  # float64 margin between rank k and k + 1, k = 1..TOP_N
    decided = [k for k in range(1, TOP_N + 1) if gaps[k - 1] > 2 * limits["cell_probs"]]
    wrong = [k for k in decided if set(got_top[:k]) != set(ref_top[:k])]
    case = {
        "probe": name,
        **shown,
        "pd_largest": measured["pd"],  # over all scales (an envelope records this)
        "pd_scale_km": distances.scales_km[at],  # the scale nearest its allowance (``pd`` is there)
        "allowed": limits,
        "ratios": ratios,
        "ratio": max(ratios.values()),
        "reference_top": ref_top[:TOP_N],
        "output_top": got_top,
        "top1_margin": float(gaps[0]),
        "top_ranks_decided": len(decided),
        "top_cells_equal": not wrong,
        "reference_pd": measured["reference_pd"],
        "output_pd": measured["output_pd"],
    }
    problems = []
    if wrong:
        k = wrong[0]
        problems.append(
            f"{name}: top-{k} cells {got_top[:k]} are not the reference's {ref_top[:k]} although the float64 gap "
            f"after rank {k} is {gaps[k - 1]:.3g} in ln p (> 2 x {limits['cell_probs']:.3g} allowed)"
        )
    cell = ref_top[0]
    for q in QUANTITIES:
        if shown[q] > limits[q]:
            what = {
                "cell_probs": "cell probabilities: largest |ln(p + 1e-6) - ln(p64 + 1e-6)|",
                "pd": f"PD around cell {cell} at {distances.scales_km[at]:g} km",
                "embedding": "embedding: ||e - e64||",
            }[q]
            problems.append(
                f"{name}: {what} is {shown[q]:.3g} from float64, allowed {limits[q]:.3g} ({ratios[q]:.3g}x)"
            )
    return case, problems
