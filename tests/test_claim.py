"""The claim check against an independent computation: float64 haversine from the claim to
every cell centre, numpy's masks and sums, a sort for the rank; on an upstream-scale cell set
(M = 31,145) and the demo bundle, with claims at the poles, across the antimeridian, in the
ocean. Then the claim through the service (in process, real gRPC): order, validation, cost-free
when absent, and the background images near a claim against a brute-force search."""

from __future__ import annotations

import asyncio
import json
import math

import grpc
import numpy as np
import pytest
from test_caller_preprocessing import served
from test_dataplane import CENTRES, FakeInference, grey, make_locator, tiny_bundle  # noqa: F401 - fixture
from test_tracing import traced_server

from swc_service.bundle import load_bundle
from swc_service.claim import check_claim
from swc_service.geo import haversine_km
from swc_service.method import DensityIndex
from swc_service.prediction import ServingState
from visloc_client.v1 import locator_pb2 as pb

R = 6371.0
SCALES = (1.0, 25.0, 200.0, 750.0, 2500.0)
SPECIAL = [
    (90.0, 0.0), (-90.0, 123.0), (89.9999, -45.0),  # the poles
    (10.0, 180.0), (10.0, -180.0), (-16.5, 179.9), (-16.5, -179.9), (65.0, -179.99),  # the antimeridian
    (0.0, -140.0), (-48.9, -123.4), (30.0, -40.0),  # the ocean (Point Nemo among them)
    (48.8584, 2.2945), (40.6892, -74.0445),
]  # fmt: skip


def reference_haversine(lat: float, lon: float, centres: np.ndarray) -> np.ndarray:
    """Float64 haversine in numpy, written here (not the service's kernel)."""
    p1, p2 = math.radians(lat), np.radians(centres[:, 0])
    dphi, dlmb = p2 - p1, np.radians(centres[:, 1] - lon)
    a = np.sin(dphi / 2) ** 2 + math.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return 2 * R * np.arcsin(np.sqrt(np.minimum(a, 1.0)))


def upstream_scale_cells(seed: int = 0) -> np.ndarray:
    """31,145 cell centres like the upstream's: dense where people photograph, sparse elsewhere,
    some right at the antimeridian and near the poles."""
    rng = np.random.default_rng(seed)
    hubs = np.c_[rng.uniform(-50, 65, 300), rng.uniform(-180, 180, 300)]
    dense = hubs[rng.integers(0, 300, 25_000)] + rng.normal(0, 1.5, (25_000, 2))
    sparse = np.c_[np.degrees(np.arcsin(rng.uniform(-1, 1, 6_000))), rng.uniform(-180, 180, 6_000)]
    edges = np.array([[10.0, 179.95], [10.0, -179.95], [-16.5, 180.0], [89.99, 10.0], [-89.9, -70.0]])
    cells = np.r_[dense, sparse, edges][:31_145]
    cells[:, 0] = np.clip(cells[:, 0], -90, 90)
    cells[:, 1] = (cells[:, 1] + 180) % 360 - 180
    return cells


def probabilities(m: int, seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0, 3, m)
    p = np.exp(logits - logits.max())
    return (p / p.sum()).astype(np.float32)


def reference_check(centres: np.ndarray, probs: np.ndarray, lat: float, lon: float):
    d = reference_haversine(lat, lon, centres)
    mass = [float(probs[d <= s].sum()) for s in SCALES]
    nearest = int(np.flatnonzero(d <= d.min() + 1e-9)[0])  # an exact tie in km (1e-9: float noise) -> lower id
    order = np.argsort(-probs, kind="stable")  # most probable first, the lower id on a tie
    rank = int(np.flatnonzero(order == nearest)[0]) + 1
    return mass, nearest, rank, float(d[nearest])


def random_claims(n: int, seed: int) -> list[tuple[float, float]]:
    rng = np.random.default_rng(seed)
    return [(math.degrees(math.asin(rng.uniform(-1, 1))), rng.uniform(-180, 180)) for _ in range(n)]


