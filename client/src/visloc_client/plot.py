"""Plots as PNG (need the optional ``plot`` extra: matplotlib): cumulative accuracy, risk-coverage."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from visloc_client.evaluation import RADII_KM, cumulative_accuracy, radius_label

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


def plot_risk_coverage(
    path: str | os.PathLike[str],
    curves: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    radius_km: float,
    goal: float | None = None,
    chosen: Sequence[tuple[str, float, float]] = (),
    title: str = "Risk and coverage",
) -> None:
    """Acc@radius of the kept photos against coverage, one curve per PD scale.

    ``curves``: (label, [(coverage, accuracy), ...]); ``chosen``: (label, coverage, accuracy)
    points to mark (the lowest threshold reaching ``goal``, drawn as a horizontal line).
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for label, points in curves:
            ax.plot([c * 100 for c, _ in points], [a * 100 for _, a in points], label=label, drawstyle="steps-post")
        if goal is not None:
            ax.axhline(goal * 100, color="0.5", linestyle="--", linewidth=0.8, label=f"target {goal * 100:g}%")
        for label, coverage, acc in chosen:
            ax.plot([coverage * 100], [acc * 100], "o", label=f"{label}: lowest threshold reaching the target")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_xlabel("coverage: photos kept (%)")
        ax.set_ylabel(f"Acc@{radius_label(radius_km)} of the kept photos (%)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left", fontsize="small")
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="png")
    finally:
        plt.close(fig)


def plot_claim_roc(
    path: str | os.PathLike[str],
    panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[tuple[float, float]]]]]],
    *,
    far: float | None = None,
    title: str = "Claim check: true against false claims",
) -> None:
    """ROC curves of the claim mass, one panel per false-claim distance, one curve per PD scale.

    ``panels``: (panel title, [(label, [(false-accept rate, true-accept rate), ...]), ...]).
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), dpi=120, squeeze=False)
    try:
        for ax, (panel, curves) in zip(axes[0], panels):
            for label, points in curves:
                ax.plot([f * 100 for f, _ in points], [t * 100 for _, t in points], label=label)
            ax.plot([0, 100], [0, 100], color="0.6", linestyle=":", linewidth=0.8)
            if far is not None:
                ax.axvline(far * 100, color="0.5", linestyle="--", linewidth=0.8)
            ax.set_xlim(0, 100)
            ax.set_ylim(0, 100)
            ax.set_xlabel("false claims accepted (%)")
            ax.set_ylabel("true claims accepted (%)")
            ax.set_title(panel, fontsize="medium")
            ax.grid(True, alpha=0.3)
            ax.legend(loc="lower right", fontsize="x-small")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="png")
    finally:
        plt.close(fig)
