"""Probes in the bundle format: written, covered by the manifest, checked on load, added later."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from swc_service import bundle as B

M, D = 3, 4


def _probes(seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((5, 7, 3), (5, 7, 3), (6, 4, 3))]
    probs = rng.dirichlet(np.ones(M), len(images)).astype(np.float32)
    emb = rng.standard_normal((len(images), D)).astype(np.float32)
    return images, probs, emb, {"tool": "test"}


def _write(out, probes=None, n=5):
    with B.BundleWriter(out) as w:
        w.path(B.MODEL).write_bytes(b"onnx")
        if probes is not None:
            w.add_probes(*probes)
        w.save(B.CELLS, np.zeros((M, 2)))
        w.save(B.OFFSETS, np.array([0, 2, 2, n], dtype=np.int64))
        w.save(B.FEATURES, np.ones((n, D), dtype=np.float16))
        w.save(B.LABELS, np.zeros((n, 2)))
        w.save(B.ROW_IDS, np.arange(n, dtype=np.int64))
        return w.commit(source="demo", tool="test")


def test_probes_round_trip_and_are_covered_by_the_manifest(tmp_path):
    images, probs, emb, _ = probes = _probes()
    b = _write(tmp_path / "b", probes)
    assert b.probes is not None
    for got, want in zip(b.probes.images, images, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(b.probes.cell_probs, probs)
    np.testing.assert_array_equal(b.probes.embeddings, emb)
    entry = b.manifest["probes"]
    assert entry["tool"] == "test" and entry["model_sha256"] == b.manifest["files"][B.MODEL]["sha256"]
    assert entry["shapes"] == [[5, 7], [5, 7], [6, 4]]
    listed = set(b.manifest["files"])
    assert {B.PROBE_PROBS, B.PROBE_EMBEDDINGS, *(B.probe_image_file(i) for i in range(3))} <= listed
    assert b.verify_checksums() == []
    assert b.probes.names == ["probe 0 (7x5)", "probe 1 (7x5)", "probe 2 (4x6)"]
    assert [(idx, batch.shape) for idx, batch in b.probes.batches()] == [([0, 1], (2, 5, 7, 3)), ([2], (1, 6, 4, 3))]
    assert [idx for idx, _ in b.probes.batches(max_batch=1)] == [[0], [1], [2]]
    with pytest.raises(ValueError, match="max_batch"):
        b.probes.batches(0)
    assert b.bundle_id == _write(tmp_path / "plain").bundle_id  # probes do not enter the id


def test_bundles_without_probes_load_with_none(tmp_path):
    assert _write(tmp_path / "b").probes is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: (p[0], p[1][:, :2], p[2], p[3]), "cell_probs.npy must be float32"),
        (lambda p: (p[0], p[1].astype(np.float64), p[2], p[3]), "cell_probs.npy must be float32"),
        (lambda p: (p[0], p[1], p[2][:2], p[3]), "embeddings.npy must be float32"),
        (lambda p: ([p[0][0][..., :2], *p[0][1:]], p[1], p[2], p[3]), "image_0.npy must be uint8"),
        (lambda p: ([], p[1][:0], p[2][:0], p[3]), "at least one probe"),
    ],
)
def test_inconsistent_probes_are_refused_and_nothing_is_written(tmp_path, change, message):
    with pytest.raises(B.BundleError, match=message):
        _write(tmp_path / "b", change(_probes()))
    assert not (tmp_path / "b").exists()


def _editable_copy(src, dst):
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def test_tampered_or_foreign_probes_are_refused_on_load(tmp_path):
    b = _write(tmp_path / "b", _probes())
    bad = tmp_path / "bad"
    _editable_copy(b.path, bad)
    image = np.load(bad / B.probe_image_file(1))
    image[0, 0, 0] ^= 1
    np.save(bad / B.probe_image_file(1), image)
    with pytest.raises(B.BundleError, match="image_1.npy does not match its sha256"):
        B.load_bundle(bad)

    foreign = tmp_path / "foreign"
    _editable_copy(b.path, foreign)
    manifest = json.loads((foreign / B.MANIFEST).read_text())
    manifest["probes"]["model_sha256"] = "0" * 64
    (foreign / B.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(B.BundleError, match="recorded for model sha256:000000000000"):
        B.load_bundle(foreign)

    missing = tmp_path / "missing"
    _editable_copy(b.path, missing)
    os.remove(missing / B.PROBE_EMBEDDINGS)
    with pytest.raises(B.BundleError, match="lacks probes/embeddings.npy"):
        B.load_bundle(missing)


def test_add_probes_to_an_old_bundle(tmp_path):
    old = _write(tmp_path / "old")
    before = {rel: meta["sha256"] for rel, meta in old.manifest["files"].items()}
    (old.path / B.PROBES_DIR).mkdir()  # left over by an interrupted run: replaced
    (old.path / B.PROBES_DIR / "junk.npy").write_bytes(b"x")
    images, probs, emb, info = _probes(1)
    new = B.add_probes(old.path, images, probs, emb, info)
    assert new.bundle_id == old.bundle_id and new.verify_checksums() == []
    assert {rel: new.manifest["files"][rel]["sha256"] for rel in before} == before
    np.testing.assert_array_equal(new.probes.cell_probs, probs)
    assert not (old.path / B.PROBES_DIR / "junk.npy").exists()
    assert oct((old.path / B.MANIFEST).stat().st_mode & 0o777) == oct(0o444)
    assert [p.name for p in old.path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(B.BundleError, match="already has probes"):
        B.add_probes(old.path, images, probs, emb, info)


def test_add_probes_refuses_outputs_of_another_shape_and_leaves_the_bundle_as_it_was(tmp_path):
    old = _write(tmp_path / "old")
    manifest = (old.path / B.MANIFEST).read_text()
    images, probs, emb, info = _probes()
    with pytest.raises(B.BundleError, match=r"must be float32 \[3, 3\]"):
        B.add_probes(old.path, images, np.ones((3, 7), np.float32), emb, info)
    assert (old.path / B.MANIFEST).read_text() == manifest and not (old.path / B.PROBES_DIR).exists()
    assert B.load_bundle(old.path).probes is None


def _reference(probes, envelope=None):
    _, probs, emb, _ = probes
    env = {"fp32": {"cell_probs": 1e-5, "pd": 1e-6, "embedding": 2e-6}} if envelope is None else envelope
    return B.ProbeReference(probs.astype(np.float64), emb.astype(np.float64), env, {"cpu": "test"})


def test_the_float64_reference_round_trips_and_is_covered_by_the_manifest(tmp_path):
    probes = _probes()
    b = _write(tmp_path / "b", (*probes, _reference(probes)))
    ref = b.probes.reference
    assert ref is not None and ref.cell_probs.dtype == np.float64
    np.testing.assert_array_equal(ref.cell_probs, probes[1].astype(np.float64))
    assert ref.envelope == {"fp32": {"cell_probs": 1e-5, "pd": 1e-6, "embedding": 2e-6}} and ref.info == {"cpu": "test"}
    assert {B.REFERENCE_PROBS, B.REFERENCE_EMBEDDINGS} <= set(b.manifest["files"]) and b.verify_checksums() == []
    assert b.bundle_id == _write(tmp_path / "plain").bundle_id

    tampered = tmp_path / "tampered"
    _editable_copy(b.path, tampered)
    np.save(tampered / B.REFERENCE_PROBS, np.zeros((3, M)))
    with pytest.raises(B.BundleError, match="reference file probes/reference_cell_probs.npy does not match"):
        B.load_bundle(tampered)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"fp32": {"cell_probs": float("nan"), "pd": 0.0, "embedding": 0.0}}, "finite distances"),
        ({"fp32": {"cell_probs": -1.0, "pd": 0.0, "embedding": 0.0}}, "finite distances"),
        ({}, "map arithmetics"),
    ],
)
def test_a_bad_envelope_or_reference_is_refused_when_written(tmp_path, bad, match):
    probes = _probes()
    with pytest.raises(B.BundleError, match=match):
        _write(tmp_path / "b", (*probes, _reference(probes, bad)))
    wrong = B.ProbeReference(probes[1], probes[2], _reference(probes).envelope, {})  # float32, not float64
    with pytest.raises(B.BundleError, match="must be float64"):
        _write(tmp_path / "c", (*probes, wrong))


def test_add_reference_to_probes_written_before_it(tmp_path):
    probes = _probes()
    old = _write(tmp_path / "old", probes)
    assert old.probes.reference is None
    with pytest.raises(B.BundleError, match="no probes"):
        B.add_reference(_write(tmp_path / "none").path, _reference(probes))
    before = {rel: meta["sha256"] for rel, meta in old.manifest["files"].items()}
    new = B.add_reference(old.path, _reference(probes))
    assert new.bundle_id == old.bundle_id and new.verify_checksums() == []
    assert {rel: new.manifest["files"][rel]["sha256"] for rel in before} == before  # nothing else changed
    np.testing.assert_array_equal(new.probes.reference.embeddings, probes[2].astype(np.float64))
    with pytest.raises(B.BundleError, match="already have a float64 reference"):
        B.add_reference(old.path, _reference(probes))
    with pytest.raises(B.BundleError, match="must be float64"):
        B.add_reference(_write(tmp_path / "other", probes).path, B.ProbeReference(probes[1], probes[2], {}, {}))
    assert B.load_bundle(tmp_path / "other").probes.reference is None
    assert not (tmp_path / "other" / B.REFERENCE_PROBS).exists()


def test_per_probe_distances_round_trip_and_must_fit_the_probes(tmp_path):
    probes = _probes()
    env = _reference(probes).envelope
    per_probe = {"fp32": {q: [v, 2 * v, 3 * v] for q, v in env["fp32"].items()}}
    typical = {"fp32": dict(env["fp32"])}
    ref = B.ProbeReference(probes[1].astype(np.float64), probes[2].astype(np.float64), env, {}, per_probe, typical)
    b = _write(tmp_path / "b", (*probes, ref))
    assert b.probes.reference.per_probe == per_probe and b.probes.reference.typical == typical
    short = {"fp32": {q: v[:2] for q, v in per_probe["fp32"].items()}}
    with pytest.raises(B.BundleError, match="one per probe"):
        _write(tmp_path / "c", (*probes, B.ProbeReference(ref.cell_probs, ref.embeddings, env, {}, short, typical)))
    with pytest.raises(B.BundleError, match="go together"):
        _write(tmp_path / "d", (*probes, B.ProbeReference(ref.cell_probs, ref.embeddings, env, {}, per_probe, None)))
