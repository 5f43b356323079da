"""The start-up model check: the bundle's probes through a backend and back, measured against
the network's float64 reference in the declared precision class."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import warnings

import numpy as np
import pytest

from bench.gate_seeds import wrong_model
from swc_service import bundle as B
from swc_service.errors import Unavailable
from swc_service.model_check import ALLOW_FLAG, check_model
from visloc_export import cli
from visloc_export.build import demo_net_for
from visloc_export.parity import onnx_session
from visloc_export.probes import PROBE_SOURCES
from visloc_export.reference import TorchReference


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
def bundle_b(demo_bundle_b) -> B.Bundle:
    """Another demo model (seed 1) with the same shapes as A."""
    return B.load_bundle(demo_bundle_b)


@pytest.fixture()
def old_bundle(tmp_path, bundle_a) -> B.Bundle:
    """A as written before probes existed: the same files (hard links), a manifest without them."""
    root = tmp_path / "old"
    manifest = dict(bundle_a.manifest)
    probes = manifest.pop("probes")
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(B.PROBES_DIR + "/")}
    assert len(manifest["files"]) == len(bundle_a.manifest["files"]) - len(probes["images"]) - 4  # outputs, reference
    (root / "background").mkdir(parents=True)
    for rel in manifest["files"]:
        os.link(bundle_a.path / rel, root / rel)
    (root / B.MANIFEST).write_text(json.dumps(manifest))
    return B.load_bundle(root)


@pytest.fixture()
def no_reference_bundle(tmp_path, bundle_a) -> B.Bundle:
    """A as written before the float64 reference: its probes, without the reference."""
    root = tmp_path / "no-reference"
    manifest = dict(bundle_a.manifest)
    probes = dict(manifest["probes"])
    ref = probes.pop("reference")
    manifest["probes"] = probes
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k not in (ref["cell_probs"], ref["embeddings"])}
    (root / "background").mkdir(parents=True)
    (root / B.PROBES_DIR).mkdir()
    for rel in manifest["files"]:
        os.link(bundle_a.path / rel, root / rel)
    (root / B.MANIFEST).write_text(json.dumps(manifest))
    return B.load_bundle(root)


def torch_infer(net, arithmetic: str):
    """The service's inference protocol on the PyTorch network, in an arithmetic."""
    model = TorchReference(net)

    async def infer(batch: np.ndarray, timeout_s: float, *, model_version: str = ""):
        probs, emb = model.outputs(batch, arithmetic)
        return probs.astype(np.float32), emb.astype(np.float32)

    return infer


@pytest.fixture(scope="module")
def net_a(bundle_a):
    return demo_net_for(bundle_a)


def test_export_records_probes_of_its_own_model(bundle_a):
    probes = bundle_a.probes
    assert probes is not None and len(probes.images) == len(PROBE_SOURCES)
    shapes = [image.shape[:2] for image in probes.images]
    assert shapes == [(300, 400), (300, 400), (451, 300), (300, 300)]  # downscaled, as is, portrait, square
    assert probes.reference is not None and probes.reference.embeddings.shape == probes.embeddings.shape
    assert probes.info["model_sha256"] == bundle_a.manifest["files"][B.MODEL]["sha256"]
    assert [c for c, _ in probes.info["top_cells"][0]][0] == int(np.argmax(probes.cell_probs[0]))
    assert bundle_a.verify_checksums() == []
    assert any(rel.startswith("probes/") for rel in bundle_a.manifest["files"])


def test_the_bundles_own_model_passes(bundle_a):
    calls = []
    result = check(ort_infer(bundle_a.model_path, calls), bundle_a, backend_version="onnxruntime")
    assert result.result == "ok" and result.ok, result.message
    assert result.report.ok and result.report.probes == 4 and result.report.ratio < 0.01  # fp32: TF32 allowed
    assert calls == [(2, 300, 400, 3), (1, 451, 300, 3), (1, 300, 300, 3)]  # one batch per shape
    assert bundle_a.model_version in result.message and "model check passed" in result.message
    json.loads(json.dumps(result.as_dict(), allow_nan=False))
    assert check(ort_infer(bundle_a.model_path), bundle_a, "fp16").ok
    calls.clear()
    assert check(ort_infer(bundle_a.model_path, calls), bundle_a, max_batch=1).ok  # a backend without batching
    assert calls == [(1, 300, 400, 3), (1, 300, 400, 3), (1, 451, 300, 3), (1, 300, 300, 3)]


@pytest.mark.parametrize("arithmetic", ["fp32", "tf32"])
def test_the_network_in_pytorch_float32_or_tf32_passes_the_fp32_class(bundle_a, net_a, arithmetic):
    """Any fp32 implementation: PyTorch instead of onnxruntime, or TF32 convolutions as on a GPU
    (inputs and weights of every convolution and matmul rounded to a 10-bit mantissa)."""
    result = check(torch_infer(net_a, arithmetic), bundle_a, "fp32")
    assert result.ok, result.message
    if arithmetic == "tf32":  # farther than float32 noise, which the exporter's gate would refuse
        assert result.report.distance["embedding"] > 100 * bundle_a.probes.reference.envelope["fp32"]["embedding"]


