"""The evaluation arithmetic of the reference ``evaluation.py``, in plain ``math``.

Per image: the great-circle error (haversine, R = 6371 km, the reference's formula). Per set:
``Acc@r = mean(error < r)`` (strict) for each radius and the median error, for all images and
for the localizable / non-localizable split. Kept free of I/O so it is tested on its own.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

EARTH_RADIUS_KM = 6371.0
RADII_KM: tuple[float, ...] = (0.1, 1.0, 25.0, 200.0, 750.0, 2500.0)


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km between two (lat, lon) points in degrees."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlam = math.radians(lon2) - math.radians(lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlam / 2) ** 2
    return 2 * math.asin(math.sqrt(min(1.0, a))) * EARTH_RADIUS_KM


def median(values: Sequence[float]) -> float | None:
    """The median as numpy computes it (mean of the middle two for an even count); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def accuracy(errors: Sequence[float], radius_km: float) -> float | None:
    """Fraction of errors strictly below ``radius_km`` (None for an empty set)."""
    if not errors:
        return None
    return sum(1 for e in errors if e < radius_km) / len(errors)


def radius_label(radius_km: float) -> str:
    """The reference's labels: 0.1 -> "100m", 25 -> "25km"."""
    return f"{int(radius_km)}km" if radius_km >= 1 else f"{int(radius_km * 1000)}m"


@dataclass(frozen=True)
class Summary:
    count: int
    accuracy: tuple[tuple[float, float | None], ...]  # (radius_km, fraction) per radius
    median_km: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "accuracy": {f"{r:g}": a for r, a in self.accuracy},
            "median_km": self.median_km,
        }


def summarize(errors: Sequence[float], radii: Iterable[float] = RADII_KM) -> Summary:
    return Summary(len(errors), tuple((r, accuracy(errors, r)) for r in radii), median(errors))


@dataclass(frozen=True)
class Split:
    """The three tables the reference prints."""

    all: Summary
    localizable: Summary
    non_localizable: Summary

    def to_dict(self) -> dict[str, Any]:
        return {
            "all": self.all.to_dict(),
            "localizable": self.localizable.to_dict(),
            "non_localizable": self.non_localizable.to_dict(),
        }


def split_summary(errors: Sequence[float], localizable: Sequence[bool], radii: Iterable[float] = RADII_KM) -> Split:
    """Summaries for all images and for the localizable / non-localizable subsets."""
    if len(errors) != len(localizable):
        raise ValueError("errors and localizable differ in length")
    radii = tuple(radii)
    loc = [e for e, ok in zip(errors, localizable) if ok]
    non = [e for e, ok in zip(errors, localizable) if not ok]
    return Split(summarize(errors, radii), summarize(loc, radii), summarize(non, radii))


def format_summary(summary: Summary) -> list[str]:
    """One table in the reference's format: ``Acc@1km:\\t12.5%`` lines, then the median."""
    lines = []
    for r, acc in summary.accuracy:
        value = "-" if acc is None else f"{acc * 100:.1f}%"
        lines.append(f"Acc@{radius_label(r)}:\t{value}")
    med = "-" if summary.median_km is None else f"{summary.median_km:.1f}km"
    lines.append(f"Median Error: {med}")
    return lines


def format_split(split: Split) -> str:
    """All three tables with counts, laid out like the reference's output."""
    total = split.all.count

    def share(n: int) -> str:
        return f"{n / total * 100:.1f}%" if total else "-"

    lines = ["Geolocation results", "=" * 20, f"Total predictions: {total}", "-" * 20]
    lines += format_summary(split.all)
    n = split.localizable.count
    lines += ["", f"Localizable images: {n} ({share(n)})", "-" * 20]
    lines += format_summary(split.localizable)
    n = split.non_localizable.count
    lines += ["", f"Non-localizable images: {n} ({share(n)})", "-" * 20]
    lines += format_summary(split.non_localizable)
    return "\n".join(lines)


