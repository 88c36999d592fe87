"""Choosing a sweep's operating point and finding it again in MLflow.

- :func:`select_point`: among points whose defender-accuracy drop is at most ``max_drop`` accuracy points, the
  one with the lowest attacker accuracy (ties: higher defender accuracy, then smaller mean L1 perturbation).
- :func:`tag_recommended`: tag that child run ``stealguard.recommended=true`` and remove the tag from every other
  run of the same sweep; the parent run records ``stealguard.recommended_run_id``.
- :func:`find_recommended_run`: what the registry step calls to get the recommended run (of one sweep, or the
  most recent recommendation in the experiment).
- :func:`attacker_accuracy_at_drops`: per defense, the lowest attacker accuracy reachable within each allowed
  drop (RESULTS.md's tables are computed with it from the sweep CSVs).

Accuracies are fractions in [0, 1] as logged by the lab; drops are given in accuracy points (1.0 = 0.01).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

RECOMMENDED_TAG = "stealguard.recommended"
SWEEP_KEY_TAG = "stealguard.sweep_key"
POINT_KEY_TAG = "stealguard.point_key"
KIND_TAG = "stealguard.kind"
MISINFORMATION_TAG = "stealguard.misinformation_uri"  # an AM point: runs:/<sweep parent>/misinformation
RECOMMENDED_RUN_TAG = "stealguard.recommended_run_id"


def accuracy_drop_points(point: Mapping[str, Any]) -> float:
    """Defender-accuracy drop of a point in accuracy points: 100 * (victim_accuracy - defender_accuracy)."""
    return 100.0 * (float(point["victim_accuracy"]) - float(point["defender_accuracy"]))


def _finite(point: Mapping[str, Any], key: str) -> bool:
    try:
        return math.isfinite(float(point[key]))
    except (KeyError, TypeError, ValueError):
        return False


def select_point(points: Sequence[Mapping[str, Any]], max_drop: float = 1.0) -> Mapping[str, Any]:
    """The point minimising attacker accuracy with a drop of at most ``max_drop`` points (see module doc)."""
    if not 0 <= max_drop <= 100:
        raise ValueError(f"max_drop: must be in [0, 100] accuracy points; got {max_drop}")
    usable = [p for p in points if all(_finite(p, k) for k in ("victim_accuracy", "defender_accuracy",
                                                                   "attacker_accuracy"))]
    if not usable:
        raise ValueError("no point has victim_accuracy, defender_accuracy and attacker_accuracy to select from")
    # a tiny tolerance so that a drop of exactly max_drop (up to float rounding) is accepted
    eligible = [p for p in usable if accuracy_drop_points(p) <= max_drop + 1e-9]
    if not eligible:
        best = min(accuracy_drop_points(p) for p in usable)
        raise ValueError(f"max_drop: no point drops defender accuracy by <= {max_drop} points "
                         f"(smallest drop measured: {best:.2f}); allow a larger drop or add smaller budgets")

    def key(p: Mapping[str, Any]) -> tuple[float, float, float]:
        l1 = float(p["perturbation_l1_mean"]) if _finite(p, "perturbation_l1_mean") else math.inf
        return (float(p["attacker_accuracy"]), -float(p["defender_accuracy"]), l1)

    return min(eligible, key=key)


def attacker_accuracy_at_drops(points: Iterable[Mapping[str, Any]], drops: Sequence[float] = (0.5, 1.0, 5.0),
                               by: str = "defense") -> dict[str, dict[float, float | None]]:
    """``{defense: {drop: lowest attacker accuracy among its points within drop}}`` (None: no point fits).

    The undefended point counts for every defense: doing nothing is always within budget, so a defense whose
    every budget costs too much reads as the undefended attacker accuracy, as in the paper's tables.
    """
    points = list(points)
    undefended = [p for p in points if p[by] == "identity"]
    out: dict[str, dict[float, float | None]] = {}
    for name in dict.fromkeys(p[by] for p in points):
        mine = [p for p in points if p[by] == name] + ([] if name == "identity" else undefended)
        row: dict[float, float | None] = {}
        for d in drops:
            within = [float(p["attacker_accuracy"]) for p in mine if accuracy_drop_points(p) <= d + 1e-9]
            row[d] = min(within) if within else None
        out[name] = row
    return out


# ------------------------------------------------------------------------------------------------------ MLflow


def sweep_child_runs(client, experiment_id: str, sweep_key: str, finished_only: bool = False) -> list:
    """Every child (point) run of the sweep ``sweep_key``, oldest first."""
    flt = f"tags.`{SWEEP_KEY_TAG}` = '{sweep_key}' AND tags.`{KIND_TAG}` = 'sweep_point'"
    if finished_only:
        flt += " AND attributes.status = 'FINISHED'"
    runs = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=flt, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def tag_recommended(client, experiment_id: str, sweep_key: str, run_id: str, parent_run_id: str | None = None) -> None:
    """Tag ``run_id`` recommended and clear the tag on the other runs of the sweep."""
    for run in sweep_child_runs(client, experiment_id, sweep_key):
        if run.info.run_id != run_id and RECOMMENDED_TAG in run.data.tags:
            client.delete_tag(run.info.run_id, RECOMMENDED_TAG)
    client.set_tag(run_id, RECOMMENDED_TAG, "true")
    if parent_run_id:
        client.set_tag(parent_run_id, RECOMMENDED_RUN_TAG, run_id)


def find_recommended_run(sweep_key: str | None = None, parent_run_id: str | None = None,
                         tracking_uri: str | None = None, experiment: str = "stealguard"):
    """The recommended point run (an ``mlflow.entities.Run``) of a sweep, or of the latest sweep.

    Give ``parent_run_id`` (a sweep's parent run) or ``sweep_key`` to pick a sweep; with neither, the most
    recently started run tagged ``stealguard.recommended=true`` in ``experiment``. Raises LookupError if none.
    Its defense config is the run's param ``defense_config`` (JSON) and artifact ``defense.json``.
    """
    from mlflow.tracking import MlflowClient

    from mlflow_project.lifecycle import tracking

    client = MlflowClient(tracking.resolve_tracking_uri(tracking_uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"experiment {experiment!r} does not exist in {tracking.resolve_tracking_uri(tracking_uri)}")
    if parent_run_id and not sweep_key:
        parent = client.get_run(parent_run_id)
        sweep_key = parent.data.tags.get(SWEEP_KEY_TAG)
        if not sweep_key:
            raise LookupError(f"run {parent_run_id} is not a sweep parent run (no {SWEEP_KEY_TAG} tag)")
    flt = f"tags.`{RECOMMENDED_TAG}` = 'true'"
    if sweep_key:
        flt += f" AND tags.`{SWEEP_KEY_TAG}` = '{sweep_key}'"
    runs = client.search_runs([exp.experiment_id], filter_string=flt, max_results=1,
                              order_by=["attributes.start_time DESC"])
    if not runs:
        where = f"sweep {sweep_key}" if sweep_key else f"experiment {experiment!r}"
        raise LookupError(f"no run tagged {RECOMMENDED_TAG}=true in {where}; run the sweep's selection first")
    return runs[0]
