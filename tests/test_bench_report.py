"""bench/report.py renders the committed bench.json, and results written before the layouts of
step 1 existed (one session only)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from bench.report import write_report

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "bench.json"


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads(RESULTS.read_text())


def test_the_ceiling_is_the_best_layout_and_bounds_the_service_ratio(results, tmp_path):
    write_report(results, tmp_path / "B.md", tmp_path)
    text = (tmp_path / "B.md").read_text()
    ort = results["ort"]
    best = max(v for layouts in ort["per_layout"].values() for v in layouts.values())
    assert ort["best_per_s"] == best
    assert "| batch | one session, 2 threads | 2 one-thread sessions side by side |" in text
    seed = results["seed"]["per_s"]
    assert f"{best / seed:.2f}x the research-code-style pipeline" in text
    assert f"for {100 * 2.5 * seed / best:.0f} % of the model's own throughput" in text


def test_results_from_before_the_layouts_still_render(results, tmp_path):
    old = copy.deepcopy(results)
    for key in ("per_layout", "best_layout"):
        del old["ort"][key]
    old.pop("triton_layout", None)
    write_report(old, tmp_path / "B.md", tmp_path)
    assert "| batch | images/s |" in (tmp_path / "B.md").read_text()
