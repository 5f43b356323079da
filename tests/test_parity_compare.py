"""The one agreement rule (swc_service.parity): distances from float64, allowances from envelopes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from swc_service.bundle import ProbeReference
from swc_service.geo import haversine_km
from swc_service.method import DEFAULT_SCALES_KM, DensityIndex
from swc_service.parity import CLASSES, FLOOR, MULTIPLE, PROB_TAU, QUANTITIES, allowances, allowed, compare_outputs

M, D, B = 400, 1792, 3
# Envelopes of the sizes measured on the demo model: TF32 and FP16 thousands of times fp32's.
ENVELOPE = {
    "fp32": {"cell_probs": 3e-4, "pd": 6e-6, "embedding": 1.5e-5},
    "onnx": {"cell_probs": 6e-4, "pd": 1.4e-5, "embedding": 4e-5},
    "tf32": {"cell_probs": 0.05, "pd": 0.004, "embedding": 0.003},
    "fp16": {"cell_probs": 0.2, "pd": 0.02, "embedding": 0.02},
}


@pytest.fixture(scope="module")
def ref():
    """A sharp float64 reference like a trained model's: top cells 0.1-0.9, tails down to 1e-90."""
    rng = np.random.default_rng(7)
    centres = np.column_stack([rng.uniform(40, 50, M), rng.uniform(0, 15, M)])  # one region: PD sees many
    logits = rng.normal(0, 12, (B, M))
    logits[:, :40] -= 200  # far tail: 0 once served as float32
    logits[:, 300] = logits.max(axis=1) + 5  # a top cell decided in every class
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    emb = rng.standard_normal((B, D))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return centres, ProbeReference(probs, emb, ENVELOPE, {"test": True})


def compare(ref, probs=None, emb=None, **kw):
    centres, r = ref
    got_p = r.cell_probs.astype(np.float32) if probs is None else probs
    got_e = r.embeddings.astype(np.float32) if emb is None else emb
    return compare_outputs(r, got_p, got_e, centres, DEFAULT_SCALES_KM, **kw)


def test_allowance_is_a_multiple_of_the_largest_envelope_of_the_class():
    for precision, arithmetics in CLASSES.items():
        limits = allowed(ENVELOPE, precision)
        for q in QUANTITIES:
            assert limits[q] == pytest.approx(MULTIPLE * max(ENVELOPE[a][q] for a in arithmetics) + FLOOR)
    assert (
        allowed(ENVELOPE, "export")["embedding"]
        < allowed(ENVELOPE, "fp32")["embedding"]
        < allowed(ENVELOPE, "fp16")["embedding"]
    )
    with pytest.raises(ValueError, match="tf32"):
        allowed({"fp32": ENVELOPE["fp32"]}, "fp32")
    with pytest.raises(ValueError, match="precision"):
        allowed(ENVELOPE, "int8")


def test_float32_of_the_reference_passes_and_the_report_is_strict_json(ref):
    for precision in CLASSES:
        report = compare(ref, precision=precision)
        assert report.ok and report.failures == [], report.failures
        assert report.top_cells_equal and report.top_ranks_decided >= B and report.probes == B
        assert 0 <= report.ratio < 0.01
    json.loads(json.dumps(report.as_dict(), allow_nan=False))
    assert "parity OK" in report.summary() and "float64" in report.summary()


def test_pd_of_the_output_is_the_services_and_the_references_is_float64(ref):
    centres, r = ref
    report = compare(ref)
    case = report.cases[1]
    got = r.cell_probs[1].astype(np.float32)
    cell = int(np.argmax(r.cell_probs[1]))
    assert case["output_pd"] == [float(x) for x in DensityIndex(centres, DEFAULT_SCALES_KM).density(cell, got)]
    d = haversine_km(centres[cell, 0], centres[cell, 1], centres[:, 0], centres[:, 1])
    expected = [float(r.cell_probs[1][d <= s].sum()) for s in DEFAULT_SCALES_KM]
    np.testing.assert_allclose(case["reference_pd"], expected, rtol=1e-12)


