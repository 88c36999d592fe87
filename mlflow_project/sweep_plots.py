"""The paper-style trade-off plots of a sweep (Orekondy et al. 2020, Fig. 3-4), drawn with matplotlib's Agg.

- attacker accuracy vs defender accuracy (x: benign users' top-1 accuracy, y: clone accuracy);
- attacker accuracy vs mean L1 perturbation of the returned probabilities.

One curve per defense, ordered along its budget parameter; single-point defenses (label-only) are markers; the
undefended point is a black star. Lower-right is better for the defender on the first plot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mlflow_project.sweep_presets import CURVE_PARAMETER  # noqa: E402

STYLE = {
    "mad": ("tab:red", "o"),
    "mad_argmax": ("tab:purple", "D"),
    "reverse_sigmoid": ("tab:green", "s"),
    "random_noise": ("tab:orange", "^"),
    "rounding": ("tab:brown", "v"),
    "label_only": ("tab:blue", "P"),
    "top_k": ("tab:gray", "x"),
}
AXES = {
    "defender_accuracy": "defender accuracy (benign top-1, %)",
    "perturbation_l1_mean": "mean L1 perturbation ||y~ - y||_1",
    "attacker_accuracy": "attacker (clone) accuracy, %",
}
PERCENT = {"defender_accuracy", "attacker_accuracy"}


def _value(p: Mapping[str, Any], key: str) -> float:
    v = float(p[key])
    return 100.0 * v if key in PERCENT else v


def plot_tradeoff(points: Sequence[Mapping[str, Any]], x: str, path: str | Path, title: str = "",
                  y: str = "attacker_accuracy", recommended: str | None = None, max_drop_shown: float = 15.0) -> Path:
    """Draw ``y`` against ``x`` for every defense in ``points`` (dicts with ``defense`` and metrics); save PNG.

    ``recommended``: the ``point_key`` of the selected point, circled. On the defender-accuracy axis, points
    that cost more than ``max_drop_shown`` accuracy points are left off the view (the trade-off that matters
    is near the victim's accuracy) and counted in a note.
    """
    if x not in AXES or y not in AXES:
        raise ValueError(f"x, y: allowed axes are {', '.join(AXES)}; got x={x!r}, y={y!r}")
    if not points:
        raise ValueError("no points to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.0, 3.8), dpi=100)
    for name in dict.fromkeys(p["defense"] for p in points):
        if name == "identity":
            continue
        mine = [p for p in points if p["defense"] == name]
        param = CURVE_PARAMETER.get(name)
        if param:
            mine = sorted(mine, key=lambda p: float(p.get(param) or 0.0))
        color, marker = STYLE.get(name, ("tab:cyan", "*"))
        ax.plot([_value(p, x) for p in mine], [_value(p, y) for p in mine], marker=marker, color=color,
                label=name, linewidth=1.2, markersize=5, linestyle="-" if len(mine) > 1 else "none")
    for p in points:
        if p["defense"] == "identity":
            ax.plot(_value(p, x), _value(p, y), marker="*", color="black", markersize=13, linestyle="none",
                    label="undefended")
        if recommended is not None and p.get("point_key") == recommended:
            ax.plot(_value(p, x), _value(p, y), marker="o", markersize=14, markerfacecolor="none",
                    markeredgecolor="black", linestyle="none", label="recommended")
    if x == "defender_accuracy":
        victim = max(100.0 * float(p["victim_accuracy"]) for p in points)
        lo = victim - max_drop_shown
        hidden = sum(1 for p in points if _value(p, x) < lo)
        if hidden:
            ax.set_xlim(lo, victim + 0.05 * max_drop_shown)
            ax.annotate(f"{hidden} point(s) with a drop > {max_drop_shown:g} points off the left edge",
                        xy=(0.01, 0.01), xycoords="axes fraction", fontsize=7, color="dimgray")
    ax.set_xlabel(AXES[x])
    ax.set_ylabel(AXES[y])
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
