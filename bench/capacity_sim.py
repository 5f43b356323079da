"""What a 10x load spike does to the prod deployment: the measured per-image costs replayed
through the HPAs as shipped (read from the rendered prod overlay) and a simple admission
controller, step by step (docs/capacity.md).

Model, in one tick of ``dt`` seconds (discrete time; every call is an integer count):

* Arrivals: Poisson at the scenario's offered rate (seeded numpy generator: deterministic).
* Admission control: a call is admitted when the calls in flight stay within the bound
  (``max_in_flight_per_pod`` x ready service pods) and its predicted completion (the calls
  ahead of it at the current capacity, plus the base latency) meets its deadline; otherwise it
  is shed at once (RESOURCE_EXHAUSTED/UNAVAILABLE, the caller may retry elsewhere).
* Capacity: min(service pods x CPU cores / CPU seconds per image, Triton pods x images/s per
  pod), ready pods only. A FIFO queue of admitted calls drains at that rate; a call whose
  deadline passes while it waits is dropped (DEADLINE_EXCEEDED: "expired").
* HPAs as Kubernetes computes them every 15 s: desired = ceil(replicas x metric / target) outside
  the 10 % tolerance, pods without a metric (starting) counted as 0 when scaling up, min/max,
  stabilization windows (min of the window's recommendations for scale-up, max for scale-down)
  and the scaling policies (per period, selectPolicy Max), with a metric that lags (metrics
  pipeline: averaged over ``cpu_window_s``/``queue_window_s``, ``metric_delay_s`` old).
* Metrics: swc-service CPU utilisation = images/s x CPU ms per image / requested cores; Triton
  queue time per request = the batcher's 2 ms + an M/D/1 wait at the pod's image rate + the
  backlog / capacity while Triton is the bottleneck.
* New pods are Ready ``*_startup_s`` after the HPA adds them (Triton: minutes, model load and
  warmup on a GPU node that is already there); removed pods leave at once.

Conservation: offered == served + shed + expired (the queue is drained at the end).

    python -m bench.capacity_sim [--out docs/img/capacity-spike.png] [--gpu-images-per-s 500]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH_JSON = ROOT / "bench" / "results" / "bench.json"
HPA_SYNC_S = 15.0  # --horizontal-pod-autoscaler-sync-period (default)
HPA_TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance (default)


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Policy:
    kind: str  # "Pods" | "Percent"
    value: int
    period_s: float


@dataclasses.dataclass(frozen=True)
class Rules:
    window_s: float
    policies: tuple[Policy, ...]
    select: str = "Max"


@dataclasses.dataclass(frozen=True)
class HPA:
    name: str
    min_replicas: int
    max_replicas: int
    target: float  # CPU: utilisation fraction of requests; Triton: queue time in seconds
    up: Rules
    down: Rules


def _rules(behavior: dict, default_window: float) -> Rules:
    policies = tuple(Policy(p["type"], int(p["value"]), float(p["periodSeconds"])) for p in behavior["policies"])
    return Rules(float(behavior.get("stabilizationWindowSeconds", default_window)), policies,
                 behavior.get("selectPolicy", "Max"))  # fmt: skip


def parse_hpa(doc: dict) -> HPA:
    """An autoscaling/v2 HPA as rendered (one metric: CPU utilisation or the Triton queue time)."""
    spec = doc["spec"]
    (metric,) = spec["metrics"]
    if metric["type"] == "Resource":
        target = float(metric["resource"]["target"]["averageUtilization"]) / 100
    else:
        target = float(metric["pods"]["target"]["averageValue"]) / 1e6  # microseconds
    behavior = spec.get("behavior", {})
    return HPA(doc["metadata"]["name"], int(spec.get("minReplicas", 1)), int(spec["maxReplicas"]), target,
               _rules(behavior["scaleUp"], 0), _rules(behavior["scaleDown"], 300))  # fmt: skip


def load_hpas(overlay: str = "prod") -> dict[str, HPA]:
    """The HPAs of a k8s overlay as `kubectl kustomize` renders them."""
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "HorizontalPodAutoscaler"]
    return {d["metadata"]["name"]: parse_hpa(d) for d in docs}


@dataclasses.dataclass(frozen=True)
class Costs:
    service_cpu_ms_per_image: float  # decode, preprocess, gRPC both ways, SwC, PD
    service_cores_per_pod: float  # the pod's CPU request (HPA utilisation is against requests)
    triton_images_per_s_per_pod: float
    triton_source: str  # where that number comes from (measured, or an assumption)


def measured_costs(bench: dict, gpu_images_per_s: float | None, service_cores: float = 2.0) -> Costs:
    """Service CPU ms per image: median over the Locate c16 measurements of bench.json. Triton:
    per GPU pod when given (bench/gpu.sh measures it), else the CPU pod (per core x cores)."""
    rows = [p["locate"] for p in bench["paired"]] + [r for r in bench["locate"] if r["concurrency"] == 16]
    service_ms = statistics.median(r["cpu_ms_per_image"]["service"] for r in rows)
    if gpu_images_per_s:
        return Costs(service_ms, service_cores, gpu_images_per_s, f"GPU pod: {gpu_images_per_s:g} images/s (given)")
    triton_ms = statistics.median(r["cpu_ms_per_image"]["triton"] for r in bench["triton"])
    per_pod = 4 * 1000 / triton_ms  # the base Triton pod requests 4 cores
    return Costs(service_ms, service_cores, per_pod, f"CPU pod (4 cores at {triton_ms:.0f} ms/image, measured)")


PHOTO_PATHS = ("original", "fast_decode", "caller_pixels")  # bench/photo_mix.py


def photo_mix_costs(bench: dict, path: str, base: Costs) -> Costs | None:
    """``base`` with the service's CPU per image of the photo mix (phone originals mostly) on
    ``path``, as ``make bench`` measured it (step 8); None when that step has not run."""
    mix = bench.get("photo_mix")
    if not mix:
        return None
    return dataclasses.replace(base, service_cpu_ms_per_image=mix["mix"][path]["service_cpu_ms"])


@dataclasses.dataclass(frozen=True)
class Scenario:
    base_per_s: float
    spike_factor: float = 10.0
    before_s: float = 120.0
    spike_s: float = 1200.0
    after_s: float = 900.0
    deadline_s: float = 10.0
    base_latency_s: float = 0.15  # one call through an idle stack (GPU batch + service work)
    max_in_flight_per_pod: int = 2048  # VISLOC_MAX_CONCURRENT_RPCS (1024) x 2 workers
    service_startup_s: float = 20.0
    triton_startup_s: float = 180.0
    metric_delay_s: float = 15.0
    cpu_window_s: float = 30.0
    queue_window_s: float = 60.0
    dt: float = 0.1
    seed: int = 0
    triton_pod_lost_at_s: float | None = None  # a Triton pod dies then (its replacement starts)

    def rate(self, t: float) -> float:
        spiking = self.before_s <= t < self.before_s + self.spike_s
        return self.base_per_s * (self.spike_factor if spiking else 1.0)

    @property
    def duration_s(self) -> float:
        return self.before_s + self.spike_s + self.after_s


# --------------------------------------------------------------------------- the autoscaler


class Autoscaler:
    """One HPA's replica decisions (Kubernetes' normalizeDesiredReplicasWithBehaviors)."""

    def __init__(self, hpa: HPA, replicas: int, now: float = 0.0):
        self.hpa = hpa
        self.replicas = replicas
        # In a steady state before ``now``: its recommendation was the current count.
        self.recommendations: deque[tuple[float, int]] = deque([(now, replicas)])
        self.events: deque[tuple[float, int]] = deque()  # (time, replica change)

    def desired(self, ratio: float) -> int:
        """Raw recommendation from the metric / target ratio (with the tolerance)."""
        if abs(ratio - 1.0) <= HPA_TOLERANCE:
            return self.replicas
        return math.ceil(ratio * self.replicas)

    def _limit(self, now: float, rules: Rules, up: bool) -> int:
        limits = []
        for p in rules.policies:
            changed = sum(d for t, d in self.events if t > now - p.period_s and (d > 0) == up)
            start = self.replicas - changed
            if up:
                limits.append(start + p.value if p.kind == "Pods" else math.ceil(start * (1 + p.value / 100)))
            else:
                limits.append(start - p.value if p.kind == "Pods" else int(start * (1 - p.value / 100)))
        if rules.select == "Disabled":
            return self.replicas
        most = max if up else min  # "Max": the policy that allows the largest change
        return (most if rules.select == "Max" else (min if up else max))(limits)

    def step(self, now: float, ratio: float) -> int:
        hpa = self.hpa
        rec = self.desired(ratio)
        self.recommendations.append((now, rec))
        horizon = max(hpa.up.window_s, hpa.down.window_s)
        while self.recommendations and self.recommendations[0][0] < now - horizon:
            self.recommendations.popleft()
        up_rec = min([r for t, r in self.recommendations if t >= now - hpa.up.window_s] + [rec])
        down_rec = max([r for t, r in self.recommendations if t >= now - hpa.down.window_s] + [rec])
        new = self.replicas
        new = max(new, up_rec)
        new = min(new, down_rec)
        if new > self.replicas:
            new = min(new, self._limit(now, hpa.up, True), hpa.max_replicas)
        elif new < self.replicas:
            new = max(new, self._limit(now, hpa.down, False), hpa.min_replicas)
        new = min(max(new, hpa.min_replicas), hpa.max_replicas)
        if new != self.replicas:
            self.events.append((now, new - self.replicas))
        while self.events and self.events[0][0] < now - 3600:
            self.events.popleft()
        self.replicas = new
        return new


class Pods:
    """Replicas of one Deployment: ready ones and ones starting (ready at a known time)."""

    def __init__(self, ready: int, startup_s: float):
        self.ready = ready
        self.starting: list[float] = []
        self.startup_s = startup_s

    def scale_to(self, now: float, replicas: int) -> None:
        total = self.ready + len(self.starting)
        if replicas > total:
            self.starting += [now + self.startup_s] * (replicas - total)
        while replicas < self.ready + len(self.starting):  # starting pods go first, then ready ones
            if self.starting:
                self.starting.pop()
            else:
                self.ready -= 1

    def tick(self, now: float) -> None:
        done = [t for t in self.starting if t <= now]
        self.ready += len(done)
        self.starting = [t for t in self.starting if t > now]


# --------------------------------------------------------------------------- the simulation


@dataclasses.dataclass
class Result:
    time: np.ndarray
    series: dict[str, np.ndarray]
    totals: dict[str, int]

    def summary(self, scenario: Scenario) -> dict[str, float]:
        s, t = self.series, self.time
        spike = (t >= scenario.before_s) & (t < scenario.before_s + scenario.spike_s)
        short = np.nonzero(spike & (s["capacity"] < s["offered"]))[0]
        enough = scenario.before_s + (len(short) and (t[short[-1]] - scenario.before_s + scenario.dt))
        offered = self.totals["offered"]
        return {
            "offered": offered,
            "served_pct": 100 * self.totals["served"] / offered,
            "shed_pct": 100 * self.totals["shed"] / offered,
            "expired_pct": 100 * self.totals["expired"] / offered,
            "spike_goodput_pct": 100 * s["goodput"][spike].sum() / max(1e-9, s["offered"][spike].sum()),
            "time_to_capacity_s": enough - scenario.before_s,
            "peak_queue": int(s["queue"].max()),
            "max_wait_s": float((s["queue"] / np.maximum(s["capacity"], 1e-9)).max()),
            "max_service_pods": int(s["service_pods"].max()),
            "max_triton_pods": int(s["triton_pods"].max()),
        }


def steady_replicas(hpa: HPA, load: float) -> int:
    """Replicas the HPA settles on for a load expressed in pods-at-target."""
    return min(hpa.max_replicas, max(hpa.min_replicas, math.ceil(load)))


def simulate(scenario: Scenario, costs: Costs, service_hpa: HPA, triton_hpa: HPA) -> Result:
    sc, dt = scenario, scenario.dt
    rng = np.random.default_rng(sc.seed)
    per_service_pod = costs.service_cores_per_pod * 1000 / costs.service_cpu_ms_per_image
    per_triton_pod = costs.triton_images_per_s_per_pod
    # Start in the steady state of the base load: each HPA at its target (or its minimum).
    svc_load = sc.base_per_s / (per_service_pod * service_hpa.target)
    tri_load = sc.base_per_s / (per_triton_pod * steady_utilisation(per_triton_pod, triton_hpa.target))
    svc_as = Autoscaler(service_hpa, steady_replicas(service_hpa, svc_load))
    tri_as = Autoscaler(triton_hpa, steady_replicas(triton_hpa, tri_load))
    svc, tri = Pods(svc_as.replicas, sc.service_startup_s), Pods(tri_as.replicas, sc.triton_startup_s)

    n = int(round(sc.duration_s / dt))
    names = ("offered", "capacity", "goodput", "shed", "expired", "queue", "service_pods", "service_ready",
             "triton_pods", "triton_ready", "cpu_util", "queue_time_ms")  # fmt: skip
    s = {k: np.zeros(n) for k in names}
    queue: deque[list[float]] = deque()  # [deadline, count] cohorts, FIFO (deadlines increase)
    queued = 0
    totals = dict.fromkeys(("offered", "served", "shed", "expired"), 0)
    budget = 0.0  # fractional service capacity carried to the next tick
    next_sync = HPA_SYNC_S
    lost_tick = -1 if sc.triton_pod_lost_at_s is None else round(sc.triton_pod_lost_at_s / dt)
    i = 0
    while i < n or queued:  # after the scenario: no arrivals, drain the queue
        now = i * dt
        if i == lost_tick and tri.ready:
            tri.ready -= 1  # the ReplicaSet starts a replacement at once
            tri.starting.append(now + sc.triton_startup_s)
        svc.tick(now)
        tri.tick(now)
        svc_cap, tri_cap = svc.ready * per_service_pod, tri.ready * per_triton_pod
        capacity = min(svc_cap, tri_cap)
        # Expire: admitted calls that can no longer finish within their deadline.
        expired = 0
        while queue and queue[0][0] < now + sc.base_latency_s:
            expired += int(queue.popleft()[1])
        queued -= expired
        # Arrivals and admission (bounded in flight; predicted completion within the deadline).
        arrivals = int(rng.poisson(sc.rate(now) * dt)) if i < n else 0
        room = max(0, svc.ready * sc.max_in_flight_per_pod - queued)
        in_time = max(0, math.floor((sc.deadline_s - sc.base_latency_s) * capacity - queued))
        admitted = min(arrivals, room, in_time)
        if admitted:
            queue.append([now + sc.deadline_s, admitted])
            queued += admitted
        shed = arrivals - admitted
        # Serve in FIFO order at this tick's capacity.
        budget += capacity * dt
        served = 0
        while queue and budget >= 1:
            take = min(int(budget), int(queue[0][1]))
            queue[0][1] -= take
            budget -= take
            served += take
            if queue[0][1] == 0:
                queue.popleft()
        if not queue:
            budget = min(budget, 1.0)  # idle capacity is not saved up
        queued -= served
        for k, v in (("offered", arrivals), ("served", served), ("shed", shed), ("expired", expired)):
            totals[k] += v
        if i >= n:
            i += 1
            continue
        # Metrics the HPAs will read (per pod, ready pods).
        util = served / dt * costs.service_cpu_ms_per_image / 1000 / max(1, svc.ready) / costs.service_cores_per_pod
        rho = min(0.99, served / dt / tri_cap) if tri_cap else 0.99
        wait = 0.002 + rho / (2 * per_triton_pod * (1 - rho))
        if queued and tri_cap <= svc_cap:
            wait += queued / tri_cap
        for k, v in (("offered", arrivals / dt), ("capacity", capacity), ("goodput", served / dt), ("shed", shed / dt),
                     ("expired", expired / dt), ("queue", queued), ("service_pods", svc_as.replicas),
                     ("service_ready", svc.ready), ("triton_pods", tri_as.replicas), ("triton_ready", tri.ready),
                     ("cpu_util", util), ("queue_time_ms", wait * 1000)):  # fmt: skip
            s[k][i] = v
        if now >= next_sync:
            next_sync += HPA_SYNC_S
            for scaler, pods, key, window in ((svc_as, svc, "cpu_util", sc.cpu_window_s),
                                              (tri_as, tri, "queue_time_ms", sc.queue_window_s)):  # fmt: skip
                lo = max(0, i - int((sc.metric_delay_s + window) / dt))
                hi = max(lo + 1, i - int(sc.metric_delay_s / dt))
                value = float(s[key][lo:hi].mean()) / (1000 if key == "queue_time_ms" else 1)
                ratio = value / scaler.hpa.target
                if ratio > 1 and scaler.replicas > pods.ready:  # starting pods have no metric: 0
                    ratio *= pods.ready / scaler.replicas
                pods.scale_to(now, scaler.step(now, ratio))
        i += 1
    return Result(np.arange(n) * dt, s, totals)


def steady_utilisation(per_pod_per_s: float, target_s: float) -> float:
    """The Triton load per pod (fraction of its rate) at which the modelled queue time per
    request (2 ms batcher + M/D/1 wait) reaches the HPA's target: where the HPA settles."""
    k = 2 * per_pod_per_s * (target_s - 0.002)  # rho / (1 - rho) = k
    return k / (1 + k) if k > 0 else 0.0


