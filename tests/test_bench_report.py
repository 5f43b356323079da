"""bench/report.py renders the committed bench.json, and results written before the layouts of
step 1 existed (one session only)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from bench.report import TARGETS, write_report

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
    goal = next(t.goal for t in TARGETS if t.key == "service_vs_seed")
    assert f"so {goal:g}x asks" in text
    assert f"for {100 * goal * seed / best:.0f} % of the model's own throughput" in text


def test_results_from_before_the_layouts_still_render(results, tmp_path):
    old = copy.deepcopy(results)
    for key in ("per_layout", "best_layout"):
        del old["ort"][key]
    old.pop("triton_layout", None)
    write_report(old, tmp_path / "B.md", tmp_path)
    assert "| batch | images/s |" in (tmp_path / "B.md").read_text()


def test_a_missed_fast_decode_target_shows_the_decode_floor(results, tmp_path):
    r = copy.deepcopy(results)
    c = r["photo_mix"]["classes"]["12mp_jpeg"]
    r["photo_mix"]["in_process"] = {
        "12mp_jpeg": {"photos": 4, "exact_ms": 90.0, "fast_ms": 40.0, "decode_eighth_ms": 31.0}
    }
    c["original"]["service_cpu_ms"], c["fast_decode"]["service_cpu_ms"] = 120.0, 66.0  # 0.55: missed
    write_report(r, tmp_path / "B.md", tmp_path)
    text = (tmp_path / "B.md").read_text()
    assert "cost 40.0 ms fast and 90.0 ms exact (0.44x), and a 1/8-scale decode alone 31.0 ms" in text
    assert "0.5x of the service's exact path is 60 ms" in text
    c["fast_decode"]["service_cpu_ms"] = 59.0  # 0.49: met, nothing to explain
    write_report(r, tmp_path / "B.md", tmp_path)
    assert "The fast decode's floor" not in (tmp_path / "B.md").read_text()


def test_the_in_process_decode_times_each_path():
    from bench import photo_mix, photos

    cls = next(c for c in photos.MIX if c.name == "2mp_jpeg")
    got = photo_mix.in_process([photos.encode(cls, seed) for seed in range(2)], passes=1)
    assert got["photos"] == 2
    assert all(got[k] > 0 for k in ("exact_ms", "fast_ms", "decode_eighth_ms"))


def test_a_value_just_short_of_its_goal_never_prints_as_the_goal(results, tmp_path):
    r = copy.deepcopy(results)
    for x in r["paired"]:  # every round 1.998x the research-code-style pipeline: missed, by a hair
        x["seed"]["per_s"] = x["locate"]["per_s"] / 1.998
    write_report(r, tmp_path / "B.md", tmp_path)
    text = (tmp_path / "B.md").read_text()
    assert "| service / research-code-style pipeline (images per second) | 1.998 | >= 2 | **missed** |" in text


def test_every_goal_says_why_and_the_verdict_follows_it(results, tmp_path):
    r = copy.deepcopy(results)
    c = r["photo_mix"]["classes"]["12mp_jpeg"]
    for fast_ms, verdict in ((50.0, "met"), (50.5, "**missed**")):  # against 100 ms exact: 0.5 and 0.505
        c["original"]["service_cpu_ms"], c["fast_decode"]["service_cpu_ms"] = 100.0, fast_ms
        write_report(r, tmp_path / "B.md", tmp_path)
        text = (tmp_path / "B.md").read_text()
        row = next(line for line in text.splitlines() if line.startswith("| 12 MP JPEG: service CPU, fast decode"))
        assert row.endswith(f"| <= 0.5 | {verdict} |"), row
    why = text.split("### Why these goals", 1)[1].split("\n## ", 1)[0]
    for t in TARGETS:
        assert f"- {t.label}, {t.op} {t.goal:.4g}: " in why


def test_the_burst_counts_shed_calls_by_the_services_reason():
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from bench.burst import shed_by_reason
    from swc_service import metrics  # noqa: F401 (registers the service's metrics)

    assert b"# TYPE visloc_admission_shed_total counter" in generate_latest()  # the service's own name
    registry = CollectorRegistry()
    shed = Counter("visloc_admission_shed", "calls shed", ["reason", "caller"], registry=registry)
    shed.labels("memory_budget", "anonymous").inc(3)
    shed.labels("memory_budget", "mapper").inc(2)
    shed.labels("deadline_unmeetable", "anonymous").inc()
    shed.labels("queue_full", "anonymous")  # a child never incremented: no count
    requests = Counter("visloc_requests", "calls", ["reason"], registry=registry)  # another family, same label
    requests.labels("memory_budget").inc(7)
    assert shed_by_reason(generate_latest(registry).decode()) == {"memory_budget": 5, "deadline_unmeetable": 1}


def test_the_burst_table_names_the_reasons_and_older_results_still_render(results, tmp_path):
    r = copy.deepcopy(results)
    b = r["burst"]["with_budget"]
    b["codes"], b["shed"] = {"OK": 23, "RESOURCE_EXHAUSTED": 121}, {"memory_budget": 120, "deadline_unmeetable": 1}
    r["burst"]["without_budget"].pop("shed", None)
    write_report(r, tmp_path / "B.md", tmp_path)
    text = (tmp_path / "B.md").read_text()
    assert "| 23 OK, 121 RESOURCE_EXHAUSTED (deadline_unmeetable 1, memory_budget 120) |" in text
    w = r["burst"]["without_budget"]
    assert f"| {', '.join(f'{n} {c}' for c, n in sorted(w['codes'].items()))} | {w['small_photo_after']} |" in text
