"""Acceptance: ``visloc evaluate`` through the live demo stack (real Triton + service) gives the
same per-image predictions as single ``visloc locate --json`` calls."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from visloc_client.cli import main
from visloc_client.evaluation import haversine_km, split_summary

N_IMAGES = 20


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path, dict[str, tuple[float, float]]]:
    from visloc_export.samples import photo_bytes

    images = tmp_path / "images"
    images.mkdir()
    truth = {}
    for i in range(N_IMAGES):
        image_id = f"photo{i:02d}"
        (images / f"{image_id}.jpg").write_bytes(photo_bytes(100 + i))
        truth[image_id] = (-60 + 6.1 * i, -170 + 17.3 * i)  # made up, spread over the globe
    truth["broken"] = (0.0, 0.0)
    (images / "broken.jpg").write_bytes(photo_bytes(7)[:200])  # truncated JPEG
    (images / "unlabelled.jpg").write_bytes(photo_bytes(8))
    metadata = tmp_path / "truth.csv"
    with open(metadata, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "lat", "lon"])
        writer.writerows([k, lat, lon] for k, (lat, lon) in truth.items())
    return images, metadata, truth


def test_evaluate_matches_single_locate_calls(live_target, dataset, tmp_path, capsys):
    images, metadata, truth = dataset
    report_path = tmp_path / "report.json"
    rc = main(
        ["--target", live_target, "evaluate", "--images", str(images), "--metadata", str(metadata),
         "--concurrency", "8", "--out", str(report_path), "--no-progress"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert rc == 1, printed  # the truncated image failed, and was counted
    assert report["counts"] == {
        "files": N_IMAGES + 2,
        "evaluated": N_IMAGES,
        "failed": 1,
        "no_metadata": 1,
        "not_run": 0,
        "metadata_photos": N_IMAGES + 1,  # the broken one is listed too
        "missing": 0,
    }
    assert report["failures"][0]["file"] == "broken.jpg"
    assert report["failures"][0]["code"] == "INVALID_ARGUMENT"
    assert report["no_metadata"] == ["unlabelled.jpg"]
    assert "Total predictions: 20" in printed

    records = {r["file"]: r for r in report["records"]}
    assert len(records) == N_IMAGES
    for name, record in sorted(records.items()):
        assert main(["--target", live_target, "locate", str(images / name), "--json"]) == 0
        single = json.loads(capsys.readouterr().out)
        assert (record["pred_lat"], record["pred_lon"]) == (single["lat"], single["lon"]), name
        assert record["confidence"] == single["confidence"], name
        assert record["localizable"] == single["localizable"], name
        assert record["method"] == single["method"], name
        gt = truth[record["id"]]
        assert record["error_km"] == haversine_km(gt[0], gt[1], single["lat"], single["lon"])

    split = split_summary([r["error_km"] for r in report["records"]], [r["localizable"] for r in report["records"]])
    assert report["summary"] == json.loads(json.dumps(split.to_dict()))

    # The installed console script gives the same answers, one line per image.
    visloc = Path(sys.executable).with_name("visloc")
    names = sorted(records)[:5]
    proc = subprocess.run(
        [str(visloc), "--target", live_target, "locate", "--json", *(str(images / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for name, line in zip(names, proc.stdout.splitlines(), strict=True):
        out = json.loads(line)
        assert (out["lat"], out["lon"]) == (records[name]["pred_lat"], records[name]["pred_lon"])


def test_info_and_locate_options_live(live_target, dataset, capsys):
    images, _, _ = dataset
    assert main(["--target", live_target, "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bundle_source"] == "demo" and info["num_cells"] > 0
    path = images / "photo00.jpg"
    args = ["--target", live_target, "locate", str(path), "--json", "--neighbours", "3", "--top-cells", "2"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["top_cells"]) == 2 and len(out["prediction_density"]) == len(info["pd_scales_km"])
    # At most the 3 asked for: fewer when the top cell holds fewer background rows (SwC searches it only).
    assert (1 <= len(out["neighbours"]) <= 3) if out["method"] == "swc" else out["neighbours"] == []
    assert main(["--target", live_target, "locate", str(path), "--top-k", "0"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
