"""Cumulative accuracy vs radius as a PNG (needs the optional ``plot`` extra: matplotlib)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from visloc_client.evaluation import RADII_KM, cumulative_accuracy

INSTALL_HINT = "plotting needs matplotlib: pip install 'visloc-client[plot]'"


def require_matplotlib() -> None:
    """Fail before a long evaluation rather than after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise RuntimeError(INSTALL_HINT) from err


def plot_cumulative(
    path: str | os.PathLike[str],
    sets: Sequence[tuple[str, Sequence[float]]],
    *,
    title: str = "Cumulative accuracy",
    low_km: float = 0.1,
    high_km: float = 20000.0,
    points: int = 400,
) -> None:
    """One curve per (label, errors_km) set: fraction of images with error < r, log-x axis."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    step = (math.log10(high_km) - math.log10(low_km)) / (points - 1)
    radii = [10 ** (math.log10(low_km) + i * step) for i in range(points)]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for label, errors in sets:
            acc = [a * 100 for a in cumulative_accuracy(errors, radii)]
            ax.plot(radii, acc, label=f"{label} (n={len(errors)})")
        for r in RADII_KM:
            ax.axvline(r, color="0.85", linewidth=0.8, zorder=0)
        ax.set_xscale("log")
        ax.set_xlim(low_km, high_km)
        ax.set_ylim(0, 100)
        ax.set_xlabel("radius r (km)")
        ax.set_ylabel("images with error < r (%)")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="png")
    finally:
        plt.close(fig)
