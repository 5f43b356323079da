"""The parity gate on the demo model: a faithful export passes at any thread count, wrong ones
fail by wide margins (the rule itself: tests/test_parity_compare.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.gate_seeds import WRONG, wrong_model
from swc_service import bundle as B
from swc_service.bundle import load_bundle
from swc_service.parity import ARITHMETICS, EXPORTED, MULTIPLE, QUANTITIES
from visloc_client.preprocessing import prepare_image, preprocess
from visloc_export import demo, samples
from visloc_export.build import demo_net_for
from visloc_export.onnx_export import export_onnx
from visloc_export.parity import check_parity, parity_batches
from visloc_export.probes import PROBE_SOURCES, candidate_seeds
from visloc_export.reference import TorchReference, distinct, measure, round_to


@pytest.fixture(scope="module")
def sharp_net(demo_bundle):
    return demo_net_for(load_bundle(demo_bundle))


@pytest.fixture(scope="module")
def measured(demo_bundle, sharp_net):
    """The gate's photos in float64 (once: about 20 s), and PyTorch float32's envelope on them."""
    bundle = load_bundle(demo_bundle)
    model = TorchReference(sharp_net)
    photos = distinct([image for batch in parity_batches() for image in batch])
    return bundle, model, measure(model, photos, bundle.centres, arithmetics=("fp32",), progress=False)


def test_the_bundle_records_its_gate_and_the_reference(demo_bundle, sharp_net):
    """The demo model is sharp like a trained one (tails below 1e-20, some exactly 0); its export
    passed the gate when the bundle was built, and the probes carry the float64 reference."""
    bundle = load_bundle(demo_bundle)
    parity = json.loads((bundle.path / B.PARITY).read_text())
    assert parity["ok"] is True and parity["failures"] == [] and 0 < parity["ratio"] <= 1
    assert parity["precision"] == "export" and parity["rules"]["multiple"] == MULTIPLE
    assert parity == bundle.manifest["parity"]
    assert B.PARITY in bundle.manifest["files"] and bundle.verify_checksums() == []
    ref = bundle.probes.reference
    assert set(ref.envelope) == {*ARITHMETICS, EXPORTED}
    # What the export computes, accepted on any machine: its largest distance over the gate's photos.
    largest = {q: max(c["pd_largest"] if q == "pd" else c[q] for c in parity["cases"]) for q in QUANTITIES}
    assert ref.envelope[EXPORTED] == largest
    for q in QUANTITIES:  # TF32 and FP16 are thousands of times float32's noise
        assert ref.envelope["tf32"][q] > 100 * ref.envelope["fp32"][q]
    assert ref.info["photos"] == 20 and ref.info["cpu"] and ref.info["runtime"].startswith("PyTorch")
    assert ref.cell_probs.dtype == np.float64 and ref.cell_probs.shape == bundle.probes.cell_probs.shape
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


def test_each_probe_is_the_candidate_whose_top_cell_leads_most(demo_bundle, sharp_net):
    """So that a backend computing the model cannot flip it: a refusal is never a coin toss."""
    bundle = load_bundle(demo_bundle)
    for (seed, size), source, image in zip(PROBE_SOURCES, bundle.probes.info["sources"], bundle.probes.images,
                                           strict=True):  # fmt: skip
        seeds = candidate_seeds(seed)
        batch = np.stack([prepare_image(samples.photo(s, size)) for s in seeds])
        with torch.no_grad():
            probs = sharp_net(torch.from_numpy(batch))[0].double().numpy()
        top2 = -np.sort(-probs, axis=1)[:, :2]
        margins = np.log(top2[:, 0] + 1e-6) - np.log(top2[:, 1] + 1e-6)
        assert source["seed"] == seeds[int(np.argmax(margins))] and len(seeds) > 1
        np.testing.assert_array_equal(image, batch[int(np.argmax(margins))])
        assert margins.max() > np.median(margins)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_the_verdict_holds_at_1_2_and_4_threads(measured, threads):
    """PyTorch's envelope and onnxruntime's outputs both measured at 1, 2 and 4 threads."""
    bundle, model, m = measured
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        again = measure(model, m.photos, bundle.centres, arithmetics=("fp32",), float64=(m.cell_probs, m.embeddings),
                        progress=False)  # fmt: skip
        report, _ = check_parity(model, bundle.model_path, bundle.centres, parity_batches(), measurement=again,
                                 threads=threads)  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert report.ok, report.failures
    assert report.ratio < 0.75  # the same side of 1 by a margin, whatever the threads


@pytest.fixture(scope="module")
def other_net(demo_bundle):
    """Another demo bundle's network (seed 1): its heads on this backbone are a wrong export."""
    bundle = load_bundle(demo_bundle)
    net, _ = demo.build_demo_net(bundle.num_cells, demo.cell_centres(bundle.num_cells, np.random.default_rng(1)), 1)
    return net


@pytest.mark.parametrize("wrong", WRONG)
def test_wrong_exports_fail_the_gate_by_a_wide_margin(measured, sharp_net, other_net, tmp_path, wrong):
    bundle, model, m = measured
    export_onnx(wrong_model(sharp_net, wrong, other_net), tmp_path / "model.onnx")
    report, _ = check_parity(model, tmp_path / "model.onnx", bundle.centres, parity_batches(), measurement=m)
    assert not report.ok
    assert report.ratio > 100, report.summary()  # measured over 20 seeds: thousands (docs/BENCHMARKS.md)
    assert report.failures and all(f.startswith("batch ") for f in report.failures)


def test_tf32_rounding_keeps_ten_mantissa_bits_to_nearest_even():
    x = torch.tensor([1.0 + 2**-10, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 1.0 + 2**-11 + 2**-20, -(1.0 + 2**-11)])
    got = round_to(x, "tf32")
    assert got.tolist() == [1.0 + 2**-10, 1.0, 1.0 + 2 * 2**-10, 1.0 + 2**-10, -1.0]  # ties to even
    assert torch.isnan(round_to(torch.tensor([float("nan")]), "tf32")).all()
    assert round_to(torch.tensor([float("inf")]), "tf32").item() == float("inf")
    assert round_to(torch.tensor([70000.0]), "fp16").item() == float("inf")  # float16's range
    with pytest.raises(ValueError, match="arithmetic"):
        round_to(x, "bf16")
