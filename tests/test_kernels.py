"""The compiled SwC/PD kernels (swc_service/_kernels.c): rounding, determinism, exactness, bad input."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from bench.seed_style import reference_pd
from swc_service import _kernels
from swc_service.geo import haversine_km, latlon_to_unit
from swc_service.method import DensityIndex, search_within_cell

SHAPES = [(1, 1), (3, 7), (5, 31), (4, 32), (6, 33), (9, 95), (17, 1792)]


def _sims(query: np.ndarray, rows: np.ndarray, simd: bool = True) -> np.ndarray:
    """Every row's similarity, in row order, from SwC's kernel (top k = all rows)."""
    rows = np.ascontiguousarray(rows)
    n = rows.shape[0]
    order, sims, clusters = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.int64)
    query = np.ascontiguousarray(query, np.float32)
    _kernels.swc(rows, rows.dtype == np.float16, np.zeros((n, 2)), query, 1.0, order, sims, clusters, simd)
    out = np.empty(n, np.float32)
    out[order] = sims
    return out


def _exact_dots(rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Correctly rounded dot products: float32 x float32 products are exact in float64; fsum."""
    r, q = rows.astype(np.float64), query.astype(np.float64)
    return np.array([math.fsum(row * q) for row in r])


@pytest.mark.parametrize("n,d", SHAPES)
def test_dot_simd_and_portable_paths_give_the_same_bits(n, d):
    rng = np.random.default_rng(n * 1000 + d)
    rows = rng.standard_normal((n, d)).astype(np.float16)
    query = rng.standard_normal(d).astype(np.float32)
    fast, portable = _sims(query, rows, True), _sims(query, rows, False)
    np.testing.assert_array_equal(fast.view(np.uint32), portable.view(np.uint32))
    rows32 = rows.astype(np.float32)  # float16 -> float32 is exact: same values, same bits
    for simd in (True, False):
        np.testing.assert_array_equal(_sims(query, rows32, simd).view(np.uint32), fast.view(np.uint32))


@pytest.mark.parametrize("n,d", SHAPES)
def test_dot_is_float32_accurate(n, d):
    rng = np.random.default_rng(d)
    rows = rng.standard_normal((n, d)).astype(np.float32)
    query = rng.standard_normal(d).astype(np.float32)
    got = _sims(query, rows).astype(np.float64)
    exact = _exact_dots(rows, query)
    # A float32 sum of d products: error <= ~d * 2^-24 * sum |x q| (here far smaller in practice).
    bound = d * 2.0**-24 * (np.abs(rows.astype(np.float64)) @ np.abs(query.astype(np.float64)))
    assert np.all(np.abs(got - exact) <= bound + 1e-30)
    # ... and as close to BLAS as two float32 summation orders can be.
    np.testing.assert_allclose(got, rows @ query, rtol=1e-5, atol=1e-5)


def test_equal_rows_get_equal_similarities_wherever_they_sit():
    """Ties are real ties: a row's similarity does not depend on its position or alignment."""
    rng = np.random.default_rng(3)
    d = 37  # rows start at every alignment
    row = rng.standard_normal(d).astype(np.float16)
    rows = rng.standard_normal((50, d)).astype(np.float16)
    rows[[0, 7, 13, 31, 49]] = row
    query = rng.standard_normal(d).astype(np.float32)
    sims = _sims(query, rows)
    assert len(set(sims[[0, 7, 13, 31, 49]].tolist())) == 1
    assert _sims(query, rows[13:14])[0] == sims[0]


