"""Choosing a sweep's operating point and finding it again in MLflow.

- :func:`choose` / :func:`select_point`: among points whose defender-accuracy drop is at most ``max_drop``
  accuracy points and whose mean L1 perturbation on the test set is at most ``max_l1`` (default 1.0: half of
  the L1 diameter of the simplex, so a recommended defense keeps at least half of every benign probability
  vector's mass where it was on average), the one with the lowest *strongest*-attacker accuracy
  (``attacker_accuracy_strongest``, the better of the soft and the top-1 clone; ties: higher defender
  accuracy, then smaller L1). The grid must hold the ``label_only`` point: a defense is recommended only if it
  does better against the strongest attacker than label_only (which costs benign users every probability but
  no top-1 accuracy), and by more than the seeds' noise. A win beyond noise is either
  (a) by range: when the points carry several seeds (the sweep's per-point means, with
  ``attacker_accuracy_strongest_min`` / ``_max``), the candidate's worst seed is below label_only's best seed,
  and label_only was measured with at least as many seeds as the candidate (a one-seed label_only has no
  spread to be outside of; the reason says to give it the candidate's seeds). With one seed on both sides the
  spread is unknown and no win counts: the reason says so and to add seeds (measured 2026-12-07: the demo's
  one-seed quick sweep had ood_gated 0.04 points under label_only at a 0.86-point benign cost; over HTTP that
  defense's clone was 3.1 points under the undefended twin's and label_only's 3.6 under it); or
  (b) paired by seed: given the per-seed rows, the candidate is lower than label_only on so many of the seeds
  both were measured with (at one torch thread count) that a one-sided exact sign test gives
  p <= :data:`PAIRED_ALPHA` (``scipy.stats.binomtest``): with 5 paired seeds, lower on all 5 (p = 1/32). A seed
  fixes the attacker's queries and its clones' initialisation, so the paired difference removes the seed's own
  effect that the range comparison keeps; 0.05 is the range rule's own false-positive rate at 3 seeds a side
  (3 exchangeable values all below 3 others: 1/C(6,3) = 1/20), so (b) is no looser than (a) at the headline
  seed count.
  If nothing does, the selection says so and recommends label_only, or the undefended point when label_only
  itself breaks the caps; never a point that only wins against the soft attacker, or only by noise. Given the
  per-seed rows, the reason also gives the point's difference from label_only seed by seed
  (:func:`paired_note`).
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
from dataclasses import dataclass
from typing import Any

RECOMMENDED_TAG = "stealguard.recommended"
SWEEP_KEY_TAG = "stealguard.sweep_key"
POINT_KEY_TAG = "stealguard.point_key"
MEASUREMENT_KEY_TAG = "stealguard.measurement_key"  # the point key without the thread count (run.threaded_key)
THREADS_TAG = "stealguard.threads"  # the torch thread count a point's clones were trained at
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


DEFAULT_MAX_L1 = 1.0
LABEL_ONLY = "label_only"
UNDEFENDED = "identity"


def strongest(point: Mapping[str, Any]) -> float:
    """The strongest attacker's accuracy of a point: ``attacker_accuracy_strongest``, or ``attacker_accuracy``
    for points recorded before the attackers were a set."""
    key = "attacker_accuracy_strongest" if _finite(point, "attacker_accuracy_strongest") else "attacker_accuracy"
    return float(point[key])


def _l1(point: Mapping[str, Any]) -> float:
    return float(point["perturbation_l1_mean"]) if _finite(point, "perturbation_l1_mean") else math.inf


@dataclass(frozen=True)
class Selection:
    point: Mapping[str, Any]
    reason: str
    beats_label_only: bool


def strongest_range(point: Mapping[str, Any]) -> tuple[float, float]:
    """(min, max) of the strongest attacker's accuracy over the point's seeds; (value, value) for one seed."""
    if _finite(point, "attacker_accuracy_strongest_min") and _finite(point, "attacker_accuracy_strongest_max"):
        return float(point["attacker_accuracy_strongest_min"]), float(point["attacker_accuracy_strongest_max"])
    return strongest(point), strongest(point)


def n_seeds(point: Mapping[str, Any]) -> int:
    """How many seeds a point was measured with (``n_seeds``, as the sweep's means carry it; 1 if absent)."""
    try:
        return max(1, int(float(point.get("n_seeds") or 1)))
    except (TypeError, ValueError):
        return 1


def spread_known(point: Mapping[str, Any]) -> bool:
    """Whether the point was measured with more than one seed."""
    return n_seeds(point) > 1


def inside_spread(candidate: Mapping[str, Any], floor: Mapping[str, Any]) -> bool:
    """Whether ``candidate``'s win over ``floor`` is inside the seeds' noise: some seed of the candidate did no
    better than some seed of ``floor`` (their min-max ranges of the strongest attacker's accuracy overlap; a
    one-seed point's range is its value), or ``floor`` was measured with fewer seeds than ``candidate`` (its
    range is then narrower than it would be, so being outside it says little), or both have one seed (nothing is
    known about the spread, so no difference is beyond it)."""
    if not (spread_known(candidate) or spread_known(floor)):
        return True
    if n_seeds(floor) < n_seeds(candidate):
        return True
    return strongest_range(candidate)[1] >= strongest_range(floor)[0]


# A point's mean L1 is a mean of float32 row sums: a defense at an L1 budget of exactly the cap measures up to
# ~1e-7 over it (mad_argmax at epsilon 1: 1.000000011 in the paper sweep), which must still count as at the cap.
L1_TOLERANCE = 1e-6


def thread_count(row: Mapping[str, Any]) -> str:
    """A row's torch thread count as text (``""`` for a row recorded before points carried it)."""
    v = row.get("threads")
    if isinstance(v, float) and math.isfinite(v):
        return str(int(v))
    return str(v).strip() if v not in (None, "") else ""


def by_seed(per_seed: Iterable[Mapping[str, Any]], defense_config: str) -> dict[int, tuple[float, str]]:
    """``{seed: (strongest-attacker accuracy, thread count)}`` of one point (its ``defense_config``) in a
    sweep's per-seed rows."""
    out: dict[int, tuple[float, str]] = {}
    for r in per_seed:
        if r.get("defense_config") == defense_config and isinstance(r.get("seed"), (int, float)):
            out[int(r["seed"])] = (strongest(r), thread_count(r))
    return out


# (b) of the module doc: the paired sign test's level; 1/20, the range rule's false-positive rate at 3 seeds a side
PAIRED_ALPHA = 0.05


@dataclass(frozen=True)
class Paired:
    """``p`` minus ``ref`` seed by seed (:func:`paired`): the seeds both were measured with at one thread count,
    the differences in accuracy points, and the seeds left out because their thread counts differ."""
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    apart: tuple[str, ...]

    @property
    def lower(self) -> int:
        return sum(d < 0 for d in self.diffs)

    @property
    def p_value(self) -> float:
        """One-sided exact sign test of "``p`` is lower than ``ref``" (a tie counts as not lower); 1.0 with no
        paired seed."""
        if not self.seeds:
            return 1.0
        from scipy.stats import binomtest

        return float(binomtest(self.lower, len(self.seeds), 0.5, alternative="greater").pvalue)

    @property
    def wins(self) -> bool:
        """(b) of the module doc: lower on enough paired seeds that the sign test gives p <= PAIRED_ALPHA."""
        return self.p_value <= PAIRED_ALPHA


def paired(p: Mapping[str, Any], ref: Mapping[str, Any] | None, per_seed: Sequence[Mapping[str, Any]]) -> Paired:
    """``p`` against ``ref`` seed by seed in the sweep's per-seed rows. A seed is paired only at the same torch
    thread count: at another count the clones train differently (:func:`mlflow_project.sweep.run.threaded_key`)."""
    if not per_seed or ref is None or ref is p or "defense_config" not in p or "defense_config" not in ref:
        return Paired((), (), ())
    mine, theirs = by_seed(per_seed, p["defense_config"]), by_seed(per_seed, ref["defense_config"])
    both = sorted(set(mine) & set(theirs))
    shared = tuple(s for s in both if mine[s][1] == theirs[s][1])
    apart = tuple(f"seed {s} at {mine[s][1] or '?'} vs {theirs[s][1] or '?'} threads" for s in both
                  if s not in shared)
    return Paired(shared, tuple(100 * (mine[s][0] - theirs[s][0]) for s in shared), apart)


def paired_win(p: Mapping[str, Any], ref: Mapping[str, Any], per_seed: Sequence[Mapping[str, Any]]) -> bool:
    """(b) of the module doc: ``p`` is lower than ``ref`` on enough paired seeds (sign test p <= PAIRED_ALPHA)."""
    return paired(p, ref, per_seed).wins


def paired_note(p: Mapping[str, Any], ref: Mapping[str, Any] | None,
                per_seed: Sequence[Mapping[str, Any]], name: str) -> str:
    """``p`` minus ``ref`` seed by seed, on the seeds both were measured with (at least 2), in points, on how
    many of those seeds ``p`` is lower, and the one-sided sign test's p-value (:class:`Paired`); the note says
    which seeds a differing thread count left out. When the test counts the win ((b) of the module doc), the
    note says so: a report row then reads as the selection does, whatever the range rule says."""
    pair = paired(p, ref, per_seed)
    left_out = f"; not paired: {', '.join(pair.apart)}" if pair.apart else ""
    if len(pair.seeds) < 2:
        return f"paired by seed vs {name}: too few seeds at one thread count{left_out}" if pair.apart else ""
    diffs = pair.diffs
    verdict = f" <= {PAIRED_ALPHA:g}: a win beyond noise" if pair.wins else ""
    return (f"paired by seed vs {name}: {sum(diffs) / len(diffs):+.1f} ("
            + " / ".join(f"{d:+.1f}" for d in diffs) + f" on seeds {','.join(map(str, pair.seeds))}; lower on "
            f"{pair.lower} of {len(pair.seeds)}, sign test p = {pair.p_value:.3g}{verdict}{left_out})")


def within_caps(point: Mapping[str, Any], max_drop: float, max_l1: float) -> bool:
    # a tiny tolerance so that a drop (or L1) of exactly the cap, up to float rounding, is accepted
    return accuracy_drop_points(point) <= max_drop + 1e-9 and _l1(point) <= max_l1 + L1_TOLERANCE


def choose(points: Sequence[Mapping[str, Any]], max_drop: float = 1.0, max_l1: float = DEFAULT_MAX_L1,
           per_seed: Sequence[Mapping[str, Any]] = ()) -> Selection:
    """The operating point (see the module doc) and why it was chosen. Points need ``defense`` (the defense's
    name), victim/defender accuracy, the attacker accuracy and ``perturbation_l1_mean``. ``per_seed``: the
    sweep's rows, one per point and seed; with them a win may also count by the paired sign test ((b) of the
    module doc), and the reason adds the chosen (or the nearest noisy) point's difference from label_only paired
    by seed (:func:`paired_note`)."""
    if not 0 <= max_drop <= 100:
        raise ValueError(f"max_drop: must be in [0, 100] accuracy points; got {max_drop}")
    if not max_l1 >= 0:
        raise ValueError(f"max_l1: must be >= 0 (mean L1 perturbation on the test set, at most 2); got {max_l1}")
    usable = [p for p in points if all(_finite(p, k) for k in ("victim_accuracy", "defender_accuracy"))
              and (_finite(p, "attacker_accuracy_strongest") or _finite(p, "attacker_accuracy"))]
    usable = [p for p in usable if '"monitor"' not in str(p.get("defense_config", ""))]  # serving, not a defense
    if not usable:
        raise ValueError("no point has victim_accuracy, defender_accuracy and attacker_accuracy to select from")
    label_only = [p for p in usable if p.get("defense") == LABEL_ONLY]
    if not label_only:
        raise ValueError("grid: the selection compares every defense with the label_only point, and none of these "
                         "points is a finished label_only one; keep label_only in the grid (no --no-label-only) "
                         "and let it finish (a --report-only of a partial sweep may not have it yet)")
    eligible = [p for p in usable if within_caps(p, max_drop, max_l1)]
    if not eligible:
        best = min(accuracy_drop_points(p) for p in usable)
        raise ValueError(f"max_drop / max_l1: no point drops defender accuracy by <= {max_drop} points with a mean "
                         f"L1 <= {max_l1} (smallest drop measured: {best:.2f}); allow more or add smaller budgets")

    def key(p: Mapping[str, Any]) -> tuple[float, float, float]:
        return (strongest(p), -float(p["defender_accuracy"]), _l1(p))

    floor = min(label_only, key=key)
    caps = f"drop <= {max_drop:g} points, mean L1 <= {max_l1:g}"
    winners = [p for p in eligible if p.get("defense") != LABEL_ONLY and strongest(p) < strongest(floor)]
    by_range = [p for p in winners if not inside_spread(p, floor)]
    by_pairs = [p for p in winners if p not in by_range and paired_win(p, floor, per_seed)]
    if by_range or by_pairs:
        best = min(by_range + by_pairs, key=key)
        gain = 100 * (strongest(floor) - strongest(best))
        # the paired note that follows gives the seeds, the count and the p-value: "why" only names the rule
        why = "inside the min-max seed spread, but a paired win" if best in by_pairs else "outside the seed spread"
        note = paired_note(best, floor, per_seed, "label_only")
        return Selection(best, f"{best.get('label', best['defense'])} is the lowest strongest-attacker accuracy "
                               f"within {caps}, {gain:.2f} points below label_only ({why})"
                               + (f"; {note}" if note else ""), True)
    noise = ""
    if winners:
        near = min(winners, key=key)
        note = paired_note(near, floor, per_seed, "label_only")
        if not (spread_known(near) or spread_known(floor)):
            few = " (one seed each, so the spread is unknown: measure both at more seeds, e.g. --seeds 0,1,2)"
        elif n_seeds(floor) < n_seeds(near):
            few = (f" (label_only has {n_seeds(floor)} seed(s) against its {n_seeds(near)}: measure label_only at "
                   "the same seeds)")
        else:
            few = ""
        noise = (f"; {near.get('label', near['defense'])} is {100 * (strongest(floor) - strongest(near)):.2f} points "
                 f"lower, inside the seed spread{few}: noise" + (f" ({note})" if note else ""))
    if within_caps(floor, max_drop, max_l1):
        return Selection(floor, f"no defense within {caps} beats label_only against the strongest attacker "
                                f"({100 * strongest(floor):.2f}%){noise}; recommending label_only", False)
    undefended = [p for p in eligible if p.get("defense") == UNDEFENDED]
    if not undefended:
        raise ValueError(f"no defense within {caps} beats label_only, label_only breaks the caps and the grid has "
                         "no undefended (identity) point to fall back to")
    return Selection(undefended[0], f"no defense within {caps} beats label_only against the strongest attacker, "
                                    f"and label_only breaks the caps (drop {accuracy_drop_points(floor):.2f}, L1 "
                                    f"{_l1(floor):.3f}); recommending the undefended point", False)


def select_point(points: Sequence[Mapping[str, Any]], max_drop: float = 1.0,
                 max_l1: float = DEFAULT_MAX_L1) -> Mapping[str, Any]:
    """The recommended point (:func:`choose` without the explanation)."""
    return choose(points, max_drop, max_l1).point


def attacker_accuracy_at_drops(points: Iterable[Mapping[str, Any]], drops: Sequence[float] = (0.5, 1.0, 5.0),
                               by: str = "defense",
                               max_l1: float = math.inf) -> dict[str, dict[float, float | None]]:
    """``{defense: {drop: lowest strongest-attacker accuracy among its points within drop and max_l1}}`` (None:
    no point fits).

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
            within = [strongest(p) for p in mine if within_caps(p, d, max_l1)]
            row[d] = min(within) if within else None
        out[name] = row
    return out


# ------------------------------------------------------------------------------------------------------ MLflow


def sweep_child_runs(client, experiment_id: str, sweep_key: str, finished_only: bool = False) -> list:
    """Every child (point) run of the sweep ``sweep_key`` (of every sweep of the experiment if ``""``), oldest
    first."""
    flt = f"tags.`{KIND_TAG}` = 'sweep_point'"
    if sweep_key:
        flt += f" AND tags.`{SWEEP_KEY_TAG}` = '{sweep_key}'"
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
