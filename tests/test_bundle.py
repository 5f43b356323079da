"""The bundle format: atomic writes, immutability, O(1) memory-mapped loading, checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from swc_service import bundle as B


def _write(out, n=5, m=3, **kw):
    with B.BundleWriter(out, **kw) as w:
        w.path(B.MODEL).write_bytes(b"onnx")
        w.save(B.CELLS, np.zeros((m, 2)))
        w.save(B.OFFSETS, np.array([0, 2, 2, n], dtype=np.int64))
        w.save(B.FEATURES, np.ones((n, 4), dtype=np.float16))
        w.save(B.LABELS, np.zeros((n, 2)))
        w.save(B.ROW_IDS, np.arange(n, dtype=np.int64))
        return w.commit(source="demo", tool="test")


def test_write_load_and_slice(tmp_path):
    b = _write(tmp_path / "b")
    assert isinstance(b.features, np.memmap) and isinstance(b.labels, np.memmap)
    f, lab, ids = b.cell_slice(2)
    assert f.shape == (3, 4) and ids.tolist() == [2, 3, 4]
    assert b.cell_slice(1)[0].shape == (0, 4)
    assert len(b.bundle_id) == 12 and b.model_version.startswith("sha256:")
    assert os.stat(tmp_path / "b").st_mode & 0o755 == 0o755


def test_bundles_are_immutable_and_failed_writes_leave_nothing(tmp_path):
    _write(tmp_path / "b")
    with pytest.raises(B.BundleError, match="immutable"):
        _write(tmp_path / "b")
    with pytest.raises(RuntimeError), B.BundleWriter(tmp_path / "c") as w:
        w.save(B.CELLS, np.zeros((3, 2)))
        raise RuntimeError("boom")
    assert not (tmp_path / "c").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_inconsistent_arrays_are_refused(tmp_path):
    with pytest.raises(B.BundleError, match="must rise from 0"), B.BundleWriter(tmp_path / "x") as w:
        w.path(B.MODEL).write_bytes(b"onnx")
        w.save(B.CELLS, np.zeros((3, 2)))
        w.save(B.OFFSETS, np.array([0, 4, 2, 5], dtype=np.int64))
        w.save(B.FEATURES, np.ones((5, 4), dtype=np.float16))
        w.save(B.LABELS, np.zeros((5, 2)))
        w.save(B.ROW_IDS, np.arange(5, dtype=np.int64))
        w.commit(source="demo", tool="test")


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(B.BundleError, match="no manifest.json"):
        B.load_bundle(tmp_path)
    b = _write(tmp_path / "b")
    manifest = json.loads((b.path / B.MANIFEST).read_text())
    manifest["num_cells"] = 99
    (b.path / B.MANIFEST).chmod(0o644)
    (b.path / B.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(B.BundleError, match="manifest says M=99"):
        B.load_bundle(b.path)


def test_checksums_detect_tampering(tmp_path):
    b = _write(tmp_path / "b")
    p = b.path / B.LABELS
    p.chmod(0o644)
    arr = np.load(p)
    arr[0, 0] = 1.0
    np.save(p, arr)
    assert B.load_bundle(b.path).verify_checksums() == [B.LABELS]
