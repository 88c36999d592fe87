"""The paper-style trade-off plots of a sweep (Orekondy et al. 2020, Fig. 3-4), drawn with matplotlib's Agg.

- attacker accuracy vs defender accuracy (x: benign users' top-1 accuracy, y: clone accuracy);
- attacker accuracy vs mean L1 perturbation of the returned probabilities.

One curve per defense (per defense and target for gradient redirection: :func:`curve_name`), ordered along its
budget parameter (:func:`curve_value`, e.g. adaptive misinformation's tau); single-point defenses (label-only)
are markers; the undefended point is a black star. Lower-right is better for the defender on the first plot.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mlflow_project.sweep.presets import CURVE_PARAMETER  # noqa: E402

STYLE = {
    "mad": ("tab:red", "o"),
    "mad_argmax": ("tab:purple", "D"),
    "reverse_sigmoid": ("tab:green", "s"),
    "random_noise": ("tab:orange", "^"),
    "rounding": ("tab:brown", "v"),
    "label_only": ("tab:blue", "P"),
    "top_k": ("tab:gray", "x"),
    "adaptive_misinformation": ("tab:olive", "h"),
    "gradient_redirection": ("tab:pink", "<"),
    "gradient_redirection[reverse]": ("tab:pink", "<"),
    "gradient_redirection[shift]": ("tab:cyan", ">"),
    "gradient_redirection[least_likely]": ("darkgoldenrod", "p"),
    "gradient_redirection[random]": ("slategray", "8"),
}
# Config fields that split a defense into several curves (a curve per value), e.g. gradient_redirection[shift].
CURVE_VARIANT = {"gradient_redirection": "target"}
AXES = {
    "defender_accuracy": "defender accuracy (benign top-1, %)",
    "perturbation_l1_mean": "mean L1 perturbation ||y~ - y||_1",
    "attacker_accuracy": "strongest attacker's clone accuracy, %",
    "attacker_accuracy_strongest": "strongest attacker's clone accuracy, %",
    "attacker_accuracy_soft": "soft-label attacker's clone accuracy, %",
    "attacker_accuracy_top1": "top-1-label attacker's clone accuracy, %",
}
PERCENT = {"defender_accuracy", "attacker_accuracy", "attacker_accuracy_strongest", "attacker_accuracy_soft",
           "attacker_accuracy_top1"}


def _field(point: Mapping[str, Any], key: str) -> Any:
    """``point[key]``, else the key of its ``defense_config`` JSON (CSVs older than the column); None if neither."""
    value = point.get(key)
    if value not in (None, ""):
        return value
    raw = point.get("defense_config")
    if not raw:
        return None
    config = json.loads(raw) if isinstance(raw, str) else dict(raw)
    return config.get(key)


def curve_name(point: Mapping[str, Any]) -> str:
    """The curve a point belongs to: its defense, plus the variant field's value in brackets for defenses that
    have one (``gradient_redirection[reverse]``, ``gradient_redirection[shift]``: different targets are
    different defenses, never one curve)."""
    name = point["defense"]
    variant = CURVE_VARIANT.get(name)
    value = _field(point, variant) if variant else None
    return f"{name}[{value}]" if value not in (None, "") else name


def curve_value(point: Mapping[str, Any]) -> float:
    """Where a point sits along its curve: its defense's curve parameter (presets.CURVE_PARAMETER, e.g.
    ``tau`` for adaptive_misinformation, ``epsilon`` for gradient_redirection); NaN if it has none."""
    param = CURVE_PARAMETER.get(point["defense"])
    value = _field(point, param) if param else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def curves(points: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """``{curve_name: its points ordered along the curve parameter}``, in order of first appearance."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        out.setdefault(curve_name(p), []).append(p)
    for name, mine in out.items():
        out[name] = sorted(mine, key=lambda p: (math.isnan(curve_value(p)), curve_value(p)))
    return out


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
    fig, ax = plt.subplots(figsize=(6.6, 3.8), dpi=100)
    for name, mine in curves(points).items():
        if name == "identity":
            continue
        color, marker = STYLE.get(name) or STYLE.get(mine[0]["defense"], ("tab:cyan", "*"))
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
    # outside the axes: with a dozen defenses "best" finds no free corner and hides points (measured on the
    # session-13 grid: MAD-argmax and reverse sigmoid sat under the legend)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
