"""The start-up model check: the bundle's probes through a backend (here onnxruntime) and back."""

from __future__ import annotations

import asyncio
import functools
import json
import os

import numpy as np
import pytest

from swc_service import bundle as B
from swc_service.errors import Unavailable
from swc_service.model_check import ALLOW_FLAG, check_model
from swc_service.parity import compare_outputs
from visloc_export import cli
from visloc_export.build import build_demo, onnx_session
from visloc_export.probes import PROBE_SOURCES, probe_images


@functools.cache
def session(model_path):
    return onnx_session(model_path)


def ort_infer(model_path, calls=None):
    """The service's inference protocol on onnxruntime."""
    sess = session(model_path)

    async def infer(batch: np.ndarray, timeout_s: float, *, model_version: str = ""):
        if calls is not None:
            calls.append(batch.shape)
        return tuple(sess.run([B.OUTPUT_PROBS, B.OUTPUT_EMBEDDING], {B.INPUT_NAME: batch}))

    return infer


def check(*args, **kw):
    return asyncio.run(check_model(*args, **kw))


@pytest.fixture(scope="module")
def bundle_a(demo_bundle) -> B.Bundle:
    return B.load_bundle(demo_bundle)


@pytest.fixture(scope="module")
def bundle_b(tmp_path_factory, bundle_a) -> B.Bundle:
    """Another demo model (seed 1) with the same shapes as A."""
    return build_demo(tmp_path_factory.mktemp("other") / "b", cells=bundle_a.num_cells, background=1000, seed=1)


@pytest.fixture()
def old_bundle(tmp_path, bundle_a) -> B.Bundle:
    """A as written before probes existed: the same files (hard links), a manifest without them."""
    root = tmp_path / "old"
    manifest = dict(bundle_a.manifest)
    probes = manifest.pop("probes")
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(B.PROBES_DIR + "/")}
    assert len(manifest["files"]) == len(bundle_a.manifest["files"]) - len(probes["images"]) - 2
    (root / "background").mkdir(parents=True)
    for rel in manifest["files"]:
        os.link(bundle_a.path / rel, root / rel)
    (root / B.MANIFEST).write_text(json.dumps(manifest))
    return B.load_bundle(root)


def test_export_records_probes_of_its_own_model(bundle_a):
    probes = bundle_a.probes
    assert probes is not None and len(probes.images) == len(PROBE_SOURCES)
    shapes = [image.shape[:2] for image in probes.images]
    assert shapes == [(300, 400), (300, 400), (451, 300), (300, 300)]  # downscaled, as is, portrait, square
    for got, want in zip(probes.images, probe_images(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert probes.info["model_sha256"] == bundle_a.manifest["files"][B.MODEL]["sha256"]
    assert [c for c, _ in probes.info["top_cells"][0]][0] == int(np.argmax(probes.cell_probs[0]))
    assert bundle_a.verify_checksums() == []
    assert any(rel.startswith("probes/") for rel in bundle_a.manifest["files"])


def test_the_bundles_own_model_passes(bundle_a):
    calls = []
    result = check(ort_infer(bundle_a.model_path, calls), bundle_a, backend_version="onnxruntime")
    assert result.result == "ok" and result.ok, result.message
    assert result.report.ok and result.report.probes == 4 and result.report.max_pd_diff <= 1e-6
    assert calls == [(2, 300, 400, 3), (1, 451, 300, 3), (1, 300, 300, 3)]  # one batch per shape
    assert bundle_a.model_version in result.message and "model check passed" in result.message
    json.loads(json.dumps(result.as_dict(), allow_nan=False))
    assert check(ort_infer(bundle_a.model_path), bundle_a, "fp16").ok
    calls.clear()
    assert check(ort_infer(bundle_a.model_path, calls), bundle_a, max_batch=1).ok  # a backend without batching
    assert calls == [(1, 300, 400, 3), (1, 300, 400, 3), (1, 451, 300, 3), (1, 300, 300, 3)]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_another_models_outputs_fail_naming_both_versions(bundle_a, bundle_b, precision):
    assert bundle_b.model_version != bundle_a.model_version
    assert bundle_b.probes.cell_probs.shape == bundle_a.probes.cell_probs.shape
    result = check(ort_infer(bundle_b.model_path), bundle_a, precision, backend_version=bundle_b.model_version)
    assert result.result == "mismatch" and not result.ok
    assert bundle_a.model_version in result.message and bundle_b.model_version in result.message
    assert "model check FAILED" in result.message and "probe " in result.message
    assert result.report.failures and (result.report.min_embedding_cosine < 0.999 or not result.report.top1_equal)
    assert (result.bundle_model_version, result.backend_model_version) == (
        bundle_a.model_version,
        bundle_b.model_version,
    )


def test_backend_failures_and_wrong_shapes(bundle_a):
    async def down(batch, timeout_s):
        raise Unavailable("Triton at 127.0.0.1:1 is unavailable")

    result = check(down, bundle_a)
    assert result.result == "error" and not result.ok and "Triton at 127.0.0.1:1" in result.message

    async def fewer_cells(batch, timeout_s):
        probs, emb = await ort_infer(bundle_a.model_path)(batch, timeout_s)
        return probs[:, :-1], emb

    result = check(fewer_cells, bundle_a)
    assert result.result == "mismatch" and "not the same model" in result.message

    async def nan(batch, timeout_s):
        probs, emb = await ort_infer(bundle_a.model_path)(batch, timeout_s)
        return probs, np.full_like(emb, np.nan)

    result = check(nan, bundle_a, "fp16")
    assert result.result == "mismatch" and "non-finite" in result.message
    with pytest.raises(ValueError, match="precision"):
        check(down, bundle_a, "int4")


def test_old_bundle_is_refused_until_probes_are_added(old_bundle, bundle_a, capsys):
    assert old_bundle.probes is None
    result = check(ort_infer(old_bundle.model_path), old_bundle)
    assert result.result == "no_probes" and not result.ok and result.report is None
    assert f"visloc-export add-probes {old_bundle.path}" in result.message and ALLOW_FLAG in result.message
    allowed = check(ort_infer(old_bundle.model_path), old_bundle, allow_without_probes=True)
    assert allowed.result == "no_probes" and allowed.ok and allowed.message.startswith("WARNING")

    assert cli.main(["add-probes", str(old_bundle.path)]) == 0
    assert "added 4 probes" in capsys.readouterr().out
    new = B.load_bundle(old_bundle.path)
    assert new.bundle_id == bundle_a.bundle_id and new.verify_checksums() == []
    report = compare_outputs(
        bundle_a.probes.cell_probs, bundle_a.probes.embeddings, new.probes.cell_probs, new.probes.embeddings,
        bundle_a.centres, (1.0, 25.0, 200.0, 750.0, 2500.0),
    )  # fmt: skip
    assert report.ok, report.failures
    assert check(ort_infer(new.model_path), new).ok
    assert cli.main(["add-probes", str(old_bundle.path)]) == 0
    assert "already has probes" in capsys.readouterr().out


def test_an_allowed_bundle_without_probes_still_needs_the_bundles_output_shapes(old_bundle):
    async def fewer_cells(batch, timeout_s):
        probs, emb = await ort_infer(old_bundle.model_path)(batch, timeout_s)
        return probs[:, :-1], emb

    result = check(fewer_cells, old_bundle, allow_without_probes=True)
    assert result.result == "mismatch" and not result.ok
    assert f"[1, {old_bundle.num_cells}]" in result.message and f"[1, {old_bundle.num_cells - 1}]" in result.message
