"""Exporter: ONNX parity, demo calibration, upstream import round trip, refusals."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from swc_service.bundle import load_bundle
from swc_service.method import DEFAULT_CONF_THRESHOLD, DensityIndex, top_cell
from visloc_client.preprocessing import preprocess
from visloc_client.safe_pickle import UnsafePickleError
from visloc_export import build as build_module
from visloc_export import samples
from visloc_export.build import demo_net_for, import_upstream, read_assignments
from visloc_export.model import build_backbone
from visloc_export.onnx_export import export_onnx
from visloc_export.parity import check_parity, onnx_session, parity_batches
from visloc_export.reference import TorchReference

VENV_BIN = Path(sys.executable).parent


def test_demo_bundle_onnx_matches_pytorch(demo_bundle):
    bundle = load_bundle(demo_bundle)
    batches = parity_batches()
    assert sorted({(b.shape[0], b.shape[1], b.shape[2]) for b in batches}) == sorted(
        {(n, h, w) for n in (1, 4) for (w, h) in ((300, 300), (400, 300), (300, 400), (533, 300))}
    )
    report, _ = check_parity(TorchReference(demo_net_for(bundle)), bundle.model_path, bundle.centres, batches,
                             arithmetics=("fp32",), progress=False)  # fmt: skip
    assert report.ok, report.summary()
    assert report.top_cells_equal and report.ratio <= 1 and report.probes == 20
    assert bundle.manifest["parity"]["ok"] is True


def test_demo_predictions_vary_with_the_image(demo_bundle):
    """Random weights alone give one answer for every photo; the calibrated demo must not."""
    bundle = load_bundle(demo_bundle)
    sess = onnx_session(bundle.model_path)
    density = DensityIndex(bundle.centres, (25.0,))
    cells, localizable, embeddings = set(), [], []
    for seed in range(10):
        x = preprocess(samples.photo_bytes(seed)).array[None]
        probs, emb = sess.run(None, {"image": x})
        c = top_cell(probs[0])
        cells.add(c)
        localizable.append(density.density(c, probs[0])[0] > DEFAULT_CONF_THRESHOLD)
        embeddings.append(emb[0])
    assert len(cells) >= 3
    assert any(localizable) and not all(localizable)
    sims = np.asarray(embeddings) @ np.asarray(embeddings).T
    assert sims[np.triu_indices(10, 1)].max() < 0.99  # embeddings differ too


def test_demo_manifest_and_layout(demo_bundle):
    b = load_bundle(demo_bundle)
    m = b.manifest
    assert m["source"] == "demo" and "DEMO" in m["warning"]
    assert (m["num_cells"], m["num_background"]) == (2000, 20_000)
    assert isinstance(b.features, np.memmap) and b.features.dtype == np.float16
    assert b.verify_checksums() == []
    sizes = np.diff(b.offsets)
    assert 0.05 < np.mean(sizes == 0) < 0.3  # some cells have no background rows, like upstream
    assert sizes.max() > 4 * np.median(sizes[sizes > 0])  # long tail
    np.testing.assert_allclose(np.linalg.norm(b.features[:100].astype(np.float32), axis=1), 1, atol=2e-3)
    for c in np.flatnonzero(sizes)[:50]:  # ids ascend within a cell
        _, _, ids = b.cell_slice(int(c))
        assert np.all(np.diff(ids) > 0)


# --------------------------------------------------------------------------- upstream


M, N = 40, 600


@pytest.fixture(scope="module")
def upstream_files(tmp_path_factory):
    """Fake upstream files with the exact key names, shapes and dtypes of SPEC.md."""
    d = tmp_path_factory.mktemp("upstream")
    torch.manual_seed(3)
    backbone = build_backbone()
    for p in backbone.parameters():  # non-trivial weights so features vary
        p.data.add_(torch.randn_like(p) * 0.01)
    torch.save(backbone.state_dict(), d / "efficientnet_backbone.pt")
    rng = np.random.default_rng(3)
    mus = np.stack([rng.uniform(-50, 60, M), rng.uniform(-170, 170, M)])
    torch.save(
        {
            "mvmf.mus": torch.from_numpy(mus),
            "mvmf.kappas": torch.from_numpy(rng.normal(0, 1, M)),
            "mixture_weights.seq_model.0.weight": torch.randn(M, 1792) * 0.05,
            "mixture_weights.seq_model.0.bias": torch.randn(M) * 0.1,
        },
        d / "mvmf_head.pt",
    )
    rrm = {
        "norm.weight": torch.rand(1792) + 0.5,
        "norm.bias": torch.randn(1792) * 0.1,
        "res.norm.weight": torch.rand(1792) + 0.5,
        "res.norm.bias": torch.randn(1792) * 0.1,
        "res.fc1.weight": torch.randn(4096, 1792) * 0.02,
        "res.fc1.bias": torch.randn(4096) * 0.02,
        "res.fc2.weight": torch.randn(1792, 4096) * 0.02,
        "res.fc2.bias": torch.randn(1792) * 0.02,
    }
    torch.save(rrm, d / "rrm_head.pt")
    feats = rng.standard_normal((N, 1792)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    labels = np.stack([rng.uniform(-60, 60, N), rng.uniform(-180, 180, N)], axis=1)
    with h5py.File(d / "back_coll_features.hdf5", "w") as h5:
        h5["features"] = feats
        h5["labels"] = labels
    # Cells 0..M-1, some empty, rows scattered in random order (as upstream's sets).
    owner = rng.integers(0, M - 5, N)
    assignments = {int(c): {int(r) for r in np.flatnonzero(owner == c)} for c in np.unique(owner)}
    with open(d / "cells_assignments.pkl", "wb") as f:
        pickle.dump(assignments, f, protocol=4)
    return {"dir": d, "mus": mus, "feats": feats, "labels": labels, "assignments": assignments}


def _import(files, out, **kw):
    d = files["dir"]
    return import_upstream(
        out,
        backbone=str(d / "efficientnet_backbone.pt"),
        mvmf=str(d / "mvmf_head.pt"),
        rrm=str(d / "rrm_head.pt"),
        background=str(d / "back_coll_features.hdf5"),
        assignments=str(d / "cells_assignments.pkl"),
        **kw,
    )


def test_upstream_round_trip_every_number(upstream_files, tmp_path):
    b = _import(upstream_files, tmp_path / "bundle", features_dtype="float32")
    assert b.source == "upstream" and b.manifest["parity"]["ok"]
    assert b.probes is not None and b.probes.cell_probs.shape == (4, M)  # the import records probes too
    assert b.probes.reference.cell_probs.shape == (4, M) and b.probes.reference.cell_probs.dtype == np.float64
    np.testing.assert_array_equal(b.centres, upstream_files["mus"].T)
    assert b.centres.dtype == np.float64
    feats, labels, assignments = (
        upstream_files["feats"],
        upstream_files["labels"],
        upstream_files["assignments"],
    )
    seen = 0
    for c in range(M):
        f, lab, ids = b.cell_slice(c)
        expected = sorted(assignments.get(c, ()))
        assert ids.tolist() == expected
        np.testing.assert_array_equal(f, feats[expected])
        np.testing.assert_array_equal(lab, labels[expected])
        seen += len(expected)
    assert seen == N
    assert b.verify_checksums() == []


def test_upstream_cli_import_float16_by_default_with_progress_then_verify(upstream_files, tmp_path):
    d = upstream_files["dir"]
    out = _visloc_export_upstream(d, d / "rrm_head.pt", tmp_path / "b16")
    assert out.returncode == 0, out.stderr
    assert f"{N}/{N}" in out.stderr and "rows" in out.stderr and "reference and envelopes" in out.stderr
    b = load_bundle(tmp_path / "b16")
    assert b.manifest["upstream"]["assignments"] == "cells_assignments.pkl"
    assert b.features.dtype == np.float16
    c = next(iter(upstream_files["assignments"]))
    f, _, ids = b.cell_slice(c)
    np.testing.assert_array_equal(f, upstream_files["feats"][ids].astype(np.float16))
    d = upstream_files["dir"]
    out = subprocess.run(
        [VENV_BIN / "visloc-export", "verify", "--bundle", str(b.path),
         "--backbone", d / "efficientnet_backbone.pt", "--mvmf", d / "mvmf_head.pt", "--rrm", d / "rrm_head.pt",
         "--checksums"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "parity OK" in out.stdout and '"checksums_ok": true' in out.stdout


def test_verify_fails_on_a_different_model(upstream_files, demo_bundle):
    """The parity check can fail: the demo bundle's ONNX against the upstream weights."""
    d = upstream_files["dir"]
    out = subprocess.run(
        [VENV_BIN / "visloc-export", "verify", "--bundle", str(demo_bundle),
         "--backbone", d / "efficientnet_backbone.pt", "--mvmf", d / "mvmf_head.pt", "--rrm", d / "rrm_head.pt"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr  # a verdict, not a crash or a usage error
    assert "parity FAILED" in out.stdout and "not the same model" in out.stdout


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/visloc-pwned-marker",))


def test_malicious_pickle_refused_without_executing(tmp_path):
    marker = Path("/tmp/visloc-pwned-marker")
    marker.unlink(missing_ok=True)
    path = tmp_path / "cells_assignments.pkl"
    path.write_bytes(pickle.dumps({0: {1, 2}, 1: _Evil()}))
    with pytest.raises(UnsafePickleError, match="refused to load posix.system"):
        read_assignments(path, 2, 3)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("assignments", "message"),
    [
        ({0: {0, 1}, 1: {1, 2}}, "1 assigned more than once"),
        ({0: {0}, 1: {2}}, "1 rows unassigned"),
        ({0: {0, 1}, 7: {2}}, "cell id 7"),
        ({0: {0, 1, 2, 5}}, "outside"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_bad_assignments_are_refused(tmp_path, assignments, message):
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(assignments))
    with pytest.raises(ValueError, match=message):
        read_assignments(path, 2, 3)


def _visloc_export_upstream(d, rrm, out) -> subprocess.CompletedProcess:
    """``visloc-export upstream`` on the fixture's files, with ``rrm`` as the retrieval head."""
    return subprocess.run(
        [VENV_BIN / "visloc-export", "upstream", "--backbone", d / "efficientnet_backbone.pt",
         "--mvmf", d / "mvmf_head.pt", "--rrm", rrm,
         "--background", d / "back_coll_features.hdf5", "--assignments", d / "cells_assignments.pkl",
         "--out", out],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_wrong_checkpoint_is_refused_with_a_clear_error(upstream_files, tmp_path):
    d = upstream_files["dir"]
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "rrm_head.pt")
    out = _visloc_export_upstream(d, tmp_path / "rrm_head.pt", tmp_path / "out")
    assert out.returncode == 2
    assert "does not match the upstream layout" in out.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not list(tmp_path.glob(".out.tmp-*"))


def _wrong_export(net, path):
    """Exports a copy of ``net`` whose first cell's logit is off by 1 (what the gate must see)."""
    bad = copy.deepcopy(net)
    with torch.no_grad():
        bad.cell_head.mixture_weights.seq_model[0].bias[0] += 1.0
    export_onnx(bad, path)


def test_parity_failure_refuses_the_import(upstream_files, tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "export_onnx", _wrong_export)
    with pytest.raises(RuntimeError, match="ONNX parity check failed .*--accept-parity-failure"):
        _import(upstream_files, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert not list(tmp_path.glob(".refused.tmp-*"))


def test_accept_parity_failure_imports_and_says_so(upstream_files, tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "export_onnx", _wrong_export)
    b = _import(upstream_files, tmp_path / "accepted", accept_parity_failure=True)
    m = b.manifest
    assert m["parity"]["ok"] is False and m["parity"]["failures"]
    assert m["parity_failure_accepted"] is True
    assert m["warning"].startswith("PARITY CHECK FAILED") and "parity.json" in m["warning"]
    assert json.loads((b.path / "parity.json").read_text()) == m["parity"]
    assert "parity.json" in m["files"] and b.verify_checksums() == []