def test_every_float16_value_converts_exactly():
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)]
    halves = halves[: len(halves) // 32 * 32].reshape(-1, 32)
    query = np.zeros(32, np.float32)
    query[5] = 1.0
    for simd in (True, False):
        # x * 1 + 0 * others: the exact float32 value of each half, signed zeros included.
        np.testing.assert_array_equal(_sims(query, halves, simd), halves[:, 5].astype(np.float32))


def test_dot_rejects_mismatched_buffers():
    rows = np.zeros((4, 8), np.float16)
    out = (np.empty(4, np.int64), np.empty(4, np.float32), np.empty(4, np.int64))
    with pytest.raises(ValueError, match="do not make"):
        _kernels.swc(rows, True, np.zeros((4, 2)), np.zeros(7, np.float32), 1.0, *out)
    with pytest.raises(ValueError, match="do not make"):
        _kernels.swc(rows, True, np.zeros((5, 2)), np.zeros(8, np.float32), 1.0, *out)
    with pytest.raises(ValueError, match=r"labels \[n, 2\] and an embedding \[D\]"):
        search_within_cell(np.zeros(7, np.float32), rows, np.zeros((4, 2)))


def _reference_haversine(lat1, lon1, lat2, lon2):
    """The reference's haversine as it writes it, in numpy (the oracle for the kernel's)."""
    lat1, lon1, lat2, lon2 = map(np.radians, (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2.0) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2.0) ** 2
    return 6371.0 * (2 * np.arcsin(np.sqrt(np.minimum(a, 1.0))))


# numpy's float64 sin/cos/arcsin are the C library's unless numpy dispatches to AVX-512 SVML
# (then the two may differ in the last bit on a few values).
SVML = np.core._multiarray_umath.__cpu_features__.get("AVX512_SKX", False)


def test_geometry_is_the_references():
    rng = np.random.default_rng(12)
    lat1, lat2 = rng.uniform(-90, 90, (2, 5000))
    lon1, lon2 = rng.uniform(-180, 180, (2, 5000))
    near = lat1 + rng.normal(0, 1e-3, 5000)  # short distances too
    for args in ((lat1, lon1, lat2, lon2), (lat1, lon1, near, lon1)):
        got, want = haversine_km(*args), _reference_haversine(*args)
        if SVML:
            np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-12)
        else:
            np.testing.assert_array_equal(got, want)
    assert haversine_km(90.0, 0.0, -90.0, 0.0) == pytest.approx(math.pi * 6371.0, rel=1e-15)
    assert haversine_km(np.zeros((2, 1)), 0.0, np.zeros(3), 1.0).shape == (2, 3)  # broadcasting
    assert np.ndim(haversine_km(0.0, 0.0, 1.0, 1.0)) == 0
    pts = np.stack([lat1[:50], lon1[:50]], axis=1)
    lat, lon = np.radians(pts[:, 0]), np.radians(pts[:, 1])
    want = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)
    np.testing.assert_allclose(latlon_to_unit(pts), want, rtol=0, atol=1e-15)


def _clusters(pts: np.ndarray, eps_km: float) -> list[int]:
    """SwC's cluster labels for points taken in the given order (similarities descending)."""
    feats = np.arange(len(pts), 0, -1, dtype=np.float32)[:, None]
    res = search_within_cell(np.ones(1, np.float32), feats, pts, top_k=len(pts), eps_km=eps_km)
    assert res.candidates.tolist() == list(range(len(pts)))
    return res.cluster_labels.tolist()


def test_clusters_join_at_eps_exactly():
    """SwC's clustering uses geo's haversine and ``<=``: eps = d joins a pair, the next float below splits it."""
    rng = np.random.default_rng(11)
    tried = exact = 0
    for _ in range(300):
        a = np.array([rng.uniform(-89, 89), rng.uniform(-180, 180)])
        b = a + rng.normal(0, rng.choice([1e-4, 1e-2, 1.0]), 2)
        d = float(haversine_km(a[0], a[1], b[0], b[1]))
        if d == 0.0:
            continue
        pts = np.stack([a, b])
        tried += 1
        joined = _clusters(pts, d) == [0, 0]
        split = _clusters(pts, float(np.nextafter(d, 0))) == [0, 1]
        exact += joined and split
    assert tried > 250 and exact == tried


def test_pd_sums_equal_numpy_beyond_one_ufunc_buffer():
    """Selections longer than numpy's 8192-value buffer are summed chunk by chunk, as numpy does."""
    rng = np.random.default_rng(5)
    centres = np.stack([rng.uniform(-60, 70, 20000), rng.uniform(-180, 180, 20000)], axis=1)
    scales = (30000.0, 12000.0, 1.0, 25.0, 25.0, 8000.0)  # unsorted, a duplicate, beyond pi R
    idx = DensityIndex(centres, scales)
    for c in rng.integers(0, len(centres), 5):
        probs = (rng.random(len(centres)) ** 6).astype(np.float32)
        got = idx.density(int(c), probs)
        np.testing.assert_array_equal(got, reference_pd(int(c), probs, centres, scales))
        assert got[0] == probs.sum()  # 30000 km: every cell


