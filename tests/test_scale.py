"""Upstream scale (M=31,145, N=763,265): O(1) bundle loading, RSS far below the features file."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ServiceProcess, free_port

from swc_service import bundle as B
from swc_service.method import DensityIndex, search_within_cell

UPSTREAM_M, UPSTREAM_N = 31_145, 763_265


def _rss_kb(pid: int | str = "self", field: str = "VmRSS") -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


@pytest.fixture(scope="module")
def upstream_scale_bundle(tmp_path_factory) -> Path:
    """Upstream-sized synthetic bundle. The features file is sparse (never written): loading
    and serving must not read it whole, which is exactly what this checks."""
    from visloc_export import demo

    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("scale") / "bundle"
    centres = demo.cell_centres(UPSTREAM_M, rng)
    sizes = demo.cell_sizes(UPSTREAM_M, UPSTREAM_N, rng)
    with B.BundleWriter(out) as w:
        w.path(B.MODEL).write_bytes(b"placeholder: the service never reads the model, Triton does")
        w.save(B.CELLS, centres)
        w.save(B.OFFSETS, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        feats = w.open_array(B.FEATURES, np.float16, (UPSTREAM_N, B.EMBEDDING_DIM))
        del feats
        w.save(B.LABELS, np.repeat(centres, sizes, axis=0))
        w.save(B.ROW_IDS, np.arange(UPSTREAM_N, dtype=np.int64))
        w.commit(source="demo", tool="test")
    return out


def test_cell_sizes_are_skewed_like_upstream(upstream_scale_bundle):
    sizes = np.diff(B.load_bundle(upstream_scale_bundle).offsets)
    nonempty = sizes[sizes > 0]
    assert 0.1 < np.mean(sizes == 0) < 0.2  # upstream: 4,739 of 31,145 cells are empty
    assert 10 <= np.median(nonempty) <= 22  # upstream: median 15
    assert np.percentile(nonempty, 99) > 5 * np.median(nonempty)  # long tail (upstream p99 188)


def test_load_is_o1_and_swc_touches_only_cell_slices(upstream_scale_bundle):
    before_anon, before_file = _rss_kb(field="RssAnon"), _rss_kb(field="RssFile")
    b = B.load_bundle(upstream_scale_bundle)
    assert isinstance(b.features, np.memmap)
    feature_bytes = b.features.size * b.features.itemsize
    density = DensityIndex(b.centres)
    rng = np.random.default_rng(1)
    emb = rng.standard_normal(B.EMBEDDING_DIM).astype(np.float32)
    probs = rng.dirichlet(np.ones(b.num_cells)).astype(np.float32)
    for cell in rng.choice(np.flatnonzero(np.diff(b.offsets)), 300, replace=False):
        feats, labels, _ = b.cell_slice(int(cell))
        search_within_cell(emb, feats, labels)
        density.density(int(cell), probs)
    private = (_rss_kb(field="RssAnon") - before_anon) * 1024
    shared = (_rss_kb(field="RssFile") - before_file) * 1024
    # Private memory is what a copy of the features would cost; mapped file pages are the
    # shared, evictable page cache (whole cached folios get mapped, so this varies by kernel).
    print(f"300 cells: private +{private / 1e6:.1f} MB, mapped file pages +{shared / 1e6:.1f} MB")
    assert private < 0.02 * feature_bytes, f"private memory grew by {private / 1e6:.0f} MB"


def test_service_starts_on_upstream_scale_with_small_rss(upstream_scale_bundle):
    """Start-up time is measured and printed here (bench/ reports it); RSS is asserted."""
    svc = ServiceProcess(upstream_scale_bundle, f"127.0.0.1:{free_port()}")
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in svc.log_text():
            assert svc.proc.poll() is None, svc.log_text()
            assert time.monotonic() < deadline, svc.log_text()
            time.sleep(0.05)
        seconds = float(re.search(r"after ([\d.]+) s", svc.log_text()).group(1))
        print(f"service listening {seconds:.2f} s after start at M={UPSTREAM_M}, N={UPSTREAM_N}")
        rss = _rss_kb(svc.proc.pid) * 1024
        features = (upstream_scale_bundle / B.FEATURES).stat().st_size
        assert rss < 0.15 * features, f"RSS {rss / 1e6:.0f} MB vs features {features / 1e9:.2f} GB"
    finally:
        assert svc.stop() == 0
