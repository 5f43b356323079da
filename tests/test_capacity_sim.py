"""bench/capacity_sim.py: the HPA model follows the shipped manifests' rules, and a small spike
scenario conserves calls (served + shed + expired == offered) and is deterministic."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench import capacity_sim as sim


@pytest.fixture(scope="module")
def hpas() -> dict[str, sim.HPA]:
    return sim.load_hpas("prod")  # the rendered prod overlay, as shipped


def test_hpas_are_read_from_the_rendered_overlay(hpas):
    svc, tri = hpas["swc-service"], hpas["triton"]
    assert (svc.min_replicas, svc.max_replicas, svc.target) == (3, 30, 0.7)
    assert (tri.min_replicas, tri.max_replicas, tri.target) == (2, 8, 0.02)  # 20000 us
    assert tri.up == sim.Rules(60.0, (sim.Policy("Pods", 1, 120.0),))
    assert tri.down.window_s == 900.0


def test_triton_scale_up_is_limited_by_its_policy_and_window(hpas):
    """A sustained 10x queue-time ratio from t=15 s: nothing while the 60 s up-window still holds
    the steady state's recommendation (the minimum counts), then one pod per 120 s."""
    scaler = sim.Autoscaler(hpas["triton"], 2)
    seen = {}
    for k in range(0, 601, 15):
        seen[k] = scaler.step(float(k), 10.0 if k else 1.0)
    assert seen[60] == 2  # the window still holds the t=0 recommendation (2)
    assert seen[75] == 3  # a pod per period ...
    assert seen[180] == 3 and seen[195] == 4  # ... the next one a period later
    assert max(seen.values()) <= hpas["triton"].max_replicas


def test_scale_down_waits_for_the_window_and_then_steps(hpas):
    scaler = sim.Autoscaler(hpas["swc-service"], 20)
    counts = [scaler.step(float(k), 0.1) for k in range(0, 601, 15)]
    assert counts[:21] == [20] * 21  # 300 s window: the max of its recommendations
    assert counts[21:25] == [15] * 4 and counts[25] == 11  # then 25 % per 60 s
    assert min(counts) >= hpas["swc-service"].min_replicas
    within = sim.Autoscaler(hpas["swc-service"], 10)
    assert within.step(0.0, 1.05) == 10  # the 10 % tolerance


def test_small_spike_conserves_calls_and_is_deterministic(hpas):
    bench = json.loads(sim.BENCH_JSON.read_text())
    costs = sim.measured_costs(bench, 100.0)
    assert costs.service_cpu_ms_per_image > 0
    scenario = sim.Scenario(base_per_s=60.0, before_s=30.0, spike_s=240.0, after_s=30.0, deadline_s=2.0)
    result = sim.simulate(scenario, costs, hpas["swc-service"], hpas["triton"])
    t = result.totals
    assert t["offered"] == t["served"] + t["shed"] + t["expired"]
    assert t["offered"] > 0 and t["shed"] > 0  # 600/s against 2 x 100/s of Triton at first: shed
    assert result.series["triton_pods"].max() > hpas["triton"].min_replicas  # the HPA reacted
    assert result.series["goodput"].sum() * scenario.dt == pytest.approx(t["served"], rel=0.02)
    summary = result.summary(scenario)
    assert summary["served_pct"] + summary["shed_pct"] + summary["expired_pct"] == pytest.approx(100)
    again = sim.simulate(scenario, costs, hpas["swc-service"], hpas["triton"])
    assert again.totals == t
    other = sim.simulate(dataclasses.replace(scenario, seed=1), costs, hpas["swc-service"], hpas["triton"])
    assert other.totals != t


def test_a_lost_triton_pod_expires_admitted_calls(hpas):
    """Admission predicts completion at the capacity of the moment; a Triton pod lost while the
    queue is full (two pods at 100/s each, Triton's HPA held at 2, 300/s offered) leaves
    admitted calls that can no longer finish in time: they expire, and are counted."""
    costs = sim.Costs(5.0, 2.0, 100.0, "test")
    held = dataclasses.replace(hpas["triton"], min_replicas=2, max_replicas=2)
    scenario = sim.Scenario(base_per_s=300.0, before_s=0.0, spike_s=60.0, after_s=0.0, spike_factor=1.0,
                            deadline_s=5.0)  # fmt: skip
    steady = sim.simulate(scenario, costs, hpas["swc-service"], held)
    lost = sim.simulate(dataclasses.replace(scenario, triton_pod_lost_at_s=30.0), costs, hpas["swc-service"], held)
    assert steady.totals["expired"] == 0 and steady.totals["shed"] > 0  # 300/s against 200/s: shed
    assert lost.totals["expired"] > 0 and lost.totals["served"] < steady.totals["served"]
    for t in (steady.totals, lost.totals):
        assert t["offered"] == t["served"] + t["shed"] + t["expired"]


def test_the_photo_mix_prices_the_service_by_path(hpas):
    base = sim.Costs(5.0, 2.0, 500.0, "test")
    assert sim.photo_mix_costs({}, "original", base) is None  # step 8 not run: the small photos stand
    mix = {"mix": {p: {"service_cpu_ms": ms, "bytes": 1.0} for p, ms in zip(sim.PHOTO_PATHS, (60.0, 30.0, 3.0))}}
    priced = {p: sim.photo_mix_costs({"photo_mix": mix}, p, base) for p in sim.PHOTO_PATHS}
    assert [c.service_cpu_ms_per_image for c in priced.values()] == [60.0, 30.0, 3.0]
    pods = {p: sim.sizing(c, hpas)["service_pods_at_100pct"] for p, c in priced.items()}
    assert pods["original"] == pytest.approx(1000 * 0.060 / 2.0)  # 1,000 images/s x 60 ms / 2 cores
    assert pods["original"] > pods["fast_decode"] > pods["caller_pixels"]
    assert sim.sizing(priced["original"], hpas)["triton_pods_at_100pct"] == pytest.approx(2.0)  # Triton: the same