def test_an_fp16_converted_model_passes_the_fp16_class_only(bundle_a, tmp_path):
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated": that is the point
        model = float16.convert_float_to_float16(
            onnx.load(str(bundle_a.model_path)), keep_io_types=True,
            op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, "Cast"],  # the uint8 input's cast stays as it is
        )  # fmt: skip
    onnx.save(model, str(tmp_path / "fp16.onnx"))
    result = check(ort_infer(str(tmp_path / "fp16.onnx")), bundle_a, "fp16")
    assert result.ok, result.message
    assert result.report.distance["cell_probs"] > 10 * bundle_a.probes.reference.envelope["onnx"]["cell_probs"]


@pytest.mark.parametrize("wrong", ["bgr", "no_normalisation", "layer_from_another_seed"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_wrong_networks_are_refused_in_every_class(bundle_a, net_a, wrong, precision):
    result = check(torch_infer(wrong_model(net_a, wrong, seed=0), "fp32"), bundle_a, precision)
    assert result.result == "mismatch" and not result.ok
    assert result.report.ratio > 1.5, result.report.summary()  # over 20 seeds: >= 2.5x (docs/BENCHMARKS.md)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_another_models_outputs_fail_naming_both_versions(bundle_a, bundle_b, precision):
    assert bundle_b.model_version != bundle_a.model_version
    assert bundle_b.probes.cell_probs.shape == bundle_a.probes.cell_probs.shape
    result = check(ort_infer(bundle_b.model_path), bundle_a, precision, backend_version=bundle_b.model_version)
    assert result.result == "mismatch" and not result.ok
    assert bundle_a.model_version in result.message and bundle_b.model_version in result.message
    assert "model check FAILED" in result.message and "probe " in result.message
    assert result.report.failures and result.report.ratio > 1.5
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
    assert "added probes with the float64 reference of 4 probes" in capsys.readouterr().out
    new = B.load_bundle(old_bundle.path)
    assert new.bundle_id == bundle_a.bundle_id and new.verify_checksums() == []
    for got, want in zip(new.probes.images, bundle_a.probes.images, strict=True):  # chosen the same way
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(new.probes.reference.cell_probs, bundle_a.probes.reference.cell_probs, rtol=1e-9)
    assert check(ort_infer(new.model_path), new).ok
    assert cli.main(["add-probes", str(old_bundle.path)]) == 0
    assert "already has probes with a float64 reference" in capsys.readouterr().out


def test_probes_without_the_float64_reference_are_refused_until_it_is_added(no_reference_bundle, bundle_a, capsys):
    bundle = no_reference_bundle
    assert bundle.probes is not None and bundle.probes.reference is None
    result = check(ort_infer(bundle.model_path), bundle)
    assert result.result == "no_probes" and not result.ok
    assert "before the float64 reference" in result.message and "\n" not in result.message
    assert f"visloc-export add-probes {bundle.path}" in result.message

    assert cli.main(["add-probes", str(bundle.path)]) == 0
    assert "added the float64 reference of its 4 probes" in capsys.readouterr().out
    new = B.load_bundle(bundle.path)
    assert new.bundle_id == bundle_a.bundle_id and new.verify_checksums() == []
    np.testing.assert_array_equal(new.probes.cell_probs, bundle_a.probes.cell_probs)  # the probes stay
    np.testing.assert_allclose(new.probes.reference.cell_probs, bundle_a.probes.reference.cell_probs, rtol=1e-9)
    assert check(ort_infer(new.model_path), new).ok


def test_add_probes_refuses_a_network_that_is_not_the_bundles(no_reference_bundle, capsys, tmp_path):
    """An upstream bundle needs its checkpoints; a demo bundle's rebuilt network must pass the gate."""
    manifest = json.loads((no_reference_bundle.path / B.MANIFEST).read_text())
    manifest["demo"] = {**manifest["demo"], "seed": 1}  # rebuilt from the wrong seed
    os.chmod(no_reference_bundle.path / B.MANIFEST, 0o644)
    (no_reference_bundle.path / B.MANIFEST).write_text(json.dumps(manifest))
    assert cli.main(["add-probes", str(no_reference_bundle.path)]) == 2
    err = capsys.readouterr().err
    assert "does not compute bundle" in err and "nothing changed" in err
    assert B.load_bundle(no_reference_bundle.path).probes.reference is None

    manifest["source"] = "upstream"
    (no_reference_bundle.path / B.MANIFEST).write_text(json.dumps(manifest))
    assert cli.main(["add-probes", str(no_reference_bundle.path)]) == 2
    assert "--backbone, --mvmf, --rrm" in capsys.readouterr().err


def test_an_allowed_bundle_without_probes_still_needs_the_bundles_output_shapes(old_bundle):
    async def fewer_cells(batch, timeout_s):
        probs, emb = await ort_infer(old_bundle.model_path)(batch, timeout_s)
        return probs[:, :-1], emb

    result = check(fewer_cells, old_bundle, allow_without_probes=True)
    assert result.result == "mismatch" and not result.ok
    assert f"[1, {old_bundle.num_cells}]" in result.message and f"[1, {old_bundle.num_cells - 1}]" in result.message
