"""The one output comparison (swc_service.parity): the exporter's gate and the service's model check."""

from __future__ import annotations

import json

import numpy as np
import pytest

from swc_service.method import DEFAULT_SCALES_KM, DensityIndex, top_cell
from swc_service.parity import FP16_MIN_COSINE, compare_outputs

M, D, B = 400, 1792, 3


@pytest.fixture(scope="module")
def ref():
    """Sharp float32 outputs like a trained model's: top cells 0.1-0.9, tails down to 0."""
    rng = np.random.default_rng(7)
    centres = np.column_stack([rng.uniform(40, 50, M), rng.uniform(0, 15, M)])  # one region: PD sees many
    logits = rng.normal(0, 12, (B, M))
    logits[:, :40] -= 200  # far tail: underflows to exactly 0 in float32
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
    emb = rng.standard_normal((B, D)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert (probs == 0).any() and (probs[probs > 0] < 1e-20).any() and probs.max() < 0.999
    return centres, probs, emb


def compare(ref, probs=None, emb=None, **kw):
    centres, p, e = ref
    return compare_outputs(
        p, e, p if probs is None else probs, e if emb is None else emb, centres, DEFAULT_SCALES_KM, **kw
    )


def test_identical_outputs_pass_and_the_report_is_strict_json(ref):
    report = compare(ref)
    assert report.ok and report.failures == []
    assert report.max_abs_prob_diff == 0 and report.max_pd_diff == 0 and report.max_embedding_diff == 0
    assert report.top1_equal and report.top5_equal and report.probes == B
    assert report.min_embedding_cosine == pytest.approx(1.0, abs=1e-12)
    json.loads(json.dumps(report.as_dict(), allow_nan=False))
    assert "parity OK" in report.summary()


def test_pd_comes_from_the_service_density_index(ref):
    centres, p, _ = ref
    case = compare(ref).cases[1]
    expected = DensityIndex(centres, DEFAULT_SCALES_KM).density(top_cell(p[1]), p[1])
    assert case["reference_pd"] == [float(x) for x in expected]


@pytest.mark.parametrize("which", ["ref_probs", "ref_emb", "got_probs", "got_emb"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nonfinite_anywhere_fails_and_says_where(ref, which, bad, precision):
    centres, p, e = ref
    arrays = {"ref_probs": p.copy(), "ref_emb": e.copy(), "got_probs": p.copy(), "got_emb": e.copy()}
    arrays[which][1, 17] = bad
    report = compare_outputs(
        arrays["ref_probs"], arrays["ref_emb"], arrays["got_probs"], arrays["got_emb"], centres,
        DEFAULT_SCALES_KM, precision=precision,
    )  # fmt: skip
    assert not report.ok and report.nonfinite_values == 1
    side = "reference" if which.startswith("ref") else "output"
    array = "cell_probs" if which.endswith("probs") else "embedding"
    kind = "NaN" if np.isnan(bad) else ("+inf" if bad > 0 else "-inf")
    (message,) = [f for f in report.failures if "non-finite" in f]
    assert f"{side} {array}" in message and kind in message and "probe 1" in message and " 17" in message
    assert report.cases[1] == {"probe": "probe 1", "nonfinite": True}
    assert not report.top1_equal  # not every probe was compared
    json.loads(json.dumps(report.as_dict(), allow_nan=False))


def test_nan_on_every_probe_never_passes(ref):
    centres, p, e = ref
    nan_p = np.full_like(p, np.nan)
    for precision in ("fp32", "fp16"):
        report = compare_outputs(nan_p, e, nan_p, e, centres, DEFAULT_SCALES_KM, precision=precision)
        assert not report.ok and np.isnan(report.max_abs_prob_diff)
        assert report.as_dict()["max_abs_prob_diff"] == "nan"


def test_top5_order_swap_fails(ref):
    centres, p, e = ref
    near_tie = p.copy()
    a, b, after = np.argsort(-p[0], kind="stable")[2:5]
    near_tie[0, b] = p[0, a] - np.float32(4e-7)  # 3rd and 4th cells 4e-7 apart
    assert near_tie[0, b] > p[0, after] and p[0, a] > 1e-3
    got = near_tie.copy()
    got[0, [a, b]] = near_tie[0, [b, a]]  # swapped: every probability within 4e-7
    report = compare_outputs(near_tie, e, got, e, centres, DEFAULT_SCALES_KM)
    assert not report.ok and not report.top5_equal and report.top1_equal
    assert report.max_abs_prob_diff < 1e-6 and report.max_pd_diff <= 1e-6
    (message,) = report.failures
    assert message.startswith("probe 0: top-5 cells") and f"{int(a)}, {int(b)}" in message
    assert compare_outputs(near_tie, e, got, e, centres, DEFAULT_SCALES_KM, precision="fp16").ok


def test_tiny_tail_noise_passes(ref):
    _, p, e = ref
    rng = np.random.default_rng(1)
    got = p.astype(np.float64)
    tail = got < 1e-10
    got[tail] *= rng.uniform(0.2, 5.0, tail.sum())  # tail cells moved by 20-500 %
    got *= 1 + rng.normal(0, 1e-7, got.shape)  # float32 rounding everywhere
    got_e = (e * (1 + rng.normal(0, 1e-6, e.shape))).astype(np.float32)
    report = compare(ref, probs=got.astype(np.float32), emb=got_e)
    assert report.ok, report.failures
    assert 0 < report.max_abs_prob_diff <= 1e-6 and report.max_embedding_diff > 0


def test_absolute_probability_difference_fails(ref):
    _, p, _ = ref
    got = p.copy()
    cell = int(np.argsort(-p[2])[1])
    got[2, cell] += np.float32(3e-6)
    report = compare(ref, probs=got)
    assert not report.ok
    assert any(f.startswith(f"probe 2: cell {cell} probability") and "|diff|" in f for f in report.failures)
    assert report.max_abs_prob_diff == pytest.approx(3e-6, rel=1e-2)


def test_relative_difference_fails_on_small_but_significant_cells(ref):
    _, p, _ = ref
    got = p.copy()
    cell = int(np.flatnonzero((p[0] > 2e-6) & (p[0] < 2e-5))[0])
    got[0, cell] *= np.float32(1.01)  # |diff| < 1e-6 but 1 % relative
    report = compare(ref, probs=got)
    assert not report.ok and report.max_abs_prob_diff < 1e-6
    (message,) = report.failures
    assert f"probe 0: cell {cell}" in message and "relative diff" in message


def test_pd_difference_fails_when_every_cell_is_within_tolerance(ref):
    centres, p, _ = ref
    got = p.copy()
    top = top_cell(p[1])
    near = np.argsort(-p[1])[1:60]
    got[1, near] += np.float32(9e-7)  # each cell within 1e-6, and within 1e-3 relative where p >= 1e-6...
    got[1, near[p[1, near] < 1e-3]] = p[1, near[p[1, near] < 1e-3]]  # ...so only the big ones move
    moved = int(np.count_nonzero(got[1] != p[1]))
    assert moved >= 2
    report = compare(ref, probs=got)
    assert not report.ok and report.max_abs_prob_diff < 1e-6 and report.max_rel_prob_diff < 1e-3
    assert report.failures and all(f.startswith("probe 1: PD at ") for f in report.failures)
    assert f"around cell {top}" in report.failures[0] and report.max_pd_diff > 1e-6


def test_embedding_absolute_and_cosine_rules(ref):
    _, _, e = ref
    got = e.copy()
    got[0, 5] += np.float32(2e-4)
    report = compare(ref, emb=got)
    assert not report.ok and any("probe 0: embedding element 5" in f for f in report.failures)

    rng = np.random.default_rng(3)
    turned = (e + rng.choice([-9e-5, 9e-5], e.shape)).astype(np.float32)  # every element within 1e-4
    report = compare(ref, emb=turned)
    assert report.max_embedding_diff < 1e-4 and report.min_embedding_cosine < 1 - 1e-6
    assert not report.ok and all("embedding cosine" in f for f in report.failures)


def test_fp16_rules_and_measured_deviations(ref):
    _, p, e = ref
    rng = np.random.default_rng(5)
    got = (p * (1 + rng.normal(0, 2e-3, p.shape))).astype(np.float32)
    got_e = (e + rng.normal(0, 0.01 / np.sqrt(D), e.shape)).astype(np.float32)  # cosine ~0.99995
    assert not compare(ref, probs=got, emb=got_e).ok
    report = compare(ref, probs=got, emb=got_e, precision="fp16")
    assert report.ok, report.failures
    assert report.max_rel_prob_diff > 1e-3 and FP16_MIN_COSINE < report.min_embedding_cosine < 1 - 1e-6
    assert report.tolerances == {"top_n_equal": 1, "embedding_min_cosine": FP16_MIN_COSINE}

    far = (e + rng.normal(0, 0.1 / np.sqrt(D), e.shape)).astype(np.float32)  # cosine ~0.995
    report = compare(ref, emb=far, precision="fp16")
    assert not report.ok and len(report.failures) == B and "embedding cosine" in report.failures[0]

    swapped = p.copy()
    first, second = np.argsort(-p[2])[:2]
    swapped[2, [first, second]] = p[2, [second, first]]
    report = compare(ref, probs=swapped, precision="fp16")
    assert not report.ok
    assert report.failures == [
        f"probe 2: top cell {second} (p {p[2, first]:.6g}) differs from the reference's {first} (p {p[2, first]:.6g})"
    ]


def test_wrong_shapes_fail_and_a_bad_reference_raises(ref):
    centres, p, e = ref
    report = compare(ref, probs=p[:, :-1])
    assert not report.ok and "not the same model" in report.failures[0] and report.cases == []
    with pytest.raises(ValueError, match="cell centres"):
        compare_outputs(p, e, p, e, centres[:-1], DEFAULT_SCALES_KM)
    with pytest.raises(ValueError, match="precision"):
        compare(ref, precision="int8")
    with pytest.raises(ValueError, match="names"):
        compare(ref, names=["a"])


def test_names_label_the_failures(ref):
    _, p, _ = ref
    got = p.copy()
    got[1, 3] = np.nan
    report = compare(ref, probs=got, names=["a", "b 400x300", "c"])
    assert "b 400x300 cell 3" in report.failures[0]