def test_pd_boundary_cells_take_the_haversine_path():
    """Cells placed at the scale's distance are 'unsure' for the dot product; haversine decides."""
    rng = np.random.default_rng(9)
    centres = np.stack([rng.uniform(-60, 70, 500), rng.uniform(-180, 180, 500)], axis=1)
    c = 0
    lat0, lon0 = centres[c]
    scales = (1.0, 25.0, 200.0)
    for j, scale in enumerate(scales):
        centres[j + 1] = (lat0 + scale / 6371.0 * 180 / math.pi, lon0)
        centres[j + 4] = (lat0, lon0 + scale / 6371.0 * 180 / math.pi / math.cos(math.radians(lat0)))
    idx = DensityIndex(centres, scales)
    m = len(centres)
    near, levels, _, bitmap = idx._buffers()
    args = (idx.centres, idx._theta_max, idx._thresholds, idx._sorted_km, idx.BAND, bitmap, idx._codes(1), near, levels)
    n_near, settled = _kernels.pd_select(*idx._index, *args, np.array([float(c), 0.0, 0.0]))
    assert settled >= 3  # the boundary path really runs
    d = haversine_km(lat0, lon0, centres[:, 0], centres[:, 1])  # the reference formula, as PD settles
    want = [int(np.count_nonzero(dj <= np.asarray(idx._sorted_km))) for dj in d]
    assert near[:n_near].tolist() == [j for j in range(m) if want[j]]
    assert levels[:n_near].tolist() == [want[j] for j in range(m) if want[j]]
    probs = rng.dirichlet(np.ones(m)).astype(np.float32)
    np.testing.assert_array_equal(idx.density(c, probs), reference_pd(c, probs, centres, scales))


def test_density_is_thread_safe():
    rng = np.random.default_rng(2)
    centres = np.stack([rng.uniform(-60, 70, 3000), rng.uniform(-180, 180, 3000)], axis=1)
    idx = DensityIndex(centres)
    cases = [(int(rng.integers(0, 3000)), rng.dirichlet(np.ones(3000)).astype(np.float32)) for _ in range(40)]
    want = [reference_pd(c, p, centres) for c, p in cases]
    got: list = [None] * (4 * len(cases))

    def work(t: int) -> None:
        for i, (c, p) in enumerate(cases):
            got[t * len(cases) + i] = idx.density(c, p)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, g in enumerate(got):
        np.testing.assert_array_equal(g, want[k % len(cases)])