def cumulative_accuracy(errors: Sequence[float], radii: Sequence[float]) -> list[float]:
    """Acc@r for every r in ``radii`` (for plots); an empty set gives zeros."""
    if not errors:
        return [0.0 for _ in radii]
    ordered = sorted(errors)
    return [bisect.bisect_left(ordered, r) / len(ordered) for r in radii]


# --- selective prediction: risk and coverage ---------------------------------------------------

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LEVEL = 0.95


def parse_goal(text: str) -> tuple[float, float]:
    """``"0.7@25"`` -> (0.7, 25.0): an Acc@r (a fraction in (0, 1]) at a radius in km."""
    acc_text, sep, radius_text = text.partition("@")
    try:
        acc, radius = float(acc_text), float(radius_text)
    except ValueError:
        raise ValueError(f"target {text!r}: expected ACCURACY@KM such as 0.7@25") from None
    if not sep or not (0 < acc <= 1) or not (radius > 0 and math.isfinite(radius)):
        raise ValueError(f"target {text!r}: accuracy must be in (0, 1] and the radius > 0 km, as in 0.7@25")
    return acc, radius


@dataclass(frozen=True)
class RiskPoint:
    """Keep the photos whose confidence is > ``threshold`` (the service's localizable rule)."""

    threshold: float
    kept: int
    coverage: float
    accuracy: tuple[tuple[float, float], ...]  # (radius_km, Acc@r of the kept photos)

    def acc(self, radius_km: float) -> float:
        return dict(self.accuracy)[radius_km]

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "kept": self.kept,
            "coverage": self.coverage,
            "accuracy": {f"{r:g}": a for r, a in self.accuracy},
        }


def risk_coverage(errors: Sequence[float], confidences: Sequence[float], radii: Iterable[float]) -> list[RiskPoint]:
    """The risk-coverage curve: one point per distinct threshold, rising threshold, falling coverage.

    A threshold ``t`` keeps ``confidence > t``. Candidates are the confidences themselves (each
    keeps the photos strictly above it) and 0 (keeps all, when no confidence is 0); thresholds
    stay in [0, 1] like the service's ``conf_threshold``. O(n log n + n * radii).
    """
    if len(errors) != len(confidences):
        raise ValueError("errors and confidences differ in length")
    radii = tuple(radii)
    n = len(errors)
    pairs = sorted(zip(confidences, errors), key=lambda p: -p[0])
    hits = [0] * len(radii)
    points: list[RiskPoint] = []
    i = 0
    while i < n:
        value = pairs[i][0]
        while i < n and pairs[i][0] == value:  # a group of equal confidence enters together
            for k, r in enumerate(radii):
                hits[k] += pairs[i][1] < r
            i += 1
        threshold = pairs[i][0] if i < n else 0.0
        if i == n and value <= 0.0:
            break  # confidence-0 photos can only be kept by a threshold below 0
        acc = tuple((r, hits[k] / i) for k, r in enumerate(radii))
        points.append(RiskPoint(threshold, i, i / n, acc))
    points.reverse()
    return points