def sizing(costs: Costs, hpas: dict[str, HPA], per_s: float = 1000.0) -> dict[str, float]:
    """Pods per ``per_s`` images/s: flat out, and where the HPAs settle (their targets)."""
    service_full = per_s * costs.service_cpu_ms_per_image / 1000 / costs.service_cores_per_pod
    triton_full = per_s / costs.triton_images_per_s_per_pod
    rho = steady_utilisation(costs.triton_images_per_s_per_pod, hpas["triton"].target)
    return {
        "service_pods_at_100pct": service_full,
        "service_pods_at_hpa_target": service_full / hpas["swc-service"].target,
        "triton_pods_at_100pct": triton_full,
        "triton_utilisation_at_hpa_target": rho,
        "triton_pods_at_hpa_target": triton_full / rho if rho else math.inf,
    }


# --------------------------------------------------------------------------- output


def plot(results: dict[str, Result], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(results), figsize=(6.5 * len(results), 8.5), sharex=True, squeeze=False)
    for col, (label, r) in enumerate(results.items()):
        t = r.time / 60
        smooth = lambda x: np.convolve(x, np.ones(50) / 50, mode="same")  # noqa: E731 - 5 s mean
        ax = axes[0][col]
        ax.plot(t, smooth(r.series["offered"]), label="offered", color="0.5")
        ax.plot(t, r.series["capacity"], label="capacity", color="C0")
        ax.plot(t, smooth(r.series["goodput"]), label="goodput (served in time)", color="C2")
        ax.set_ylabel("images/s")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        ax = axes[1][col]
        ax.plot(t, r.series["queue"], label="admitted, waiting", color="C1")
        ax.plot(t, smooth(r.series["shed"]), label="shed /s", color="C3")
        ax.plot(t, smooth(r.series["expired"]), label="expired /s", color="C4")
        ax.set_ylabel("calls")
        ax.legend(fontsize=8, loc="upper right")
        ax = axes[2][col]
        for key, color in (("service", "C0"), ("triton", "C5")):
            ax.step(t, r.series[f"{key}_pods"], where="post", color=color, ls="--", label=f"{key} desired")
            ax.step(t, r.series[f"{key}_ready"], where="post", color=color, label=f"{key} ready")
        ax.set_ylabel("pods")
        ax.set_xlabel("minutes")
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def faster_triton_scale_up(hpa: HPA) -> HPA:
    """An alternative to compare with: Triton adds up to 4 pods per minute, no up-window."""
    return dataclasses.replace(hpa, up=Rules(0.0, (Policy("Pods", 4, 60.0),)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--gpu-images-per-s",
        type=float,
        default=500.0,
        help="Triton images/s per GPU pod (NOT measured yet: bench/gpu.sh); 0: the measured CPU pod",
    )
    ap.add_argument("--base-per-s", type=float, default=300.0, help="load before and after the spike")
    ap.add_argument(
        "--photos",
        choices=(*PHOTO_PATHS, "small"),
        default="original",
        help="what the service is priced on: the photo mix sent as files (original), to --fast-decode "
        "services, or preprocessed by the callers (caller_pixels); small: 400 x 300 photos",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "capacity-spike.png")
    ap.add_argument("--json", type=Path, default=None, help="write the summaries here")
    args = ap.parse_args(argv)  # fmt: skip
    bench = json.loads(BENCH_JSON.read_text())
    small = measured_costs(bench, args.gpu_images_per_s or None)
    # Production traffic is the photo mix (phone originals mostly): the spike is priced on it
    # when measured, sent as --photos says.
    costs = small if args.photos == "small" else photo_mix_costs(bench, args.photos, small) or small
    hpas = load_hpas("prod")
    scenario = Scenario(base_per_s=args.base_per_s)
    variants = {
        "HPAs as shipped": hpas["triton"],
        "Triton scale-up 4 pods/60 s, no window": faster_triton_scale_up(hpas["triton"]),
    }
    print(f"service {costs.service_cpu_ms_per_image:.2f} CPU ms/image x {costs.service_cores_per_pod:g} cores/pod; "
          f"Triton {costs.triton_images_per_s_per_pod:g} images/s/pod ({costs.triton_source})")  # fmt: skip
    cpu_costs = measured_costs(bench, None)
    per_1000 = {"gpu": sizing(costs, hpas), "cpu": sizing(cpu_costs, hpas), "small_photos": sizing(small, hpas)}
    for path in PHOTO_PATHS:
        mixed = photo_mix_costs(bench, path, small)
        if mixed is not None:
            per_1000[f"photo_mix_{path}"] = sizing(mixed, hpas) | {"service_cpu_ms": mixed.service_cpu_ms_per_image}
    for kind, row in per_1000.items():
        print(f"per 1000 images/s ({kind} Triton):", json.dumps({k: round(v, 2) for k, v in row.items()}))
    results, summaries = {}, {}
    for label, triton_hpa in variants.items():
        results[label] = simulate(scenario, costs, hpas["swc-service"], triton_hpa)
        summaries[label] = results[label].summary(scenario)
        print(label, json.dumps({k: round(v, 1) for k, v in summaries[label].items()}))
    plot(results, args.out)
    if args.json:
        args.json.write_text(json.dumps({"costs": dataclasses.asdict(costs), "cpu_costs": dataclasses.asdict(cpu_costs),
                                         "small_photo_costs": dataclasses.asdict(small),
                                         "scenario": dataclasses.asdict(scenario),
                                         "summaries": summaries, "per_1000": per_1000}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
