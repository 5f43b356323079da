"""``visloc-export index``: own photos -> a new bundle, served by the real local stack."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import ServiceProcess
from PIL import Image
from tiny_bundle import build_tiny_bundle

from devtools.net import wait_serving
from swc_service import bundle as B
from visloc_client.exif import GPSError, gps_from_bytes
from visloc_client.preprocessing import preprocess
from visloc_export import index as I
from visloc_export import samples
from visloc_export.cli import main as export_main

PHOTOS = 2000


def jpeg(pixels: np.ndarray, latlon: tuple[float, float] | None = None) -> bytes:
    """A JPEG of ``pixels``, with ``latlon`` in its EXIF GPS block when given."""
    return samples.encode(Image.fromarray(pixels), exif=samples.gps_exif(*latlon) if latlon else Image.Exif())


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> B.Bundle:
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def photo_dir(tiny_base, tmp_path_factory) -> tuple[Path, dict[str, tuple[float, float]]]:
    """PHOTOS geotagged JPEGs, each placed ~10 m from the centre of the cell the model predicts
    for it (SwC searches only the top cell), plus photos that must be skipped."""
    root = tmp_path_factory.mktemp("photos")
    sess = ort.InferenceSession(str(tiny_base.model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    truth: dict[str, tuple[float, float]] = {}
    pixels = rng.integers(0, 256, (PHOTOS, 12, 16, 3), dtype=np.uint8)
    inputs = np.stack([preprocess(jpeg(p)).array for p in pixels])  # the bytes Locate will see, less EXIF
    top = np.concatenate(
        [sess.run([B.OUTPUT_PROBS], {B.INPUT_NAME: inputs[a : a + 250]})[0] for a in range(0, PHOTOS, 250)]
    ).argmax(1)
    places = tiny_base.centres[top] + rng.uniform(-1e-4, 1e-4, (PHOTOS, 2))
    for i in range(PHOTOS):
        sub = root / f"d{i % 7}"
        sub.mkdir(exist_ok=True)
        path = sub / f"p{i:05d}.jpg"
        path.write_bytes(jpeg(pixels[i], tuple(places[i])))
        truth[str(path)] = tuple(places[i])
    (root / "nogps.jpg").write_bytes(jpeg(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "far.jpg").write_bytes(jpeg(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (95.0, 10.0)))
    shutil.copyfile(root / "d0" / "p00000.jpg", root / "copy-of-p0.jpg")
    return root, truth


def test_exif_gps_round_trip_and_reasons():
    pixels = np.zeros((8, 8, 3), np.uint8)
    assert gps_from_bytes(jpeg(pixels, (-33.8567844, -151.2152967))) == pytest.approx((-33.8567844, -151.2152967))
    with pytest.raises(GPSError, match="no GPS"):
        gps_from_bytes(jpeg(pixels))
    with pytest.raises(GPSError, match="unreadable"):
        gps_from_bytes(b"not an image")
    with pytest.raises(GPSError, match="out of range"):
        gps_from_bytes(jpeg(pixels, (91.0, 0.0)))


def test_index_extend_serves_each_photo_as_its_own_first_neighbour(tiny_base, photo_dir, tmp_path, capsys):
    from devtools.triton_local import LocalTriton
    from visloc_client.client import LocatorClient

    root, truth = photo_dir
    out = tmp_path / "new"
    rc = export_main(["index", "--base", str(tiny_base.path), "--photos", str(root), "--out", str(out), "--extend"])
    assert rc == 0, capsys.readouterr().err
    new = B.load_bundle(out)
    report = json.loads((out / I.REPORT).read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"nogps.jpg", "broken.jpg", "far.jpg"}
    assert "no GPS" in reasons["nogps.jpg"]
    assert reasons["broken.jpg"].startswith("unreadable")
    assert "out of range" in reasons["far.jpg"]
    # The walk sees the folder's own files before its subfolders: the copy comes first.
    assert report["duplicates"] == [
        {"path": str(root / "d0" / "p00000.jpg"), "duplicate_of": str(root / "copy-of-p0.jpg")}
    ]
    assert report["counts"]["indexed"] == PHOTOS
    assert new.num_background == tiny_base.num_background + PHOTOS
    assert new.bundle_id != tiny_base.bundle_id
    assert new.manifest["index"]["base"]["bundle_id"] == tiny_base.bundle_id
    assert new.manifest["index"]["photos"]["path"] == str(root.resolve())
    assert B.sha256_file(out / I.REPORT) == new.manifest["index"]["report"]["sha256"]
    assert new.verify_checksums() == []

    # Base rows kept with their row ids, labels and features; new ids follow the base's largest.
    pos = {int(r): i for i, r in enumerate(new.row_ids)}
    base_ids = np.asarray(tiny_base.row_ids)
    where = np.array([pos[int(r)] for r in base_ids])
    assert np.array_equal(np.asarray(new.features[where]), np.asarray(tiny_base.features))
    assert np.array_equal(np.asarray(new.labels[where]), np.asarray(tiny_base.labels))
    new_ids = sorted(set(pos) - set(base_ids.tolist()))
    assert new_ids == list(range(int(base_ids.max()) + 1, int(base_ids.max()) + 1 + PHOTOS))
    for c in range(new.num_cells):  # per-cell contiguous, ascending row ids
        a, b = new.cell_rows(c)
        assert np.all(np.diff(new.row_ids[a:b]) > 0)

    paths = sorted(truth)
    with LocalTriton(out, threads=2) as triton:
        svc = ServiceProcess(out, triton.grpc_url)
        try:
            wait_serving(svc.target)
            with LocatorClient(svc.target) as client:
                items = list(client.locate_many((Path(p) for p in paths), concurrency=8, neighbours=1))
        finally:
            svc.stop()
    bad = []
    for path, item in zip(paths, items, strict=True):
        assert item.result is not None, f"{path}: {item.error}"
        first = item.result.neighbours[0]
        lat, lon = truth[path]
        if not (first.similarity >= 0.999 and abs(first.lat - lat) < 1e-6 and abs(first.lon - lon) < 1e-6):
            bad.append((path, first))
        assert first.row_id > int(base_ids.max())
    assert not bad, f"{len(bad)} photos did not come back as their own first neighbour: {bad[:3]}"


def _photos(root: Path, count: int, seed: int = 3) -> list[Path]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        p = root / f"q{i:03d}.jpg"
        p.write_bytes(jpeg(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)))
        out.append(p)
    return out


def test_csv_input_relative_paths_and_bad_rows(tiny_base, tmp_path):
    photos = _photos(tmp_path / "imgs", 5)
    listing = tmp_path / "list.csv"
    rows = [f"imgs/{p.name},{10 + i},{20 + i}" for i, p in enumerate(photos)]
    rows += ["imgs/missing.jpg,1,2", "imgs/q000.jpg,100,0", "imgs/q001.jpg,abc,0"]
    listing.write_text("path,lat,lon\n" + "\n".join(rows) + "\n")
    new = I.build_index(tiny_base.path, tmp_path / "new", photo_list=listing)
    report = json.loads((new.path / I.REPORT).read_text())
    assert new.num_background == 5  # without --extend: only the new photos
    assert sorted(map(tuple, np.asarray(new.labels).tolist())) == [(10.0 + i, 20.0 + i) for i in range(5)]
    assert np.array_equal(np.sort(np.asarray(new.row_ids)), np.arange(5))
    reasons = sorted(s["reason"].split(":")[0] for s in report["skipped"])
    assert reasons == [
        "coordinates ('100', '0') are not numbers in range",
        "coordinates ('abc', '0') are not numbers in range",
        "unreadable",
    ]
    # Each photo is in the cell of the nearest centre.
    expected = I.nearest_cells(np.asarray(new.labels), new.centres)
    for c in range(new.num_cells):
        a, b = new.cell_rows(c)
        assert np.all(expected[a:b] == c)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,latitude,longitude\n")
    with pytest.raises(ValueError, match="header path,lat,lon"):
        I.build_index(tiny_base.path, tmp_path / "never", photo_list=bad)
    assert not (tmp_path / "never").exists()


def test_duplicates_are_indexed_once(tiny_base, tmp_path):
    photos = _photos(tmp_path / "imgs", 3)
    shutil.copyfile(photos[1], tmp_path / "imgs" / "z-again.jpg")
    listing = tmp_path / "list.csv"
    listing.write_text(
        "path,lat,lon\n" + "".join(f"imgs/{p.name},1,{i}\n" for i, p in enumerate(photos)) + "imgs/z-again.jpg,5,5\n"
    )
    new = I.build_index(tiny_base.path, tmp_path / "new", photo_list=listing)
    report = json.loads((new.path / I.REPORT).read_text())
    assert new.num_background == 3
    assert report["duplicates"] == [{"path": str(tmp_path / "imgs" / "z-again.jpg"), "duplicate_of": str(photos[1])}]


def test_interrupted_run_resumes_from_its_checkpoint(tiny_base, tmp_path, monkeypatch):
    photos = _photos(tmp_path / "imgs", 9)
    listing = tmp_path / "list.csv"
    listing.write_text("path,lat,lon\n" + "".join(f"imgs/{p.name},{i},{i}\n" for i, p in enumerate(photos)))
    opts = I.Options(checkpoint_every=4)
    calls = {"n": 0}
    real_read = I._read

    def failing_read(source):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_read(source)

    monkeypatch.setattr(I, "_read", failing_read)
    with pytest.raises(KeyboardInterrupt):
        I.build_index(tiny_base.path, tmp_path / "new", photo_list=listing, options=opts)
    work = I.work_dir_for((tmp_path / "new").resolve())
    state = json.loads((work / I.STATE).read_text())
    assert state["position"] == 4 and len(state["chunks"]) == 1
    assert not (tmp_path / "new").exists()

    seen = []
    monkeypatch.setattr(I, "_read", lambda source: seen.append(source.path.name) or real_read(source))
    new = I.build_index(tiny_base.path, tmp_path / "new", photo_list=listing, options=opts)
    assert sorted(seen) == [p.name for p in photos[4:]]  # the first 4 were not read again
    assert new.num_background == 9
    assert np.array_equal(np.sort(np.asarray(new.labels)[:, 0]), np.arange(9.0))
    assert not work.exists()


def test_resume_refuses_another_runs_checkpoint(tiny_base, tmp_path):
    photos = _photos(tmp_path / "imgs", 2)
    listing = tmp_path / "list.csv"
    listing.write_text("path,lat,lon\n" + "".join(f"imgs/{p.name},1,1\n" for p in photos))
    work = I.work_dir_for((tmp_path / "new").resolve())
    work.mkdir()
    (work / I.STATE).write_text(json.dumps({"base_bundle_id": "other", "position": 1, "chunks": []}))
    with pytest.raises(ValueError, match="another base_bundle_id"):
        I.build_index(tiny_base.path, tmp_path / "new", photo_list=listing)


def test_nearest_cells_is_the_great_circle_nearest():
    from swc_service.geo import haversine_km

    rng = np.random.default_rng(0)
    centres = np.stack([rng.uniform(-80, 80, 300), rng.uniform(-180, 180, 300)], 1)
    points = np.stack([rng.uniform(-90, 90, 1000), rng.uniform(-180, 180, 1000)], 1)
    got = I.nearest_cells(points, centres, chunk_bytes=8 * 300 * 7)  # several chunks
    dist = haversine_km(points[:, None, 0], points[:, None, 1], centres[None, :, 0], centres[None, :, 1])
    assert np.allclose(dist[np.arange(1000), got], dist.min(axis=1), atol=1e-9)


def test_a_checkpoint_of_only_skipped_photos(tiny_base, tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):  # sorted first: the first checkpoint holds no photo
        (folder / name).write_bytes(jpeg(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)))
    for i, name in enumerate(("c.jpg", "d.jpg")):
        (folder / name).write_bytes(jpeg(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (40.0 + i, -3.0)))
    new = I.build_index(tiny_base.path, tmp_path / "new", photos=folder, options=I.Options(checkpoint_every=2))
    report = json.loads((new.path / I.REPORT).read_text())
    assert new.num_background == 2 and report["counts"]["skipped"] == 2
    assert sorted(np.asarray(new.labels)[:, 0].tolist()) == [40.0, 41.0]


def test_many_shapes_do_not_wait_for_full_batches(tiny_base, tmp_path, monkeypatch):
    """Photos of 70 aspect ratios at batch size 32: groups are sent before the checkpoint, so
    decoded photos waiting for a batch stay bounded; every photo is indexed once."""
    rng = np.random.default_rng(9)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(70):
        (folder / f"s{i:02d}.jpg").write_bytes(jpeg(rng.integers(0, 256, (12, 12 + i, 3), dtype=np.uint8), (1.0, i)))
    sizes = []
    real = I.OnnxEmbedder.submit
    monkeypatch.setattr(I.OnnxEmbedder, "submit", lambda self, batch: sizes.append(len(batch)) or real(self, batch))
    new = I.build_index(tiny_base.path, tmp_path / "new", photos=folder, options=I.Options(batch_size=32))
    assert new.num_background == 70 and sum(sizes) == 70
    assert len(sizes) > 1  # some groups went before the end of the run


def test_triton_embedder_indexes_and_refuses_another_model(tiny_base, tmp_path):
    """--triton: embeddings from a running Triton equal in-process ones; a Triton serving
    another model is refused by the bundle's probes before any photo is read."""
    from devtools.triton_local import LocalTriton

    photos = _photos(tmp_path / "imgs", 6)
    listing = tmp_path / "list.csv"
    listing.write_text("path,lat,lon\n" + "".join(f"imgs/{p.name},{i},{i}\n" for i, p in enumerate(photos)))
    here = I.build_index(tiny_base.path, tmp_path / "here", photo_list=listing)
    other = build_tiny_bundle(tmp_path / "other", seed=1)
    with LocalTriton(tiny_base.path, threads=1) as triton:
        there = I.build_index(tiny_base.path, tmp_path / "there", photo_list=listing, triton_url=triton.grpc_url)
    assert there.manifest["index"]["embedder"].startswith("triton")
    assert np.array_equal(np.asarray(there.row_ids), np.asarray(here.row_ids))
    assert np.allclose(np.asarray(there.features, np.float32), np.asarray(here.features, np.float32), atol=1e-3)
    assert there.probes is not None and np.array_equal(there.probes.embeddings, tiny_base.probes.embeddings)
    with LocalTriton(other.path, threads=1) as triton, pytest.raises(I.EmbedError, match="model check"):
        I.build_index(tiny_base.path, tmp_path / "never", photo_list=listing, triton_url=triton.grpc_url)
    assert not (tmp_path / "never").exists()
