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