@pytest.mark.parametrize("cells", ["upstream_scale", "tiny"])
def test_claim_mass_rank_and_cell_match_float64_haversine(cells, tiny_bundle):  # noqa: F811
    centres = upstream_scale_cells() if cells == "upstream_scale" else load_bundle(tiny_bundle).centres
    density = DensityIndex(centres, SCALES)
    claims = SPECIAL + random_claims(200, seed=1)
    for i, (lat, lon) in enumerate(claims):
        probs = probabilities(len(centres), seed=i)
        at = density.density_at(lat, lon, probs)
        want_mass, want_cell, want_rank, want_km = reference_check(centres, probs, lat, lon)
        assert np.abs(at.mass - want_mass).max() <= 1e-6, (lat, lon)
        assert at.cell == want_cell and at.rank == want_rank, (lat, lon)
        assert at.cell_km == pytest.approx(want_km, abs=1e-6)
        if i % 20 == 0:  # the cells within a radius (the search for images near a claim)
            d = reference_haversine(lat, lon, centres)
            for radius in (10.0, 300.0, 5000.0):
                assert density.cells_within(lat, lon, radius).tolist() == np.flatnonzero(d <= radius).tolist()


def test_claim_mass_matches_on_the_demo_bundle(demo_bundle):
    centres = load_bundle(demo_bundle).centres
    density = DensityIndex(centres, SCALES)
    for i, (lat, lon) in enumerate(SPECIAL + random_claims(100, seed=2)):
        probs = probabilities(len(centres), seed=100 + i)
        at = density.density_at(lat, lon, probs)
        want_mass, want_cell, want_rank, _ = reference_check(centres, probs, lat, lon)
        assert np.abs(at.mass - want_mass).max() <= 1e-6 and (at.cell, at.rank) == (want_cell, want_rank)


def test_claim_at_the_top_cells_centre_is_its_prediction_density():
    """PD is the claim mass of the top cell's centre: the same sums, bit for bit."""
    centres = upstream_scale_cells(seed=3)
    density = DensityIndex(centres, SCALES)
    probs = probabilities(len(centres), seed=3)
    top = int(np.argmax(probs))
    at = density.density_at(*centres[top], probs)
    assert at.mass.tolist() == density.density(top, probs).tolist() and (at.cell, at.rank) == (top, 1)


