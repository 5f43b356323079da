"""The parity gate: passes a sharp model's faithful export, fails wrong exports, never passes NaN."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from swc_service import bundle as B
from swc_service.bundle import load_bundle
from swc_service.parity import PD_REL_TOL, PD_TOL, compare_outputs
from swc_service.preprocessing import preprocess
from visloc_export import samples
from visloc_export.build import demo_net_for, parity_batches
from visloc_export.model import Normalize
from visloc_export.onnx_export import export_onnx
from visloc_export.parity import check_parity

# --------------------------------------------------------------------------- the export rules, synthetic

M = 400
RNG = np.random.default_rng(0)
CENTRES = np.stack([RNG.uniform(40, 41, M), RNG.uniform(10, 11, M)], axis=1)  # all within ~150 km
SCALES = (1.0, 25.0, 200.0)


def compare(ref, got, precision="export"):
    return compare_outputs(*ref, *got, CENTRES, SCALES, precision=precision)


def _outputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 25, (2, M))  # sharp: tails far below 1e-20, some exactly 0 in float32
    probs = torch.softmax(torch.from_numpy(logits).float(), dim=1).numpy()
    emb = rng.standard_normal((2, 1792)).astype(np.float32)
    return probs, emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_identical_sharp_outputs_pass():
    probs, emb = _outputs()
    assert (probs == 0).any() and (probs[probs > 0] < 1e-20).any()
    report = compare((probs, emb), (probs.copy(), emb.copy()))
    assert report.ok and report.top5_equal and report.max_pd_diff == 0.0


def test_tail_differences_that_move_log_p_pass():
    """Tail cells at 1e-13 .. 0: log p moves by a lot, what the service serves does not."""
    probs, emb = _outputs()
    got = probs.copy()
    tail = probs < 1e-12
    got[tail] = np.where(probs[tail] > 0, probs[tail] * 2, 1e-30).astype(np.float32)
    assert compare((probs, emb), (got, emb)).ok


def test_float32_noise_of_a_faithful_export_passes_only_under_the_export_rules():
    """2e-5 relative on every cell (|dp| up to ~2e-5 on the top cell): what PyTorch vs
    onnxruntime give on a sharp model. The Triton-vs-recorded-outputs rules (fp32) refuse it."""
    probs, emb = _outputs()
    got = (probs.astype(np.float64) * (1 + 2e-5 * np.sign(np.arange(M) % 2 - 0.5))).astype(np.float32)
    assert compare((probs, emb), (got, emb)).ok
    assert not compare((probs, emb), (got, emb), precision="fp32").ok


@pytest.mark.parametrize("where", ["reference", "output", "both"])
def test_nan_never_passes_and_says_where(where):
    probs, emb = _outputs()
    ref, got = probs.copy(), probs.copy()
    cell = int(np.argmin(probs[1]))  # an underflowed tail cell, where log-differences hid NaN
    if where in ("reference", "both"):
        ref[1, cell] = np.nan
    if where in ("output", "both"):
        got[1, cell] = np.nan
    report = compare((ref, emb), (got, emb))
    assert not report.ok
    assert any(f"NaN at probe 1 cell {cell}" in f for f in report.failures)


def test_inf_in_embedding_fails():
    probs, emb = _outputs()
    bad = emb.copy()
    bad[0, 5] = np.inf
    report = compare((probs, emb), (probs, bad))
    assert any("output embedding" in f and "inf" in f for f in report.failures)


def test_each_rule_can_fail():
    probs, emb = _outputs()
    top = np.argsort(-probs[0])

    got = probs.copy()
    got[0, top[[1, 2]]] = got[0, top[[2, 1]]]  # second and third swap places
    assert any("top-5 cells" in f for f in compare((probs, emb), (got, emb)).failures)

    ref, got = probs.copy(), probs.copy()
    mid = int(top[-1])
    ref[0, mid], got[0, mid] = 1e-4, 1.002e-4  # relative 2e-3 on a cell with p >= 1e-6
    failures = compare((ref, emb), (got, emb)).failures
    assert len(failures) == 1 and "relative diff" in failures[0]

    got_emb = emb.copy()
    got_emb[0, 0] += 2e-4
    assert any("embedding element 0" in f for f in compare((probs, emb), (probs, got_emb)).failures)


def test_pd_difference_alone_fails():
    """Tail cells, each below the relative floor, that add up in PD."""
    probs = np.full((1, M), 5e-7, dtype=np.float32)
    probs[0, 0] = 0.01
    emb = _outputs()[1][:1]
    got = probs.copy()
    got[0, 1:] = np.float32(9.9e-7)  # every tail cell below 1e-6 in both: not compared one by one
    report = compare((probs, emb), (got, emb))
    assert report.max_pd_diff > PD_TOL + PD_REL_TOL * 0.011
    assert len(report.failures) == 1 and "PD at 200 km" in report.failures[0]


# --------------------------------------------------------------------------- a sharp model, wrong exports


class _BGR(Normalize):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return super().forward(image[..., [2, 1, 0]])


class _NoNormalisation(Normalize):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.permute(0, 3, 1, 2).to(torch.float32) / 255.0


@pytest.fixture(scope="module")
def sharp_net(demo_bundle):
    return demo_net_for(load_bundle(demo_bundle))


def test_sharp_demo_model_passes_the_gate(demo_bundle, sharp_net):
    """The demo model is sharp like a trained one (tails below 1e-20, some exactly 0), and its
    export passed the gate when the bundle was built (test_export re-runs the gate on it)."""
    bundle = load_bundle(demo_bundle)
    parity = json.loads((bundle.path / B.PARITY).read_text())
    assert parity["ok"] is True and parity["failures"] == []
    assert parity == bundle.manifest["parity"]
    assert B.PARITY in bundle.manifest["files"] and bundle.verify_checksums() == []
    with torch.no_grad():
        probs = np.concatenate(
            [
                sharp_net(torch.from_numpy(preprocess(samples.photo_bytes(i)).array[None].copy()))[0].numpy()
                for i in range(8)
            ]
        )
    assert (probs == 0).any()
    assert np.mean(probs < 1e-20) > 0.1
    assert probs.max() > 0.1 and len(set(np.argmax(probs, axis=1).tolist())) >= 4


@pytest.mark.parametrize("wrong", ["weight_1e-3", "bgr", "no_normalisation"])
def test_wrong_exports_fail_the_gate(sharp_net, tmp_path, wrong):
    bad = copy.deepcopy(sharp_net)
    if wrong == "weight_1e-3":
        with torch.no_grad():
            bad.backbone._conv_stem.weight.mul_(1 + 1e-3)
    elif wrong == "bgr":
        bad.normalize = _BGR()
    else:
        bad.normalize = _NoNormalisation()
    export_onnx(bad, tmp_path / "model.onnx")
    report = check_parity(sharp_net, tmp_path / "model.onnx", parity_batches()[:2])
    assert not report.ok
    assert report.failures and all(f.startswith("batch ") for f in report.failures)