def lowest_threshold(points: Sequence[RiskPoint], accuracy_goal: float, radius_km: float) -> RiskPoint | None:
    """The point with the lowest threshold whose kept photos reach ``Acc@radius >= goal``."""
    for p in points:  # rising thresholds
        if p.acc(radius_km) >= accuracy_goal:
            return p
    return None


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an ascending list."""
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def target_threshold(
    errors: Sequence[float],
    confidences: Sequence[float],
    accuracy_goal: float,
    radius_km: float,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
) -> dict[str, Any]:
    """The lowest threshold reaching the goal, its coverage, and percentile-bootstrap intervals.

    The photos are resampled with replacement ``resamples`` times (seeded, so a report is
    reproducible); each resample gives its own lowest threshold and coverage, and the Acc@r
    that the chosen threshold keeps on it. ``reached_share`` is the share of resamples in which
    the goal is reachable at all.
    """
    import random

    points = risk_coverage(errors, confidences, (radius_km,))
    best = lowest_threshold(points, accuracy_goal, radius_km)
    out: dict[str, Any] = {
        "accuracy": accuracy_goal,
        "radius_km": radius_km,
        "reached": best is not None,
        "threshold": best.threshold if best else None,
        "coverage": best.coverage if best else None,
        "kept": best.kept if best else 0,
        "accuracy_at_threshold": best.acc(radius_km) if best else None,
        "bootstrap": {"resamples": resamples, "level": level, "seed": seed},
    }
    if best is None or resamples < 1:
        return out
    rng = random.Random(seed)
    n = len(errors)
    thresholds, coverages, accuracies = [], [], []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        e = [errors[i] for i in idx]
        c = [confidences[i] for i in idx]
        found = lowest_threshold(risk_coverage(e, c, (radius_km,)), accuracy_goal, radius_km)
        if found is not None:
            thresholds.append(found.threshold)
            coverages.append(found.coverage)
        kept = [err for err, conf in zip(e, c) if conf > best.threshold]
        if kept:
            accuracies.append(sum(err < radius_km for err in kept) / len(kept))
    tail = (1 - level) / 2

    def interval(values: list[float]) -> list[float] | None:
        if not values:
            return None
        values.sort()
        return [_percentile(values, tail), _percentile(values, 1 - tail)]

    out["bootstrap"] |= {
        "reached_share": len(thresholds) / resamples,
        "threshold_interval": interval(thresholds),
        "coverage_interval": interval(coverages),
        "accuracy_interval": interval(accuracies),
    }
    return out


def format_target(scale_km: float, result: dict[str, Any]) -> str:
    """One line for the console, per PD scale."""
    goal = f"Acc@{radius_label(result['radius_km'])} >= {result['accuracy'] * 100:.1f}%"
    if not result["reached"]:
        return f"PD scale {scale_km:g} km: {goal} is not reached at any threshold on these photos"
    boot = result["bootstrap"]

    def iv(key: str, pct: bool) -> str:
        v = boot.get(key)
        if not v:
            return "-"
        return f"[{v[0] * 100:.1f}%, {v[1] * 100:.1f}%]" if pct else f"[{v[0]:.4g}, {v[1]:.4g}]"

    level = f"{boot['level'] * 100:g}%"
    return (
        f"PD scale {scale_km:g} km: {goal} at threshold {result['threshold']:.4g} "
        f"({level} CI {iv('threshold_interval', False)}), coverage {result['coverage'] * 100:.1f}% "
        f"({level} CI {iv('coverage_interval', True)}), kept Acc {result['accuracy_at_threshold'] * 100:.1f}% "
        f"({level} CI {iv('accuracy_interval', True)}; reached in {boot['reached_share'] * 100:.0f}% of resamples)"
    )


# --- claims: true against false, per scale ------------------------------------------------------

CLAIM_DISTANCES_KM: tuple[float, ...] = (25.0, 200.0, 750.0)
CLAIM_FAR = 0.05  # the false-accept rate the true-accept rate is read at


def false_claims(
    points: Sequence[tuple[float, float]], distances: Sequence[float] = CLAIM_DISTANCES_KM, seed: int = 0
) -> list[dict[float, int | None]]:
    """For each photo and each distance D, another photo of the set at least D km away (its
    index; None when none is that far), drawn uniformly and seeded: that photo's coordinates
    are the false claim. Drawn by rejection (a few tries on any real set), then a full scan."""
    import random

    rng = random.Random(seed)
    n = len(points)
    out: list[dict[float, int | None]] = []
    for i, (lat, lon) in enumerate(points):
        picks: dict[float, int | None] = {}
        for d in distances:
            pick = None
            for _ in range(64):
                j = rng.randrange(n)
                if j != i and haversine_km(lat, lon, *points[j]) >= d:
                    pick = j
                    break
            if pick is None:
                far = [j for j in range(n) if j != i and haversine_km(lat, lon, *points[j]) >= d]
                pick = rng.choice(far) if far else None
            picks[d] = pick
        out.append(picks)
    return out


def roc_auc(true: Sequence[float], false: Sequence[float]) -> float | None:
    """P(a true claim's mass > a false claim's), ties counting half (Mann-Whitney); None if either is empty."""
    if not true or not false:
        return None
    ordered = sorted(false)
    wins = 0.0
    for t in true:
        below = bisect.bisect_left(ordered, t)
        wins += below + (bisect.bisect_right(ordered, t) - below) / 2
    return wins / (len(true) * len(false))


def roc_curve(true: Sequence[float], false: Sequence[float]) -> list[tuple[float, float]]:
    """(false-accept rate, true-accept rate) accepting ``mass >= t`` for every t in the scores,
    from the strictest to the loosest, starting at (0, 0)."""
    thresholds = sorted(set(true) | set(false), reverse=True)
    st, sf = sorted(true), sorted(false)
    points = [(0.0, 0.0)]
    for t in thresholds:
        points.append(
            ((len(sf) - bisect.bisect_left(sf, t)) / len(sf), (len(st) - bisect.bisect_left(st, t)) / len(st))
        )
    return points


def accept_threshold(true: Sequence[float], false: Sequence[float], far: float) -> tuple[float, float, float] | None:
    """The loosest threshold t (accept ``mass >= t``) whose false-accept rate is <= ``far``:
    (t, true-accept rate, false-accept rate); None if no threshold keeps the false-accept rate."""
    st, sf = sorted(true), sorted(false)
    best = None
    for t in sorted(set(true) | set(false), reverse=True):
        fa = (len(sf) - bisect.bisect_left(sf, t)) / len(sf)
        if fa > far:
            break
        best = (t, (len(st) - bisect.bisect_left(st, t)) / len(st), fa)
    return best


def claim_roc(
    true: Sequence[float],
    false: Sequence[float],
    *,
    far: float = CLAIM_FAR,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC, the true-accept rate at ``far`` and its threshold, with percentile-bootstrap
    intervals (true and false claims resampled apart, seeded)."""
    import random

    chosen = accept_threshold(true, false, far)
    out: dict[str, Any] = {
        "true_claims": len(true),
        "false_claims": len(false),
        "auc": roc_auc(true, false),
        "far_target": far,
        "threshold": chosen[0] if chosen else None,
        "tar": chosen[1] if chosen else None,
        "far": chosen[2] if chosen else None,
        "bootstrap": {"resamples": resamples, "level": level, "seed": seed},
    }
    if not true or not false or resamples < 1:
        return out
    rng = random.Random(seed)
    aucs, tars, thresholds = [], [], []
    for _ in range(resamples):
        t = [true[rng.randrange(len(true))] for _ in true]
        f = [false[rng.randrange(len(false))] for _ in false]
        aucs.append(roc_auc(t, f))
        found = accept_threshold(t, f, far)
        if found is not None:
            thresholds.append(found[0])
            tars.append(found[1])
    tail = (1 - level) / 2

    def interval(values: list) -> list[float] | None:
        values = sorted(v for v in values if v is not None)
        return [_percentile(values, tail), _percentile(values, 1 - tail)] if values else None

    out["bootstrap"] |= {
        "auc_interval": interval(aucs),
        "tar_interval": interval(tars),
        "threshold_interval": interval(thresholds),
    }
    return out


def format_claim_roc(distance_km: float, scale_km: float, r: dict[str, Any]) -> str:
    """One console line: false claims >= D km away, the mass within one PD scale."""
    if r["auc"] is None:
        return f"false >= {distance_km:g} km, mass within {scale_km:g} km: no claims to compare"
    boot = r["bootstrap"]

    def iv(key: str, fmt: str) -> str:
        v = boot.get(key)
        return f" [{v[0]:{fmt}}, {v[1]:{fmt}}]" if v else ""

    line = f"false >= {distance_km:g} km, mass within {scale_km:g} km: AUC {r['auc']:.3f}{iv('auc_interval', '.3f')}"
    if r["tar"] is None:
        return line + f"; no threshold keeps false accepts <= {r['far_target'] * 100:g}%"
    return (
        line + f", true-accept {r['tar'] * 100:.1f}%{iv('tar_interval', '.3f')} at false-accept "
        f"{r['far'] * 100:.1f}% (<= {r['far_target'] * 100:g}%) with mass >= {r['threshold']:.4g}"
        f"{iv('threshold_interval', '.4g')}"
    )