def offset(lat: float, lon: float, km: float, bearing_deg: float) -> tuple[float, float]:
    """The point `km` from (lat, lon) along a great circle at `bearing_deg` (the direct problem)."""
    d, b, p1, l1 = km / R, math.radians(bearing_deg), math.radians(lat), math.radians(lon)
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b))
    l2 = l1 + math.atan2(math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
    return math.degrees(p2), (math.degrees(l2) + 180.0) % 360.0 - 180.0


def test_claims_near_the_top_cell_match_the_claim_alone_and_float64_haversine():
    """A claim within 1/25 of the largest scale of the top cell takes its levels from the top cell's
    dot products wherever the triangle inequality decides them, and its own elsewhere; the result
    must be the claim computed alone (bit for bit) and the float64 reference, at every offset up to
    and past that limit (100 km here), near the poles and across the antimeridian, with several
    claims at once."""
    centres = upstream_scale_cells(seed=4)
    density = DensityIndex(centres, SCALES)
    rng = np.random.default_rng(4)
    tops = [*rng.integers(0, len(centres), 40).tolist(), 31_000, 31_001, 31_002, 31_003, 31_004]  # + the edge cells
    for i, top in enumerate(tops):
        probs = probabilities(len(centres), seed=200 + i)
        lat0, lon0 = centres[top]
        claims = tuple(
            offset(lat0, lon0, km, rng.uniform(0, 360)) for km in (0.0, 1e-6, 0.3, 5.0, 24.999, 60.0, 99.9, 100.1)
        )
        pd, at = density.densities(top, claims, probs)
        d_top = reference_haversine(lat0, lon0, centres)
        np.testing.assert_array_equal(pd, [probs[d_top <= s].sum() for s in SCALES])  # PD, unchanged
        for (lat, lon), got in zip(claims, at, strict=True):
            alone = density.density_at(lat, lon, probs)
            assert got.mass.tolist() == alone.mass.tolist(), (top, lat, lon)
            assert (got.cell, got.rank, got.cell_km) == (alone.cell, alone.rank, alone.cell_km), (top, lat, lon)
            want_mass, want_cell, want_rank, want_km = reference_check(centres, probs, lat, lon)
            assert np.abs(got.mass - want_mass).max() <= 1e-6 and (got.cell, got.rank) == (want_cell, want_rank)
            assert got.cell_km == pytest.approx(want_km, abs=1e-6)


def test_claim_near_the_top_cell_with_cells_on_its_boundaries():
    """Cells placed at each scale (and a micrometre either side) from a claim 3 km from the top cell
    and from the top cell itself: the claim's own dot products and the reference haversine decide
    them, as for the claim alone and as the reference's masked sums (bit for bit)."""
    rng = np.random.default_rng(11)
    centres = np.c_[rng.uniform(20, 60, 3000), rng.uniform(-20, 40, 3000)]
    top = 0
    centres[top] = (40.0, 10.0)
    claim = offset(40.0, 10.0, 3.0, 30.0)
    k = 1
    for s in SCALES:
        for bearing in (0.0, 77.0, 160.0, 250.0):
            for origin in (claim, (40.0, 10.0)):
                for nudge in (-1e-9, 0.0, 1e-9):
                    centres[k] = offset(*origin, s + nudge, bearing)
                    k += 1
    density = DensityIndex(centres, SCALES)
    for seed in range(5):
        probs = probabilities(len(centres), seed=300 + seed)
        pd, (got,) = density.densities(top, (claim,), probs)
        alone = density.density_at(*claim, probs)
        assert got.mass.tolist() == alone.mass.tolist() and (got.cell, got.rank) == (alone.cell, alone.rank)
        d = haversine_km(*claim, centres[:, 0], centres[:, 1])  # the reference's formula: it decides a boundary
        assert got.mass.tolist() == [float(probs[d <= s].sum()) for s in SCALES]
        assert got.mass.tolist() != pd.tolist()  # the claim's own selection, not the top cell's


@pytest.mark.parametrize(
    "scales",
    [(24.0, 25.0, 26.0), (0.001, 0.01, 5.0), (100.0, 20015.0), (20015.1,), (0.05, 30000.0)],
    ids=["close", "tiny", "half-circumference", "beyond-half", "tiny-and-all"],
)
def test_claims_near_the_top_cell_at_unusual_scales(scales):
    """The derived bands where they degenerate: scales closer together than the bands are wide,
    scales of metres (the bands wider than the scale), scales at and past half the circumference
    (every cell within); up to five points per call, one on a cell's boundary."""
    rng = np.random.default_rng(int(1000 * scales[0]) % 2**32)
    big = max(scales)
    for _ in range(4):
        m = int(rng.integers(50, 2000))
        hub = rng.uniform([-80, -180], [80, 180])
        spread = rng.uniform(0.01, 20)
        centres = np.c_[np.clip(hub[0] + rng.normal(0, spread, m), -90, 90),
                        (hub[1] + rng.normal(0, 1.5 * spread, m) + 180) % 360 - 180]  # fmt: skip
        density = DensityIndex(centres, scales)
        probs = rng.dirichlet(np.full(m, 0.3)).astype(np.float32)
        for _ in range(6):
            top = int(rng.integers(0, m))
            kms = [0.0, 1e-7, 1e-3, 0.5, big / 100, big / 25.01, big / 24.99]  # 1/25: the derived limit
            offsets = rng.choice(kms, size=int(rng.integers(1, 5)))
            points = tuple(offset(*centres[top], float(km), rng.uniform(0, 360)) for km in offsets)
            points += (offset(*centres[int(rng.integers(0, m))], float(rng.choice(scales)), rng.uniform(0, 360)),)
            pd, at = density.densities(top, points, probs)
            d = haversine_km(*centres[top], centres[:, 0], centres[:, 1])
            assert pd.tolist() == [float(probs[d <= s].sum()) for s in scales]
            for point, got in zip(points, at, strict=True):
                alone = density.density_at(*point, probs)
                d = haversine_km(*point, centres[:, 0], centres[:, 1])
                assert got.mass.tolist() == alone.mass.tolist() == [float(probs[d <= s].sum()) for s in scales]
                assert (got.cell, got.rank, got.cell_km) == (alone.cell, alone.rank, alone.cell_km)


@pytest.mark.parametrize("place", [(40.0, 10.0), (-75.0, -150.0)])  # among the cells; 3,000+ km from the others
def test_nearest_cell_ties_go_to_the_lower_id(place):
    """Twenty cells on one centre (more near-ties than the kernel keeps while it scans) and two
    mirrored across the antimeridian: the lower id, as the float64 reference says."""
    rng = np.random.default_rng(7)
    centres = np.c_[rng.uniform(20, 60, 500), rng.uniform(-20, 40, 500)]
    twins = rng.choice(np.arange(3, 500), 20, replace=False)
    centres[twins] = place
    centres[[7, 2]] = [(10.0, 179.95), (10.0, -179.95)]
    density = DensityIndex(centres, SCALES)
    for i, (lat, lon) in enumerate([place, (place[0] + 1e-7, place[1]), (10.0, 180.0), (10.0, -180.0), (-60.0, 0.0)]):
        probs = probabilities(len(centres), seed=50 + i)
        at = density.density_at(lat, lon, probs)
        want_mass, want_cell, want_rank, want_km = reference_check(centres, probs, lat, lon)
        assert (at.cell, at.rank) == (want_cell, want_rank) and at.cell_km == pytest.approx(want_km, abs=1e-6)
        assert np.abs(at.mass - want_mass).max() <= 1e-6
    assert density.density_at(*place, probabilities(len(centres), 0)).cell == min(twins)
    assert density.density_at(10.0, 180.0, probabilities(len(centres), 0)).cell == 2


def test_claim_neighbours_are_the_most_similar_images_within_the_radius(tiny_bundle):  # noqa: F811
    bundle = load_bundle(tiny_bundle)
    state = ServingState.of(bundle, SCALES)
    probs = probabilities(bundle.num_cells, seed=4)
    embedding = np.zeros(bundle.features.shape[1], dtype=np.float32)
    embedding[[0, 2]] = [0.9, 0.4]
    lat, lon = CENTRES[0] + [0.03, -0.02]
    result = check_claim(state, probs, embedding, (lat, lon), (0.0, 0.0), radius_km=10.0, neighbours=3)
    labels, feats = np.asarray(bundle.labels), np.asarray(bundle.features, dtype=np.float32)
    d = reference_haversine(lat, lon, labels)
    inside = np.flatnonzero(d <= 10.0)
    assert 0 < len(inside) < bundle.num_background  # the radius excludes some rows
    sims = feats[inside] @ embedding
    order = inside[np.lexsort((inside, -sims))][:3]
    assert [n.row_id for n in result.neighbours] == [int(bundle.row_ids[r]) for r in order]
    assert all(n.distance_km <= 10.0 for n in result.neighbours)
    assert result.distance_km == pytest.approx(reference_haversine(0.0, 0.0, np.array([[lat, lon]]))[0], abs=1e-6)
    far = check_claim(state, probs, embedding, (0.0, -140.0), (0.0, 0.0), radius_km=10.0, neighbours=3)
    assert far.neighbours == ()  # the ocean: nothing near


def test_claims_through_the_service(tiny_bundle):  # noqa: F811
    claims = [pb.Claim(lat=48.0, lon=2.0), pb.Claim(lat=-33.9, lon=151.2), pb.Claim(lat=90.0, lon=0.0)]

    async def go():
        async with traced_server(tiny_bundle, FakeInference()) as stub:
            plain = await stub.Locate(pb.LocateRequest(image=grey(1)))
            opts = pb.LocateOptions(claims=claims, claim_neighbours=2, claim_radius_km=50.0)
            claimed = await stub.Locate(pb.LocateRequest(image=grey(1), options=opts))
            errors = []
            for bad in ([pb.Claim(lat=91.0, lon=0.0)], [pb.Claim(lat=0.0, lon=180.5)], [pb.Claim(lat=math.nan, lon=0)],
                        [pb.Claim(lat=0.0, lon=math.inf)], [pb.Claim(lat=1.0, lon=1.0)] * 17):  # fmt: skip
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Locate(pb.LocateRequest(image=grey(1), options=pb.LocateOptions(claims=bad)))
                errors.append((err.value.code(), err.value.details()))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                negative = pb.LocateOptions(claims=claims[:1], claim_radius_km=-1)
                await stub.Locate(pb.LocateRequest(image=grey(1), options=negative))
            errors.append((err.value.code(), err.value.details()))
            return plain, claimed, errors

    plain, claimed, errors = asyncio.run(go())
    assert not plain.claims and plain.timings.claim_ms == 0
    assert [(c.claim.lat, c.claim.lon) for c in claimed.claims] == [(c.lat, c.lon) for c in claims]
    first = claimed.claims[0]  # grey(1): the fake puts 0.7 on cell 1 and 0.1 on each other cell
    assert (first.cell.id, first.rank) == (0, 2) and (claimed.claims[1].cell.id, claimed.claims[1].rank) == (2, 3)
    assert first.mass[0].density == pytest.approx(0.1)  # cell 0's centre is the claim
    assert first.mass[0].scale_km == 1.0 and len(first.mass) == len(claimed.prediction_density)
    assert [d.density for d in first.mass][-1] >= [d.density for d in first.mass][0]
    assert len(first.neighbours) == 2 and claimed.timings.claim_ms > 0
    assert claimed.lat == plain.lat and claimed.lon == plain.lon  # a claim changes nothing else
    assert all(code == grpc.StatusCode.INVALID_ARGUMENT for code, _ in errors)
    assert "claims[0] (91.0, 0.0)" in errors[0][1] and "at most 16 claims" in errors[4][1]
    assert "claim_radius_km" in errors[5][1]


# --- visloc evaluate: the missing photos, and --claims --------------------------------------------


def labelled_set(tmp_path, per_cell: int = 3, extra_ids: int = 2):
    """Photos whose model answer is their own city (the fake puts 0.7 on cell grey % 4), each
    labelled a few km from that city's cell centre; ``extra_ids`` listed but not in the folder."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(7)
    rows = ["id,lat,lon"]
    for cell in range(len(CENTRES)):
        for k in range(per_cell):
            image_id = f"p{cell}{k}"
            (images / f"{image_id}.png").write_bytes(grey(cell))
            lat, lon = CENTRES[cell] + rng.normal(0, 0.03, 2)
            rows.append(f"{image_id},{lat},{lon}")
    rows += [f"absent{i},1.0,1.0" for i in range(extra_ids)]
    metadata = tmp_path / "gt.csv"
    metadata.write_text("\n".join(rows) + "\n")
    return images, metadata


def test_evaluate_claims_separates_true_from_false_claims(tiny_bundle, tmp_path, capsys):  # noqa: F811
    from visloc_client.cli import main

    images, metadata = labelled_set(tmp_path)
    out, plot = tmp_path / "report.json", tmp_path / "claims.png"
    with served(tiny_bundle) as target:
        args = ["--target", target, "evaluate", "--images", str(images), "--metadata", str(metadata), "--claims"]
        rc = main([*args, "--claims-plot", str(plot), "--out", str(out), "--no-progress", "--claims-bootstrap", "50"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(out.read_text())
    claims = report["claims"]
    assert claims["true_claims"] == 12 and claims["distances_km"] == [25.0, 200.0, 750.0]
    for distance in ("25", "200", "750"):
        at_25 = claims["results"][distance]["25"]
        assert at_25["auc"] == 1.0 and at_25["tar"] == 1.0 and at_25["false_claims"] == 12
        assert at_25["bootstrap"]["auc_interval"] == [1.0, 1.0]
    for r in report["records"]:  # the true claim is the photo's own position: its city's cell holds 0.7
        assert r["claims"]["true"]["25"] == pytest.approx(0.7) and r["claims"]["true_rank"] == 1
        assert all(f["25"] == pytest.approx(0.1) for f in r["claims"]["false"].values())  # another city
    assert "false >= 750 km, mass within 25 km: AUC 1.000" in captured.out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The two listed photos the folder lacks are counted, named, and over 1 %: a warning.
    assert report["counts"]["metadata_photos"] == 14 and report["counts"]["missing"] == 2
    assert report["missing_first"] == ["absent0", "absent1"]
    assert "warning: 2 of the 14 photos" in captured.err and "2 of the metadata's 14 photos are not in" in captured.err


def test_evaluate_counts_a_folder_without_any_listed_photo(tiny_bundle, tmp_path, capsys):  # noqa: F811
    from visloc_client.cli import main

    _, metadata = labelled_set(tmp_path, per_cell=1, extra_ids=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "r.json"
    with served(tiny_bundle) as target:
        main(["--target", target, "evaluate", "--images", str(empty), "--metadata", str(metadata), "--out", str(out),
              "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["counts"]["evaluated"] == 0 and report["counts"]["missing"] == 4
    assert "evaluating 0 images" in err and "4 of the metadata's 4 photos are not in the folder" in err
    assert "warning: 4 of the 4 photos" in err and "(100.0 %)" in err
