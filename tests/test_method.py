"""SwC and PD against the reference semantics: scikit-learn DBSCAN and full haversine PD."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.seed_style import reference_pd, reference_swc
from swc_service.method import (
    DensityIndex,
    search_within_cell,
    top_cell,
)

latlon = st.tuples(st.floats(-80, 80), st.floats(-179.9, 179.9))


@st.composite
def cells(draw):
    """A cell's rows: clustered points (so clusters merge and tie), with equal similarities too."""
    n = draw(st.integers(1, 40))
    centre = draw(latlon)
    spread = draw(st.sampled_from([0.001, 0.005, 0.02, 0.2, 3.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = np.asarray(centre) + rng.normal(0, spread, (n, 2))
    labels[:, 0] = np.clip(labels[:, 0], -89, 89)
    if draw(st.booleans()):  # duplicated locations
        labels[rng.integers(0, n, n // 2)] = labels[0]
    dim = 16
    # Small integers (times a power of two): every dot product is exact in any summation
    # order, so BLAS and the kernel agree bit for bit and ties are real ties. The kernel's
    # rounding on arbitrary floats is tested on its own (test_kernels.py).
    scale = draw(st.sampled_from([1.0, 0.25, 2.0**-10]))
    feats = (rng.integers(-4, 5, (n, dim)) * scale).astype(np.float32)
    if draw(st.booleans()):  # duplicated rows
        feats[rng.integers(0, n, n // 2)] = feats[0]
    emb = (rng.integers(-4, 5, dim) * scale).astype(np.float32)
    top_k = draw(st.integers(1, 50))  # often more than the rows of the cell
    eps = draw(st.sampled_from([0.1, 0.5, 1.0, 2.0, 25.0]))
    return emb, feats, labels, top_k, eps


@settings(max_examples=300, deadline=None)
@given(cells())
def test_swc_equals_sklearn_dbscan_reference(case):
    emb, feats, labels, top_k, eps = case
    got = search_within_cell(emb, feats, labels, top_k=top_k, eps_km=eps)
    lat, lon, ref_labels = reference_swc(emb, feats, labels, top_k, eps)
    np.testing.assert_array_equal(got.cluster_labels, ref_labels)
    assert got.lat == pytest.approx(lat, abs=1e-9)
    assert got.lon == pytest.approx(lon, abs=1e-9)
    assert len(got.candidates) == min(top_k, len(feats))


def test_cluster_numbering_and_size_tie_goes_to_lowest_label():
    # Two pairs 50 km apart, each pair 100 m wide: clusters {0, 2} and {1, 3}, sizes tie.
    pts = np.array([[48.0, 2.0], [48.5, 2.0], [48.0005, 2.0], [48.5005, 2.0]])
    emb = np.ones(4, dtype=np.float32)
    feats = np.diag([4.0, 3.0, 2.0, 1.0]).astype(np.float32)
    res = search_within_cell(emb, feats, pts, top_k=4, eps_km=1.0)
    np.testing.assert_array_equal(res.candidates, [0, 1, 2, 3])
    np.testing.assert_array_equal(res.cluster_labels, [0, 1, 0, 1])
    assert res.chosen_cluster == 0
    assert res.lat == pytest.approx(48.00025, abs=1e-6)


def test_mean_is_not_renormalised():
    # Two points 90 degrees apart on the equator in one cluster (eps huge): |mean| = 0.707,
    # lat stays 0 either way, but two points at lat 60 symmetric in lon show the difference.
    pts = np.array([[60.0, -90.0], [60.0, 90.0]])
    res = search_within_cell(np.ones(2, np.float32), np.eye(2, dtype=np.float32), pts, top_k=2, eps_km=20000)
    # mean vector = (0, 0, sin 60): asin(0.866) = 60 deg, not 90 as renormalising would give.
    assert res.lat == pytest.approx(60.0, abs=1e-9)


def test_top_cell_first_index_on_ties():
    assert top_cell(np.array([0.1, 0.4, 0.4, 0.1], dtype=np.float32)) == 1


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(7)
    centres = np.stack([rng.uniform(-60, 70, 3000), rng.uniform(-180, 180, 3000)], axis=1)
    centres[100:140] = centres[99] + rng.normal(0, 0.1, (40, 2))  # a dense city
    return centres


def test_density_index_equals_reference(world):
    rng = np.random.default_rng(8)
    idx = DensityIndex(world)
    for _ in range(50):
        probs = rng.dirichlet(np.full(len(world), 0.05)).astype(np.float32)
        c = int(rng.integers(0, len(world)))
        np.testing.assert_array_equal(idx.density(c, probs), reference_pd(c, probs, world))


def test_density_boundary_cells_decided_by_haversine(world):
    """Cells placed at exactly the scale's distance are settled like the reference (<=)."""
    centres = world.copy()
    c = 99
    for j, scale in enumerate((1.0, 25.0, 200.0)):
        # Move cell j+1 so its haversine distance to c is as close to `scale` as floats allow.
        lat0, lon0 = centres[c]
        dlat = scale / 6371.0 * 180 / math.pi
        centres[j + 1] = (lat0 + dlat, lon0)
    idx = DensityIndex(centres)
    probs = np.full(len(centres), 1.0 / len(centres), dtype=np.float32)
    np.testing.assert_array_equal(idx.density(c, probs), reference_pd(c, probs, centres))