def test_density_rejects_bad_input():
    idx = DensityIndex(np.array([[0.0, 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="float32"):
        idx.density(0, np.array([0.5, 0.5]))  # float64: not the model's output
    with pytest.raises(ValueError, match=r"float32 \[2\]"):
        idx.density(0, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="outside the 2 cells"):
        idx.density(2, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="at most"):
        DensityIndex(np.zeros((2, 2)), tuple(float(s) for s in range(1, 40)))
    near, levels, _, bitmap = idx._buffers()
    args = (idx.centres, idx._theta_max, np.array([0.5, 0.1]), np.array([2.0, 1.0]), 1e-12, bitmap, idx._codes(1), near,
            levels, np.zeros(3))  # fmt: skip
    with pytest.raises(ValueError, match="ascend"):
        _kernels.pd_select(*idx._index, *args)
    with pytest.raises(ValueError, match="do not match"):
        _kernels.pd_select(idx._index[0][:, :1].copy(), *idx._index[1:], *args)
    with pytest.raises(ValueError, match="centres must be finite"):
        DensityIndex(np.array([[0.0, 0.0], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"lat in \[-90, 90\]"):
        idx.density_at(91.0, 0.0, np.ones(2, np.float32))
    _, _, values, bitmap = idx._buffers()

    def mass(origins, probs=np.ones(2, np.float32), codes=None, order=idx._order, bits=bitmap):
        n = len(origins)
        codes = idx._codes(n) if codes is None else codes
        _kernels.pd_mass(
            *idx._index, idx.centres, idx._theta_max, idx._thresholds, idx._sorted_km, idx.BAND, bits, codes, probs,
            order, values, np.array(origins, dtype=np.float64), np.empty((n, len(idx.scales_km))),
            np.empty(n, np.int64), np.empty(n), np.empty(n, np.int64),
        )  # fmt: skip

    for bad in [(2, 0, 0), (-2, 0, 0), (0.5, 0, 0)]:
        with pytest.raises(ValueError, match="outside 2 cells"):
            mass([bad])
    for bad in [(-1, np.nan, 0), (-1, 0, 180.5)]:
        with pytest.raises(ValueError, match=r"a point needs lat in \[-90, 90\]"):
            mass([(0, 0, 0), bad])
    with pytest.raises(ValueError, match="buffer sizes do not match"):  # another bundle's probabilities
        mass([(0, 0, 0)], probs=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="buffer sizes do not match"):  # codes for one origin, two asked
        mass([(0, 0, 0), (-1, 0, 0)], codes=np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="buffer sizes do not match"):  # one bitmap, two origins
        mass([(0, 0, 0), (-1, 0.5, 0.5)], bits=np.zeros(1, np.uint64))
    with pytest.raises(ValueError, match="permutation"):
        mass([(0, 0, 0)], order=np.full(len(idx.scales_km), 9))
    with pytest.raises(ValueError, match="1 to 17 origins"):
        mass([(-1, 0, 0)] * 18, codes=np.zeros(36, np.uint8))
    with pytest.raises(ValueError, match="at most 16 points"):
        idx.densities(0, ((0.0, 0.0),) * 17, np.ones(2, np.float32))
    assert not idx._codes(2).any() and not bitmap.any()  # nothing left behind by the refused calls


@pytest.mark.parametrize("top_k", [1, 3, 10, 64, 200])
def test_swc_top_k_is_a_stable_descending_order_with_nan_last(top_k):
    """The kernel's top k equals numpy's stable argsort of -sims (NaN last), ties and all."""
    rng = np.random.default_rng(top_k)
    n, d = 150, 8
    rows = rng.integers(-3, 4, (n, d)).astype(np.float16)  # small integers: many exact ties
    rows[rng.integers(0, n, 10)] = np.nan  # NaN similarities
    query = rng.integers(-3, 4, d).astype(np.float32)
    labels = np.stack([rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)], axis=1)
    sims = _sims(query, rows)
    want = np.argsort(-sims, kind="stable")[:top_k]
    got = search_within_cell(query, rows, labels, top_k=top_k, eps_km=1.0)
    np.testing.assert_array_equal(got.candidates, want)
    np.testing.assert_array_equal(got.similarities, sims[want])
    assert len(np.unique(sims[~np.isnan(sims)])) < n // 2  # the case really has ties


def test_swc_rejects_bad_shapes():
    feats = np.zeros((3, 4), np.float16)
    with pytest.raises(ValueError, match="labels \\[n, 2\\]"):
        search_within_cell(np.zeros(4, np.float32), feats, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="at least one"):
        search_within_cell(np.zeros(4, np.float32), feats[:0], np.zeros((0, 2)))
    with pytest.raises(ValueError, match="top_k"):
        search_within_cell(np.zeros(4, np.float32), feats, np.zeros((3, 2)), top_k=0)
    with pytest.raises(ValueError, match="outputs"):
        _kernels.swc(feats, True, np.zeros((3, 2)), np.zeros(4, np.float32), 1.0,
                     np.empty(4, np.int64), np.empty(4, np.float32), np.empty(4, np.int64))  # fmt: skip


def test_pd_grid_index_is_exact_at_the_poles_and_the_antimeridian():
    """Grid squares that wrap in longitude or shrink at the poles never hide a near cell."""
    rng = np.random.default_rng(4)
    parts = [
        np.stack([rng.uniform(80, 90, 400), rng.uniform(-180, 180, 400)], axis=1),
        np.stack([rng.uniform(-90, -82, 300), rng.uniform(-180, 180, 300)], axis=1),
        np.stack([rng.uniform(-10, 10, 400), rng.choice([-1, 1], 400) * rng.uniform(175, 180, 400)], axis=1),
        np.array([[90.0, 0.0], [-90.0, 45.0], [0.0, 180.0], [0.0, -180.0]]),
    ]
    centres = np.concatenate(parts)
    scales = (1.0, 25.0, 200.0, 750.0, 2500.0)
    idx = DensityIndex(centres, scales)
    probs = rng.dirichlet(np.ones(len(centres))).astype(np.float32)
    for c in [*rng.integers(0, len(centres), 40).tolist(), len(centres) - 4, len(centres) - 1]:
        np.testing.assert_array_equal(idx.density(c, probs), reference_pd(c, probs, centres, scales))