@pytest.mark.parametrize("which", ["ref_probs", "ref_emb", "got_probs", "got_emb"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("precision", ["export", "fp32", "fp16"])
def test_nonfinite_anywhere_fails_and_says_where(ref, which, bad, precision):
    centres, r = ref
    arrays = {
        "ref_probs": r.cell_probs.copy(),
        "ref_emb": r.embeddings.copy(),
        "got_probs": r.cell_probs.astype(np.float32),
        "got_emb": r.embeddings.astype(np.float32),
    }
    arrays[which][1, 17] = bad
    reference = ProbeReference(arrays["ref_probs"], arrays["ref_emb"], ENVELOPE, {})
    report = compare_outputs(reference, arrays["got_probs"], arrays["got_emb"], centres, precision=precision)
    assert not report.ok and report.nonfinite_values == 1
    side = "reference" if which.startswith("ref") else "output"
    array = "cell_probs" if which.endswith("probs") else "embedding"
    kind = "NaN" if np.isnan(bad) else ("+inf" if bad > 0 else "-inf")
    (message,) = [f for f in report.failures if "non-finite" in f]
    assert f"{side} {array}" in message and kind in message and "probe 1" in message and " 17" in message
    assert report.cases[1] == {"probe": "probe 1", "nonfinite": True}
    assert not report.top_cells_equal and np.isnan(report.ratio)  # not every probe was compared
    json.loads(json.dumps(report.as_dict(), allow_nan=False))


def test_nan_on_every_probe_never_passes(ref):
    centres, r = ref
    nan_p = np.full_like(r.cell_probs, np.nan)
    for precision in CLASSES:
        report = compare_outputs(ProbeReference(nan_p, r.embeddings, ENVELOPE, {}), nan_p, r.embeddings, centres,
                                 precision=precision)  # fmt: skip
        assert not report.ok and np.isnan(report.distance["cell_probs"])
        assert report.as_dict()["distance"]["cell_probs"] == "nan"


def _ranked(r: np.ndarray, gaps: list[float]) -> np.ndarray:
    """A copy of float64 probabilities whose top 6 cells sit ``gaps`` apart in ln p."""
    out = r.copy()
    top = np.argsort(-r, kind="stable")[:6]
    logs = np.log(out[top[0]]) - np.concatenate([[0.0], np.cumsum(gaps)])
    out[top] = np.exp(logs)
    return out / out.sum()


def test_a_near_tie_may_swap_a_decided_rank_may_not(ref):
    centres, r = ref
    limit = allowed(ENVELOPE, "export")["cell_probs"]
    probs = np.stack([_ranked(r.cell_probs[i], [4.0, 0.5 * limit, 1.0, 1.0, 1.0]) for i in range(B)])
    reference = ProbeReference(probs, r.embeddings, ENVELOPE, {})
    top = np.argsort(-probs[0], kind="stable")[:6]
    got = probs.astype(np.float32)
    got[0, [top[1], top[2]]] = got[0, [top[2], top[1]]]  # ranks 2 and 3 are a near-tie: a tie
    report = compare_outputs(reference, got, r.embeddings, centres, precision="export")
    assert report.ok, report.failures
    assert report.cases[0]["top_ranks_decided"] == 4 and report.cases[1]["top_ranks_decided"] == 4

    got = probs.astype(np.float32)
    got[0, [top[0], top[1]]] = got[0, [top[1], top[0]]]  # ranks 1 and 2 are 4.0 apart: decided
    report = compare_outputs(reference, got, r.embeddings, centres, precision="fp16")  # even in the loosest class
    assert not report.ok and not report.top_cells_equal
    assert report.failures[0].startswith(f"probe 0: top-1 cells [{top[1]}] are not the reference's [{top[0]}]")


def test_each_quantity_fails_alone(ref):
    centres, r = ref
    limits = allowed(ENVELOPE, "export")

    got = r.cell_probs.astype(np.float64)
    mid = int(np.flatnonzero((got[0] > 1e-4) & (got[0] < 1e-2))[0])  # a cell well above tau, not a top one
    got[0, mid] *= np.exp(3 * limits["cell_probs"])
    report = compare(ref, probs=got.astype(np.float32), precision="export")
    (message,) = report.failures
    assert message.startswith("probe 0: cell probabilities") and report.cases[0]["ratios"]["cell_probs"] > 2.5

    got = r.cell_probs.astype(np.float64)
    got[2] *= np.exp(0.9 * limits["cell_probs"])  # every cell moved the same way, within its allowance:
    report = compare(ref, probs=got.astype(np.float32), precision="export")
    case = report.cases[2]  # PD may move as far as its cells allow, no further
    assert report.ok and 0.5 < case["ratios"]["pd"] <= case["ratios"]["cell_probs"] < 1
    got[2] *= np.exp(0.6 * limits["cell_probs"])  # 1.5x: beyond, in the cells and in PD
    report = compare(ref, probs=got.astype(np.float32), precision="export")
    assert {f.split(" is ")[0].split(": ")[1][:3] for f in report.failures} == {"cel", "PD "}
    assert report.cases[2]["ratios"]["pd"] > 1.2

    rng = np.random.default_rng(3)
    turned = r.embeddings + rng.normal(0, 3 * limits["embedding"] / np.sqrt(D), r.embeddings.shape)
    report = compare(ref, emb=turned.astype(np.float32), precision="export")
    assert not report.ok and len(report.failures) == B and all("embedding: ||e - e64||" in f for f in report.failures)


def test_each_class_accepts_its_arithmetics_noise_and_refuses_more(ref):
    """Noise of a TF32 size passes the fp32 class, not the exporter's gate; FP16 size needs fp16."""
    centres, r = ref
    rng = np.random.default_rng(5)

    def noisy(scale: str, factor: float) -> tuple[np.ndarray, np.ndarray]:
        """Distances of about ``factor`` x the arithmetic's envelope."""
        env = ENVELOPE[scale]
        logits = np.log(r.cell_probs) + rng.uniform(-1, 1, r.cell_probs.shape) * factor * env["cell_probs"] / 2
        p = np.exp(logits)
        e = r.embeddings + rng.normal(0, factor * env["embedding"] / np.sqrt(D), r.embeddings.shape)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32), e.astype(np.float32)

    tf32 = noisy("tf32", 1.0)
    assert compare(ref, *tf32, precision="fp32").ok and compare(ref, *tf32, precision="fp16").ok
    assert not compare(ref, *tf32, precision="export").ok
    fp16 = noisy("fp16", 3.0)
    assert compare(ref, *fp16, precision="fp16").ok
    assert not compare(ref, *fp16, precision="fp32").ok


def test_wrong_shapes_fail_and_a_bad_reference_raises(ref):
    centres, r = ref
    report = compare(ref, probs=r.cell_probs[:, :-1].astype(np.float32))
    assert not report.ok and "not the same model" in report.failures[0] and report.cases == []
    with pytest.raises(ValueError, match="cell centres"):
        compare_outputs(r, r.cell_probs, r.embeddings, centres[:-1])
    with pytest.raises(ValueError, match="precision"):
        compare(ref, precision="int8")
    with pytest.raises(ValueError, match="names"):
        compare(ref, names=["a"])
    only_fp32 = ProbeReference(r.cell_probs, r.embeddings, {"fp32": ENVELOPE["fp32"]}, {})
    assert compare_outputs(only_fp32, r.cell_probs, r.embeddings, centres, precision="export").ok
    no_fp16 = ProbeReference(r.cell_probs, r.embeddings, {k: ENVELOPE[k] for k in ("fp32", "tf32", "onnx")}, {})
    with pytest.raises(ValueError, match="fp16 envelope"):
        compare_outputs(no_fp16, r.cell_probs, r.embeddings, centres, precision="fp16")


def test_tail_cells_below_tau_count_absolutely(ref):
    """A tail cell at 1e-30 moving 100-fold changes nothing served: below tau it is absolute."""
    centres, r = ref
    got = r.cell_probs.copy()
    tail = got < 1e-12
    got[tail] *= 100
    report = compare(ref, probs=got.astype(np.float32))
    assert report.ok and report.distance["cell_probs"] < 1e-10 / PROB_TAU


def test_the_model_check_allows_each_probe_its_own_envelope_at_least_the_median(ref):
    """A probe that rounding hardly moves is held close: a wrong model cannot hide under the
    allowance an ill-conditioned photo set. The exporter's gate keeps the largest, for every photo."""
    centres, r = ref
    quiet, loud = 0.1, 10.0  # probe 0 moves a tenth of the typical photo, probe 2 ten times as much
    per_probe = {a: {q: [quiet * v, v, loud * v] for q, v in ENVELOPE[a].items()} for a in ENVELOPE}
    typical = {a: {q: v for q, v in ENVELOPE[a].items()} for a in ENVELOPE}
    envelope = {a: {q: loud * v for q, v in ENVELOPE[a].items()} for a in ENVELOPE}
    reference = ProbeReference(r.cell_probs, r.embeddings, envelope, {}, per_probe, typical)
    limits = allowances(reference, "fp32")
    for q in QUANTITIES:
        own = [MULTIPLE * max(max(per_probe[a][q][i], typical[a][q]) for a in CLASSES["fp32"]) + FLOOR
               for i in range(B)]  # fmt: skip
        assert [lim[q] for lim in limits] == pytest.approx(own)
    assert limits[0] == limits[1] and limits[2]["embedding"] > 9 * limits[0]["embedding"]  # the median as floor
    assert allowances(reference, "export") == [allowed(envelope, "export")] * B

    rng = np.random.default_rng(9)
    turned = r.embeddings.copy()
    step = 3 * limits[0]["embedding"]  # beyond probe 0's allowance, far within the set's largest
    turned[0] += rng.normal(0, step / np.sqrt(D), D)
    report = compare_outputs(reference, r.cell_probs, turned, centres, precision="fp32")
    assert not report.ok and report.failures[0].startswith("probe 0: embedding")
    assert report.rules["per_photo_allowance"] and "(each photo's)" in report.summary()
    flat = ProbeReference(r.cell_probs, r.embeddings, envelope, {})  # without per-probe distances: the largest
    assert compare_outputs(flat, r.cell_probs, turned, centres, precision="fp32").ok
