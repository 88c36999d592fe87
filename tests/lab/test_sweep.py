"""The defense sweep on a tiny digits grid: nested runs, resumption, outputs, selection, interruption."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from mlflow_project.lab.evaluate import evaluate
from mlflow_project.sweep import run as sw
from mlflow_project.sweep.presets import defense_grid, describe, get_preset, reverse_sigmoid_gamma
from mlflow_project.sweep.select import (
    RECOMMENDED_TAG,
    attacker_accuracy_at_drops,
    choose,
    find_recommended_run,
    select_point,
    sweep_child_runs,
)

ALWAYS = ("victim_accuracy", "defender_accuracy", "perturbation_l1_mean", "perturbation_l1_max", "kl_mean",
          "top1_flip_rate", "attacker_accuracy", "attacker_agreement", "queries", "attacker_accuracy_soft",
          "attacker_accuracy_top1", "attacker_accuracy_strongest", "attacker_agreement_soft", "attacker_agreement_top1",
          "query_top1_flip_rate", "defender_nll", "defender_ece", "victim_nll", "victim_ece")
MAD_FAMILY = ("mad", "mad_argmax")


def uri(path) -> str:
    return f"sqlite:///{path.resolve()}"


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds); each test uses its own experiment."""
    return uri(tmp_path_factory.mktemp("store") / "mlflow.db")


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory):
    """The tiny preset's digits MLP, trained once for the module (what resolve_victim caches)."""
    cache = tmp_path_factory.mktemp("victims")
    _, path = sw.resolve_victim(get_preset("tiny"), cache_dir=cache, progress=False)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, victim_dir, tracking_uri):
    """One tiny sweep, then the same sweep rerun (the rerun must reuse every point)."""
    root = tmp_path_factory.mktemp("sweep")
    tracking = tracking_uri
    first = sw.run_sweep("tiny", victim=victim_dir, tracking_uri=tracking, results_dir=root / "out", progress=False)
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("stealguard").experiment_id
    runs_after_first = len(client.search_runs([exp], max_results=1000))
    second = sw.run_sweep("tiny", victim=victim_dir, tracking_uri=tracking, results_dir=root / "out2", progress=False)
    runs_after_second = len(client.search_runs([exp], max_results=1000))
    return {"first": first, "second": second, "client": client, "exp": exp, "tracking": tracking,
            "runs": (runs_after_first, runs_after_second)}


def test_every_point_is_a_finished_nested_run_with_all_metrics(tiny):
    first, client = tiny["first"], tiny["client"]
    grid = defense_grid(get_preset("tiny"))
    assert first.new_points == len(grid) == len(first.points) and first.reused_points == 0
    children = client.search_runs([tiny["exp"]], filter_string=f"tags.`mlflow.parentRunId` = '{first.parent_run_id}'")
    assert len(children) == len(grid)
    rows = {p["run_id"]: p for p in first.points}
    assert {c.data.params["defense"] for c in children} == {json.dumps(g, sort_keys=True) for g in grid}
    for c in children:
        assert c.info.status == "FINISHED"
        expected = ALWAYS + (("angular_deviation_mean",) if c.data.tags["stealguard.defense"] in MAD_FAMILY else ())
        missing = [m for m in expected if m not in c.data.metrics]
        assert not missing, f"{c.info.run_name} lacks {missing}"
        assert c.data.metrics["queries"] == get_preset("tiny").budget
        # the point's row (points.csv, the selection) holds what its run logged
        assert c.data.metrics["attacker_accuracy"] == pytest.approx(rows[c.info.run_id]["attacker_accuracy"])
        m = c.data.metrics
        assert m["attacker_accuracy"] == m["attacker_accuracy_strongest"] == max(m["attacker_accuracy_soft"],
                                                                                  m["attacker_accuracy_top1"])
    # the undefended point changes nothing; the budgeted defenses respect their budget on every test row
    by_name = {p["label"]: p for p in first.points}
    assert by_name["identity"]["perturbation_l1_max"] == 0.0
    assert by_name["identity"]["defender_accuracy"] == by_name["identity"]["victim_accuracy"]
    assert by_name["mad(epsilon=0.5)"]["perturbation_l1_max"] <= 0.5 + 1e-5
    assert by_name["mad_argmax(epsilon=0.5)"]["top1_flip_rate"] == 0.0
    assert len({p["victim_accuracy"] for p in first.points}) == 1  # one victim for every point


def test_rerun_skips_finished_points(tiny):
    first, second = tiny["first"], tiny["second"]
    assert second.parent_run_id == first.parent_run_id and second.sweep_key == first.sweep_key
    assert second.new_points == 0 and second.reused_points == len(first.points)
    assert tiny["runs"][0] == tiny["runs"][1] == len(first.points) + 1  # children + one parent, no new run
    assert [p["run_id"] for p in second.points] == [p["run_id"] for p in first.points]
    assert [p["attacker_accuracy"] for p in second.points] == pytest.approx([p["attacker_accuracy"]
                                                                             for p in first.points])


def test_csv_and_both_plots_are_written_and_logged(tiny):
    first, client = tiny["first"], tiny["client"]
    with first.artifacts["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run_id"] for r in rows] == [p["run_id"] for p in first.points]
    assert all(r["attacker_accuracy"] and r["defender_accuracy"] for r in rows)
    assert all(r["attacker_accuracy_soft"] and r["attacker_accuracy_top1"] and r["attacker_accuracy_strongest"]
               and r["seed"] == "0" for r in rows)
    for key in ("plot_accuracy", "plot_l1", "plot_l1_soft", "plot_l1_top1", "csv_mean"):
        if key == "csv_mean":
            assert len(sw.read_points(first.artifacts[key])) == len(rows)  # one seed: one row per point
            continue
        png = first.artifacts[key].read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    logged = {a.path for a in client.list_artifacts(first.parent_run_id, "sweep")}
    assert {"sweep/points.csv", "sweep/attacker_vs_defender_accuracy.png", "sweep/attacker_vs_l1.png",
            "sweep/selection.json"} <= logged
    assert sw.read_points(first.artifacts["csv"])[0]["defense"] == "identity"


def test_sweep_tags_exactly_the_selected_point(tiny):
    first, client = tiny["first"], tiny["client"]
    expected = select_point(first.points, 1.0)
    assert first.recommended["run_id"] == expected["run_id"]
    tagged = [r for r in sweep_child_runs(client, tiny["exp"], first.sweep_key)
              if r.data.tags.get(RECOMMENDED_TAG) == "true"]
    assert [r.info.run_id for r in tagged] == [expected["run_id"]]
    run = find_recommended_run(parent_run_id=first.parent_run_id, tracking_uri=tiny["tracking"])
    assert run.info.run_id == expected["run_id"]
    assert json.loads(run.data.params["defense_config"])["name"] == expected["defense"]


def _point(name, victim, defender, attacker, l1=0.1, soft=None, top1=None, n_seeds=3):
    """A point; ``attacker`` is the strongest attacker's accuracy (soft / top-1 default to it), the same on each of
    its ``n_seeds`` seeds (so a difference between two points is outside their spread unless a test says
    otherwise)."""
    soft = attacker if soft is None else soft
    top1 = attacker if top1 is None else top1
    return {"defense": name, "label": name, "victim_accuracy": victim, "defender_accuracy": defender,
            "attacker_accuracy": max(soft, top1), "attacker_accuracy_strongest": max(soft, top1),
            "attacker_accuracy_strongest_min": max(soft, top1), "attacker_accuracy_strongest_max": max(soft, top1),
            "attacker_accuracy_soft": soft, "attacker_accuracy_top1": top1, "perturbation_l1_mean": l1,
            "n_seeds": n_seeds}


def test_select_point_respects_the_drop_and_breaks_ties():
    pts = [_point("identity", 0.90, 0.90, 0.80, 0.0), _point("a", 0.90, 0.895, 0.60),
           _point("b", 0.90, 0.88, 0.40), _point("c", 0.90, 0.8905, 0.60, l1=0.05),
           _point("label_only", 0.90, 0.90, 0.70, 0.3)]
    assert select_point(pts, 1.0)["label"] == "a"  # b drops 2 points; a and c tie on attacker, a keeps more accuracy
    assert select_point(pts, 2.0)["label"] == "b"
    assert select_point(pts, 0.0)["label"] == "label_only"  # nothing within 0 points beats label_only
    with pytest.raises(ValueError, match="max_drop"):
        select_point([_point("x", 0.9, 0.5, 0.1), _point("label_only", 0.9, 0.5, 0.2)], 1.0)
    with pytest.raises(ValueError, match="label_only"):
        select_point(pts[:4], 1.0)
    with pytest.raises(ValueError, match="max_drop"):
        select_point(pts, -1)
    table = attacker_accuracy_at_drops(pts, drops=(0.5, 1.0, 5.0))
    assert table["a"] == {0.5: 0.60, 1.0: 0.60, 5.0: 0.60}
    assert table["b"] == {0.5: 0.80, 1.0: 0.80, 5.0: 0.40}  # within 0.5/1 points only the undefended point fits


def test_a_point_that_only_beats_label_only_against_the_soft_attacker_is_not_chosen():
    und = _point("identity", 0.90, 0.90, 0.85, 0.0)
    lab = _point("label_only", 0.90, 0.90, 0.84, 0.30)
    soft_only = _point("mad_argmax", 0.90, 0.90, None, 1.2 / 2, soft=0.10, top1=0.845)
    sel = choose([und, soft_only, lab], max_drop=1.0)
    assert sel.point["defense"] == "label_only" and not sel.beats_label_only
    assert "no defense" in sel.reason and "label_only" in sel.reason
    # strictly lower than label_only against the strongest attacker is needed; equal is not enough
    tie = _point("mad", 0.90, 0.90, 0.84, 0.5)
    assert choose([und, tie, lab]).point["defense"] == "label_only"
    better = _point("mad", 0.90, 0.899, 0.70, 0.5)
    sel = choose([und, better, soft_only, lab])
    assert sel.point["defense"] == "mad" and sel.beats_label_only and "14.00 points below label_only" in sel.reason


def test_a_win_over_label_only_inside_the_seed_spread_is_noise_and_not_chosen():
    """The paper sweep's case (2026-12-02): MAD l1 0.7 at one seed, 42.96 %, against label_only 43.3 %
    [39.0-45.7] over 3 seeds: 0.3 points lower, inside label_only's spread."""
    und = {**_point("identity", 0.923, 0.923, 0.537), "n_seeds": 3, "attacker_accuracy_strongest_min": 0.511,
           "attacker_accuracy_strongest_max": 0.551}
    lab = {**_point("label_only", 0.923, 0.923, 0.433), "n_seeds": 3, "attacker_accuracy_strongest_min": 0.390,
           "attacker_accuracy_strongest_max": 0.457}
    mad = {**_point("mad", 0.923, 0.917, 0.4296, l1=0.7), "n_seeds": 1}
    sel = choose([und, mad, lab])
    assert sel.point["defense"] == "label_only" and not sel.beats_label_only
    assert "mad is 0.34 points lower, inside the seed spread: noise" in sel.reason
    # below label_only's best seed on every seed: a real win
    three = {**mad, "n_seeds": 3, "attacker_accuracy_strongest": 0.31, "attacker_accuracy_strongest_min": 0.298,
             "attacker_accuracy_strongest_max": 0.326}
    sel = choose([und, three, lab])
    assert sel.point is three and sel.beats_label_only and "outside the seed spread" in sel.reason
    one = {**mad, **{f"attacker_accuracy_strongest{k}": 0.385 for k in ("", "_min", "_max")}}
    # one seed, below label_only's worst seed: counted
    assert choose([und, one, lab]).point is one
    # one seed on both sides: nothing is known about the spread, so no win counts, and the reason says so
    sel = choose([_point("identity", 0.9, 0.9, 0.5, n_seeds=1), _point("mad", 0.9, 0.9, 0.44, n_seeds=1),
                  _point("label_only", 0.9, 0.9, 0.45, n_seeds=1)])
    assert sel.point["defense"] == "label_only" and not sel.beats_label_only
    assert ("mad is 1.00 points lower, inside the seed spread (one seed each, so the spread is unknown: measure both "
            "at more seeds, e.g. --seeds 0,1,2): noise") in sel.reason


def test_the_selection_reason_gives_the_noisy_win_paired_by_seed():
    """The in-distribution case (2026-12-02): MAD 0.7 lower than label_only on each of the 3 seeds, but the
    min-max ranges overlap and 3 of 3 is no paired win (sign test p = 1/8 > 0.05). Noise: label_only is
    recommended; the reason adds the paired per-seed differences, and only on the seeds both points share."""
    def seeds(defense, values, **extra):
        config = json.dumps({"name": defense, **extra})
        return [{"defense_config": config, "seed": s, "attacker_accuracy_strongest": v}
                for s, v in enumerate(values)]

    lab_seeds, mad_seeds = seeds("label_only", [0.70, 0.80, 0.75]), seeds("mad", [0.68, 0.795, 0.744], epsilon=0.7)
    und = {**_point("identity", 0.9, 0.9, 0.82), "n_seeds": 1, "defense_config": json.dumps({"name": "identity"})}
    lab = {**_point("label_only", 0.9, 0.9, 0.75), "n_seeds": 3, "attacker_accuracy_strongest_min": 0.70,
           "attacker_accuracy_strongest_max": 0.80, "defense_config": lab_seeds[0]["defense_config"]}
    mad = {**_point("mad", 0.9, 0.897, 0.7397, l1=0.7), "n_seeds": 3, "attacker_accuracy_strongest_min": 0.68,
           "attacker_accuracy_strongest_max": 0.795, "defense_config": mad_seeds[0]["defense_config"]}
    per_seed = [*lab_seeds, *mad_seeds, {"defense_config": und["defense_config"], "seed": 0,
                                         "attacker_accuracy_strongest": 0.82}]
    sel = choose([und, mad, lab], per_seed=per_seed)
    assert sel.point is lab and not sel.beats_label_only
    assert ("mad is 1.03 points lower, inside the seed spread: noise (paired by seed vs label_only: -1.0 "
            "(-2.0 / -0.5 / -0.6 on seeds 0,1,2; lower on 3 of 3, sign test p = 0.125))") in sel.reason
    assert "paired" not in choose([und, mad, lab]).reason  # without the per-seed rows: the rule alone
    # a real win carries its paired difference too
    mad_far = seeds("mad", [0.60, 0.65, 0.62], epsilon=0.7)
    far = {**mad, "attacker_accuracy_strongest": 0.6233, "attacker_accuracy_strongest_min": 0.60,
           "attacker_accuracy_strongest_max": 0.65}
    sel = choose([und, far, lab], per_seed=[*lab_seeds, *mad_far])
    assert sel.point is far and "; paired by seed vs label_only: -12.7 (-10.0 / -15.0 / -13.0" in sel.reason


def _seeded(defense: str, values: list[float], **extra) -> tuple[dict, list[dict]]:
    """A point with the mean / min / max of ``values`` over seeds 0.. and its per-seed rows."""
    config = json.dumps({"name": defense, **extra})
    rows = [{"defense_config": config, "seed": s, "attacker_accuracy_strongest": v, "threads": 1}
            for s, v in enumerate(values)]
    point = {**_point(defense, 0.9228, 0.9143 if defense != "label_only" else 0.9228, sum(values) / len(values),
                      l1=0.09 if defense != "label_only" else 0.07),
             "n_seeds": len(values), "attacker_accuracy_strongest_min": min(values),
             "attacker_accuracy_strongest_max": max(values), "defense_config": config}
    return point, rows


def test_a_win_lower_on_every_one_of_5_paired_seeds_counts_though_the_ranges_overlap():
    """Session 13's paper-protocol measurement: ood_gated(tau 0.565, label_only inside, MAD l1 2 outside) is
    38.0 / 35.2 / 34.5 / 31.5 / 34.0 % against label_only's 43.8 / 37.4 / 43.3 / 40.7 / 41.9 %: the ranges
    overlap by 0.6 points (38.0 >= 37.4), but it is lower on all 5 paired seeds (sign test p = 1/32 <= 0.05)."""
    und, und_rows = _seeded("identity", [0.535])
    lab, lab_rows = _seeded("label_only", [0.438, 0.374, 0.433, 0.407, 0.419])
    ood, ood_rows = _seeded("ood_gated", [0.380, 0.352, 0.345, 0.315, 0.340], tau=0.565)
    sel = choose([und, ood, lab], per_seed=[*und_rows, *lab_rows, *ood_rows])
    assert sel.point is ood and sel.beats_label_only
    assert ("6.78 points below label_only (inside the min-max seed spread, but a paired win); paired by seed vs "
            "label_only: -6.8 (-5.8 / -2.2 / -8.8 / -9.2 / -7.9 on seeds 0,1,2,3,4; lower on 5 of 5, sign test "
            "p = 0.0312 <= 0.05: a win beyond noise)") in sel.reason
    assert sel.reason.count("sign test") == 1
    # without the per-seed rows only the range rule speaks: noise
    assert choose([und, ood, lab]).point is lab
    # 4 paired seeds, or one seed where it is not lower, or a seed at another thread count: not enough
    four = [r for r in [*lab_rows, *ood_rows] if r["seed"] < 4]
    assert choose([und, ood, lab], per_seed=four).point is lab
    flipped = [*lab_rows, *ood_rows[:4], {**ood_rows[4], "attacker_accuracy_strongest": 0.42}]
    assert choose([und, ood, lab], per_seed=flipped).point is lab
    other_threads = [*lab_rows, *ood_rows[:4], {**ood_rows[4], "threads": 2}]
    sel = choose([und, ood, lab], per_seed=other_threads)
    assert sel.point is lab and "not paired: seed 4 at 2 vs 1 threads" in sel.reason
    # a tie on a seed is not "lower"
    tied = [*lab_rows, *ood_rows[:4], {**ood_rows[4], "attacker_accuracy_strongest": 0.419}]
    assert choose([und, ood, lab], per_seed=tied).point is lab


def test_paired_sign_test_matches_a_direct_count():
    """Paired.p_value against the exact binomial tail, computed by hand: P(X >= k), X ~ Bin(n, 1/2)."""
    from math import comb

    from mlflow_project.sweep.select import paired

    for values in ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.5, 0.1, 0.5, 0.1, 0.5, 0.1, 0.5]):
        ref, ref_rows = _seeded("label_only", [0.3] * len(values))
        p, rows = _seeded("mad", values, epsilon=0.7)
        pair = paired(p, ref, [*ref_rows, *rows])
        n, k = len(values), sum(v < 0.3 for v in values)
        assert pair.lower == k and len(pair.seeds) == n
        assert pair.p_value == pytest.approx(sum(comb(n, i) for i in range(k, n + 1)) / 2 ** n)
    assert paired(p, ref, []).p_value == 1.0


def test_a_label_only_with_fewer_seeds_than_the_candidate_is_no_range_to_be_outside_of():
    """Session 13's seed-0-only sweep: label_only at 1 seed (43.8 %), the candidate at 3 seeds [34.5-38.0]. The
    ranges do not overlap, but label_only's has no width; the win is noise until label_only has the seeds."""
    und, _ = _seeded("identity", [0.535])
    lab, _ = _seeded("label_only", [0.438])
    ood, _ = _seeded("ood_gated", [0.380, 0.352, 0.345], tau=0.565)
    sel = choose([und, ood, lab])
    assert sel.point is lab and not sel.beats_label_only
    assert "inside the seed spread (label_only has 1 seed(s) against its 3: measure label_only at the same seeds)" \
        in sel.reason
    lab3, _ = _seeded("label_only", [0.438, 0.420, 0.430])  # with its seeds, outside the spread: a win
    sel = choose([und, ood, lab3])
    assert sel.point is ood and "outside the seed spread" in sel.reason


def test_a_point_over_max_l1_is_not_chosen_and_label_only_over_the_caps_falls_back_to_undefended():
    und = _point("identity", 0.90, 0.90, 0.85, 0.0)
    lab = _point("label_only", 0.90, 0.90, 0.84, 0.30)
    loud = _point("reverse_sigmoid", 0.90, 0.90, 0.30, 1.42)
    assert choose([und, loud, lab], max_l1=1.0).point["defense"] == "label_only"
    assert choose([und, loud, lab], max_l1=1.5).point["defense"] == "reverse_sigmoid"
    sel = choose([und, loud, lab], max_l1=0.2)  # label_only's L1 0.3 breaks the cap too
    assert sel.point["defense"] == "identity" and "undefended" in sel.reason
    with pytest.raises(ValueError, match="max_l1"):
        choose([und, lab], max_l1=-1)
    # the per-defense tables honour the cap as well
    assert attacker_accuracy_at_drops([und, loud, lab], drops=(1.0,), max_l1=1.0)["reverse_sigmoid"] == {1.0: 0.85}
    # a budget of exactly the cap, measured through float32 (mad_argmax at epsilon 1: 1.000000011), is at the cap;
    # a point a hair further over is not
    at_cap = _point("mad_argmax", 0.90, 0.90, 0.50, 1.000000011)
    assert choose([und, at_cap, lab], max_l1=1.0).point["defense"] == "mad_argmax"
    assert choose([und, _point("mad_argmax", 0.90, 0.90, 0.50, 1.00001), lab], max_l1=1.0).point["defense"] == \
        "label_only"


def test_selection_tags_the_right_run_and_clears_the_old_tag(tracking_uri):
    tracking = tracking_uri
    from mlflow_project.lifecycle import tracking as tr

    exp = tr.setup(tracking, "selection")
    client = MlflowClient(tracking)
    key = "feedbeef00000000"
    known = {"identity": (0.95, 0.95, 0.90), "mad_argmax": (0.95, 0.946, 0.55), "mad": (0.95, 0.90, 0.20),
             "label_only": (0.95, 0.95, 0.80)}
    rows = []
    with mlflow.start_run(run_name="parent", tags={"stealguard.kind": "sweep", "stealguard.sweep_key": key}) as par:
        for name, (v, d, a) in known.items():
            with mlflow.start_run(run_name=name, nested=True, tags={
                    "stealguard.kind": "sweep_point", "stealguard.sweep_key": key, "stealguard.point_key": name}) as c:
                mlflow.log_metrics({"victim_accuracy": v, "defender_accuracy": d, "attacker_accuracy": a,
                                    "perturbation_l1_mean": 0.3})
                mlflow.log_param("defense_config", json.dumps({"name": name}))
            rows.append({**_point(name, v, d, a, 0.3), "run_id": c.info.run_id, "accuracy_drop_points": 100 * (v - d)})
    ids = {r["label"]: r["run_id"] for r in rows}

    def tagged():
        return sorted(r.info.run_name for r in sweep_child_runs(client, exp, key)
                      if r.data.tags.get(RECOMMENDED_TAG) == "true")

    rows = [{**r, "n_seeds": 3} for r in rows]  # seeds that agree: every difference is outside the spread
    best = sw.select_and_tag(client, exp, key, par.info.run_id, rows, (1.0, 1.0))
    assert best["run_id"] == ids["mad_argmax"] and tagged() == ["mad_argmax"]
    assert client.get_run(par.info.run_id).data.tags["stealguard.recommended_run_id"] == ids["mad_argmax"]
    best = sw.select_and_tag(client, exp, key, par.info.run_id, rows, (10.0, 1.0))
    assert best["run_id"] == ids["mad"] and tagged() == ["mad"]
    assert find_recommended_run(sweep_key=key, tracking_uri=tracking, experiment="selection").info.run_id == ids["mad"]
    assert find_recommended_run(tracking_uri=tracking, experiment="selection").info.run_id == ids["mad"]
    with pytest.raises(LookupError):
        find_recommended_run(sweep_key="0000000000000000", tracking_uri=tracking, experiment="selection")


def test_an_interrupted_sweep_resumes_from_its_finished_points(tmp_path, victim_dir, tracking_uri):
    tracking = tracking_uri
    preset = get_preset("tiny")
    grid = [{"name": "identity"}, {"name": "rounding", "decimals": 1}, {"name": "label_only"},
            {"name": "reverse_sigmoid", "beta": 0.1, "gamma": 0.2}]
    calls = []

    def failing(cfg, **kw):
        calls.append(cfg.defense["name"])
        if len(calls) == 3:
            raise RuntimeError("simulated crash mid-sweep")
        return evaluate(cfg, **kw)

    with pytest.raises(RuntimeError, match="simulated crash"):
        sw.run_sweep(preset, victim=victim_dir, tracking_uri=tracking, experiment="interrupted",
                     results_dir=tmp_path / "a", progress=False, evaluate_fn=failing, grid=grid)
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("interrupted").experiment_id
    points = client.search_runs([exp], filter_string="tags.`stealguard.kind` = 'sweep_point'")
    assert sorted(r.info.status for r in points) == ["FAILED", "FINISHED", "FINISHED"]
    finished_ids = {r.info.run_id for r in points if r.info.status == "FINISHED"}
    # a report of what is finished so far runs nothing new and covers exactly the finished points
    report = sw.run_sweep(preset, victim=victim_dir, tracking_uri=tracking, experiment="interrupted",
                          results_dir=tmp_path / "r", progress=False, grid=grid, report_only=True)
    assert {p["run_id"] for p in report.points} == finished_ids and report.new_points == 0
    assert (tmp_path / "r" / "points.csv").exists() and (tmp_path / "r" / "attacker_vs_l1.png").exists()

    resumed = sw.run_sweep(preset, victim=victim_dir, tracking_uri=tracking, experiment="interrupted",
                           results_dir=tmp_path / "b", progress=False, grid=grid)
    assert (resumed.reused_points, resumed.new_points) == (2, 2)
    assert finished_ids <= {p["run_id"] for p in resumed.points}
    assert [p["status"] for p in resumed.points] == ["reused", "reused", "new", "new"]
    assert len(client.search_runs([exp], filter_string="tags.`stealguard.kind` = 'sweep'")) == 1  # same parent
    assert all(math.isfinite(p["attacker_accuracy"]) for p in resumed.points)


def test_point_identity_is_stable_and_covers_the_whole_config():
    preset = get_preset("tiny")
    spec = sw.SweepSpec(preset=preset, victim_path="v", victim_hash="abc", grid=defense_grid(preset))
    same = sw.SweepSpec(preset=preset, victim_path="elsewhere", victim_hash="abc", grid=[])
    other_victim = sw.SweepSpec(preset=preset, victim_path="v", victim_hash="abd", grid=[])
    other_budget = sw.SweepSpec(preset=get_preset("tiny", budget=301), victim_path="v", victim_hash="abc", grid=[])
    d = {"name": "mad", "epsilon": 0.5, "norm": "l1"}
    assert spec.point_key(d) == same.point_key(dict(reversed(list(d.items()))))
    assert len({spec.point_key(d), other_victim.point_key(d), other_budget.point_key(d),
                spec.point_key({**d, "epsilon": 0.6})}) == 4
    # the measurement key is the point key of before the thread count (what rekey relies on) ...
    assert spec.measurement_key(d) == sw.stable_hash({**spec.context(), "seed": preset.seed, "defense": d})
    assert spec.point_key(d) == sw.threaded_key(spec.measurement_key(d), 1) != spec.measurement_key(d)
    # ... and the thread count is the point's, like the seed: the sweep key does not hold it
    at2 = sw.SweepSpec(preset=preset, victim_path="v", victim_hash="abc", grid=[], threads=2)
    assert at2.point_key(d) != spec.point_key(d) and at2.sweep_key == spec.sweep_key
    assert spec.point_key(d, seed=1) != spec.point_key(d, seed=0) and "seed" not in spec.context()
    with pytest.raises(ValueError, match="threads"):
        sw.threaded_key(spec.measurement_key(d), 0)


def test_presets_follow_the_paper_gammas_and_validate():
    assert reverse_sigmoid_gamma("fashion_mnist") == 0.4 and reverse_sigmoid_gamma("mnist5k") == 0.2
    assert reverse_sigmoid_gamma("cifar10") == 0.1
    assert {g["gamma"] for g in defense_grid(get_preset("quick")) if g["name"] == "reverse_sigmoid"} == {0.4}
    assert {g["gamma"] for g in defense_grid(get_preset("tiny")) if g["name"] == "reverse_sigmoid"} == {0.2}
    paper = get_preset("paper")
    calibrated = {("label_only", "mad", "max_prob"): 0.565}
    names = {g["name"] for g in defense_grid(paper, calibrated)}
    assert names == {"identity", "mad", "mad_argmax", "reverse_sigmoid", "label_only", "ood_gated"}
    assert {0.6, 0.7, 0.8, 0.9, 0.95} <= {g["epsilon"] for g in defense_grid(paper, calibrated) if g["name"] == "mad"}
    assert (paper.budget, paper.epochs, paper.clone_lr, paper.clone_batch_size, paper.queryset) == (
        50_000, 30, 0.1, 64, "handwriting")
    assert paper.attack_options["momentum"] == 0.5 and paper.attack_options["weight_decay"] == 0.0
    # the paper preset's ood_gated point: the measured best pair (label_only inside, MAD l1 2 outside: every answer
    # one-hot) at its tau calibrated on the victim
    gated = [g for g in defense_grid(paper, calibrated) if g["name"] == "ood_gated"]
    assert paper.ood_gated_max_drop == 0.9 and paper.ood_gated_taus == ()
    assert gated == [{"name": "ood_gated", "tau": 0.565, "inside": {"name": "label_only"},
                      "outside": {"name": "mad", "epsilon": 2.0, "norm": "l1"}}]
    with pytest.raises(ValueError, match=r"ood_gated_max_drop: the taus are calibrated on the victim .*"
                                         r"\('label_only', 'mad', 'max_prob'\)"):
        defense_grid(paper, {("mad_argmax", "mad", "max_prob"): 0.58})
    # explicit taus come first; a calibrated tau already among them is not a second point
    pairs = get_preset("paper", ood_gated_inside="mad_argmax,label_only", ood_gated_epsilon=1.0)
    with_argmax = {("mad_argmax", "mad", "max_prob"): 0.58, ("label_only", "mad", "max_prob"): 0.565}
    assert [(g["tau"], g["inside"]["name"]) for g in defense_grid(pairs, with_argmax) if g["name"] == "ood_gated"] == [
        (0.58, "mad_argmax"), (0.565, "label_only")]
    both = get_preset("paper", ood_gated_taus="0.58,0.7", ood_gated_inside="mad_argmax,label_only")
    assert [(g["tau"], g["inside"]["name"]) for g in defense_grid(both, with_argmax) if g["name"] == "ood_gated"] == [
        (0.58, "mad_argmax"), (0.58, "label_only"), (0.7, "mad_argmax"), (0.7, "label_only"), (0.565, "label_only")]
    with pytest.raises(ValueError, match=r"ood_gated_epsilon: the inner MAD-family l1 budget must be in \(0, 2\]"):
        get_preset("paper", ood_gated_epsilon=2.5)
    one = sw.preset_from_args(sw._parser().parse_args(["--preset", "paper", "--ood-gated-epsilon", "1"]))
    assert [g["outside"] for g in defense_grid(one, calibrated) if g["name"] == "ood_gated"] == [
        {"name": "mad", "epsilon": 1.0, "norm": "l1"}]
    with pytest.raises(ValueError, match=r"ood_gated_max_drop: must be in \[0, 100\]"):
        get_preset("paper", ood_gated_max_drop=-0.5)
    one = sw.preset_from_args(sw._parser().parse_args(["--preset", "paper", "--ood-gated-taus", "0.9",
                                                       "--ood-gated-inside", "mad_argmax",
                                                       "--ood-gated-outside", "label_only",
                                                       "--ood-gated-max-drop", "0"]))
    assert [(g["tau"], g["inside"], g["outside"]["name"]) for g in defense_grid(one) if g["name"] == "ood_gated"] == [
        (0.9, {"name": "mad_argmax", "epsilon": 2.0, "norm": "l1"}, "label_only")]  # the preset's inner l1 2
    # the gaussian score: a point per score, each carrying the statistics fitted on the victim
    from plugins import validate_config
    from plugins.ood import fit_posterior_gaussian

    stats = fit_posterior_gaussian(torch.softmax(torch.randn(200, 10) * 4, 1)).model_dump()
    scores = sw.preset_from_args(sw._parser().parse_args(["--preset", "paper", "--ood-gated-scores",
                                                          "max_prob,gaussian"]))
    assert scores.ood_gated_scores == ("max_prob", "gaussian")
    gated = [g for g in defense_grid(scores, {**calibrated, ("label_only", "mad", "gaussian"): 3e-4}, stats)
             if g["name"] == "ood_gated"]
    assert [(g["tau"], g.get("score", "max_prob")) for g in gated] == [(0.565, "max_prob"), (3e-4, "gaussian")]
    assert gated[1]["gaussian"] == stats and validate_config(gated[1]).gaussian.model_dump() == stats
    assert describe(gated[1]) == "ood_gated(tau=0.0003, score=gaussian, inside=label_only, outside=mad(epsilon=2))"
    with pytest.raises(ValueError, match="score 'gaussian' needs the statistics fitted on the victim"):
        defense_grid(scores, {**calibrated, ("label_only", "mad", "gaussian"): 3e-4})
    with pytest.raises(ValueError, match=r"no calibrated tau for the \(inside, outside, score\) gates "
                                         r"\[\('label_only', 'mad', 'gaussian'\)\]"):
        defense_grid(scores, calibrated, stats)
    with pytest.raises(ValueError, match="ood_gated_scores: each must be one of max_prob, gaussian"):
        get_preset("paper", ood_gated_scores="energy")
    assert get_preset("quick", seeds="0,1,2").all_seeds == (0, 1, 2) and get_preset("quick").all_seeds == (0,)
    assert get_preset("quick", mad_epsilons="0.2,0.4").mad_epsilons == (0.2, 0.4)
    with pytest.raises(ValueError, match="preset"):
        get_preset("huge")
    with pytest.raises(ValueError, match="budget"):
        get_preset("quick", budget=0)
    with pytest.raises(ValueError, match="mad_epsilons"):
        get_preset("quick", mad_epsilons="a,b")


def test_report_tables_are_computed_from_the_csv(tiny, tmp_path):
    from mlflow_project.sweep import report as sweep_report

    first = tiny["first"]
    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"intro\n{sweep_report.BEGIN}\nstale\n{sweep_report.END}\noutro\n")
    sweep_report.main([str(first.artifacts["csv"]), "--plots-dir", str(tmp_path / "plots"), "--into", str(doc)])
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text
    at = attacker_accuracy_at_drops(first.points, max_l1=1.0)  # the sweep's cap (selection.json)
    for name, row in at.items():
        cells = " | ".join(f"{100 * row[d]:.1f}" for d in (0.5, 1.0, 5.0))
        assert f"| {name} | {cells} |" in text
    assert "1 seed each, spread unknown" in text and "| strongest | soft | top-1 |" in text
    assert "a mean L1 perturbation of at most 1 on the test set" in text
    assert len(list((tmp_path / "plots").glob("*.png"))) == 4


def test_report_drop_columns_leave_out_points_over_the_l1_cap(tiny, tmp_path):
    """A point that beats every attacker but moves the probabilities by more than the cap does not count: its
    defense reads as the undefended point, and no point over the cap is named best (issue 21, item 6)."""
    from mlflow_project.sweep import report as sweep_report

    src = Path(tiny["first"].artifacts["csv"])
    rows = list(csv.DictReader(src.open()))
    loud = next(r for r in rows if r["defense"] == "reverse_sigmoid")
    loud.update(perturbation_l1_mean="1.5", attacker_accuracy_strongest="0.0", attacker_accuracy_soft="0.0",
                attacker_accuracy_top1="0.0", attacker_accuracy="0.0")
    (tmp_path / "s").mkdir()
    out = tmp_path / "s" / "points.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    und = next(r for r in rows if r["defense"] == "identity")
    undefended = f"{100 * float(und['attacker_accuracy_strongest']):.1f}"

    def row_of(text: str) -> list[str]:
        line = next(x for x in text.splitlines() if x.startswith("| reverse_sigmoid |"))
        return [c.strip() for c in line.strip("|").split("|")]

    capped = row_of(sweep_report.table(out))  # no selection.json here: the default cap, 1.0
    assert capped[1:4] == [undefended] * 3 and capped[4] == "(none within the caps: undefended)"
    loose = row_of(sweep_report.table(out, max_l1=2.0))
    assert loose[1:4] == ["0.0"] * 3 and loose[4] == loud["label"]
    # a committed copy, docs/results/<sweep>.points.csv, reads its caps and preset from <sweep>.selection.json
    committed = tmp_path / "paper-x.points.csv"
    committed.write_text(out.read_text())
    (tmp_path / "paper-x.selection.json").write_text(json.dumps(
        {"max_l1": 2.0, "preset": {"attack": "knockoff", "queryset": "digits", "budget": 300, "epochs": 3}}))
    text = sweep_report.table(committed)
    assert text.startswith("**knockoff** attacker, query set **digits**, budget 300, clone epochs 3 (sweep `paper-x`")
    assert row_of(text)[1:4] == ["0.0"] * 3


def test_seeds_are_points_of_one_sweep_and_adding_seeds_runs_only_the_new_ones(tmp_path, victim_dir, tracking_uri):
    grid = [{"name": "identity"}, {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1"}, {"name": "label_only"}]
    two = get_preset("tiny", seeds="0,1", multi_seed_points=("identity", "label_only"))
    first = sw.run_sweep(two, victim=victim_dir, tracking_uri=tracking_uri, experiment="seeds",
                         results_dir=tmp_path / "a", progress=False, grid=grid)
    assert [(p["label"], p["seed"]) for p in first.points] == [
        ("identity", 0), ("mad_argmax(epsilon=0.5)", 0), ("label_only", 0), ("identity", 1), ("label_only", 1)]
    three = get_preset("tiny", seeds="0,1,2", multi_seed_points=("identity", "label_only"))
    second = sw.run_sweep(three, victim=victim_dir, tracking_uri=tracking_uri, experiment="seeds",
                          results_dir=tmp_path / "b", progress=False, grid=grid)
    assert second.parent_run_id == first.parent_run_id and (second.reused_points, second.new_points) == (5, 2)
    means = {p["label"]: p for p in sw.read_points(second.artifacts["csv_mean"])}
    und = means["identity"]
    assert und["n_seeds"] == 3 and und["seeds"] == "0,1,2" and means["mad_argmax(epsilon=0.5)"]["n_seeds"] == 1
    per_seed = [p["attacker_accuracy_strongest"] for p in second.points if p["label"] == "identity"]
    assert und["attacker_accuracy_strongest"] == pytest.approx(sum(per_seed) / 3)
    assert (und["attacker_accuracy_strongest_min"], und["attacker_accuracy_strongest_max"]) == (min(per_seed),
                                                                                                max(per_seed))
    assert second.recommended is not None and second.recommended["n_seeds"] in (1, 3)
    from mlflow_project.sweep import report as sweep_report

    text = sweep_report.table(second.artifacts["csv"])
    assert "vs undefended" in text and ("inside the seed spread" in text or "outside the seed spread" in text)
    with pytest.raises(ValueError, match="multi_seed_points"):
        sw.point_seeds(get_preset("tiny", seeds="0,1", multi_seed_points=("nope",)), grid)


def test_a_second_driver_of_the_same_sweep_reports_the_first_ones_seeds_too(tmp_path, victim_dir, tracking_uri):
    """Two drivers of one sweep (seeds 0, then seeds 1 with the same grid) share its parent run; the second's
    outputs, logged to that parent, hold both seeds (seed 0's rows as status ``stored``), not only its own."""
    grid = [{"name": "identity"}, {"name": "label_only"}]
    first = sw.run_sweep(get_preset("tiny", seeds="0"), victim=victim_dir, tracking_uri=tracking_uri,
                         experiment="drivers", results_dir=tmp_path / "a", progress=False, grid=grid)
    second = sw.run_sweep(get_preset("tiny", seeds="1"), victim=victim_dir, tracking_uri=tracking_uri,
                          experiment="drivers", results_dir=tmp_path / "b", progress=False, grid=grid)
    assert second.parent_run_id == first.parent_run_id and second.new_points == 2
    assert [(p["label"], int(p["seed"]), p["status"]) for p in sw.read_points(second.artifacts["csv"])] == [
        ("identity", 1, "new"), ("label_only", 1, "new"), ("identity", 0, "stored"), ("label_only", 0, "stored")]
    assert {p["label"]: int(p["n_seeds"]) for p in sw.read_points(second.artifacts["csv_mean"])} == {
        "identity": 2, "label_only": 2}
    by_run = {p["run_id"] for p in first.points}
    assert {p["run_id"] for p in second.points if p["status"] == "stored"} == by_run  # the first driver's runs
    report = sw.run_sweep(get_preset("tiny", seeds="0"), victim=victim_dir, tracking_uri=tracking_uri,
                          experiment="drivers", results_dir=tmp_path / "c", progress=False, grid=grid,
                          report_only=True)
    assert sorted((p["label"], int(p["seed"])) for p in report.points) == [
        ("identity", 0), ("identity", 1), ("label_only", 0), ("label_only", 1)]


def test_point_labels_split_on_top_level_commas_only():
    text = "identity, ood_gated(tau=0.9, inside=mad_argmax(epsilon=1), outside=label_only),mad(epsilon=0.9)"
    assert sw.split_labels(text) == ("identity", "ood_gated(tau=0.9, inside=mad_argmax(epsilon=1), "
                                     "outside=label_only)", "mad(epsilon=0.9)")


def test_a_fresh_store_imports_the_points_of_an_earlier_points_csv_and_runs_only_the_rest(tmp_path, victim_dir,
                                                                                            capsys):
    """--import-from: a session's store is gone but its points.csv is committed; a new store records those points
    (same keys, metrics, params, defense.json) and evaluates only what the CSV lacks (here a top_k point)."""
    from mlflow_project.lifecycle.register import config_from_run

    grid = [{"name": "identity"}, {"name": "top_k", "k": 2}, {"name": "label_only"}]
    first = sw.run_sweep("tiny", victim=victim_dir, tracking_uri=uri(tmp_path / "a.db"), results_dir=tmp_path / "a",
                         progress=False, grid=grid[::2])
    csv_path = first.artifacts["csv"]
    fresh = uri(tmp_path / "b.db")
    second = sw.run_sweep("tiny", victim=victim_dir, tracking_uri=fresh, results_dir=tmp_path / "b",
                          progress=False, grid=grid, import_from=[csv_path])
    assert (second.new_points, second.reused_points, second.imported_points) == (1, 2, 2)
    assert [p["label"] for p in second.points] == ["identity", "top_k(k=2)", "label_only"]
    old = {p["point_key"]: p for p in first.points}
    client = MlflowClient(fresh)
    for p in second.points:
        if p["label"] == "top_k(k=2)":
            assert p["status"] == "new" and p["k"] == 2
            continue
        before = old[p["point_key"]]
        assert p["run_id"] != before["run_id"]  # a run of the fresh store ...
        for k in sw.METRIC_COLUMNS:  # ... carrying the CSV's measurements
            assert p[k] == pytest.approx(before[k], nan_ok=True), k
        run = client.get_run(p["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == second.parent_run_id
        assert run.data.tags["stealguard.imported_from"] == f"{csv_path} run {before['run_id']}"
        config, victim, tuned = config_from_run(client, p["run_id"], tmp_path / "dl")  # what register reads
        assert config == json.loads(p["defense_config"]) and victim == str(victim_dir) and tuned["dataset"] == "digits"
    # the store now holds them: a rerun without the CSV imports and evaluates nothing
    third = sw.run_sweep("tiny", victim=victim_dir, tracking_uri=fresh, results_dir=tmp_path / "c", progress=False,
                         grid=grid)
    assert (third.new_points, third.reused_points, third.imported_points) == (0, 3, 0)
    # rows of another sweep (other point keys) are ignored, a missing file is an error that names it
    other = sw.run_sweep(get_preset("tiny", budget=120), victim=victim_dir, tracking_uri=fresh,
                         results_dir=tmp_path / "d", progress=False, grid=grid[:1], import_from=[csv_path])
    assert (other.new_points, other.imported_points) == (1, 0)
    # ... and the user is told why nothing was imported, with the victim the file's rows were measured on
    accuracy = f"{100 * first.points[0]['victim_accuracy']:.2f} %"
    err = capsys.readouterr().err
    assert f"none of the 2 rows of {csv_path} is a point of this sweep" in err and accuracy in err
    assert "--victim" in err
    with pytest.raises(FileNotFoundError, match="no points.csv at"):
        sw.run_sweep("tiny", victim=victim_dir, tracking_uri=fresh, results_dir=tmp_path / "e", progress=False,
                     grid=grid, import_from=[tmp_path / "missing.csv"])


def test_the_top_k_grid_is_opt_in_and_validated():
    assert not [c for c in defense_grid(get_preset("paper", ood_gated_max_drop=0)) if c["name"] == "top_k"]
    grid = defense_grid(get_preset("paper", top_k_ks="2,3", ood_gated_max_drop=0))
    assert [c for c in grid if c["name"] == "top_k"] == [{"name": "top_k", "k": 2}, {"name": "top_k", "k": 3}]
    assert describe({"name": "top_k", "k": 2}) == "top_k(k=2)"
    with pytest.raises(ValueError, match="top_k_ks"):
        get_preset("paper", top_k_ks="0")


def test_report_compares_a_one_seed_point_with_a_three_seed_reference_by_its_range():
    from mlflow_project.sweep import report as sweep_report

    lab = {"n_seeds": 3, "attacker_accuracy_strongest": 0.433, "attacker_accuracy_strongest_min": 0.390,
           "attacker_accuracy_strongest_max": 0.457}
    mad = {"n_seeds": 1, "attacker_accuracy_strongest": 0.4296}
    assert sweep_report.spread_note(mad, lab, "label_only") == "vs label_only: -0.3 (inside label_only's seed spread)"
    low = {**mad, "attacker_accuracy_strongest": 0.31}
    assert sweep_report.spread_note(low, lab, "label_only") == "vs label_only: -12.3 (outside label_only's seed spread)"
    assert sweep_report.spread_note(lab, mad, "mad").endswith("(inside its seed spread)")


def test_the_cached_victim_and_misinformation_model_train_at_a_fixed_thread_count(tmp_path, monkeypatch):
    """CPU training is reproducible bit for bit only at one thread count; the cached models (whose weights hash is
    in every point key) must not depend on --threads, or --import-from stops matching on a new machine."""
    import torch

    from mlflow_project.lab import train_misinformation as tm
    from mlflow_project.lab import train_victim as tv

    seen = []

    def spy(real):
        def wrapper(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(tv, "train_victim", spy(tv.train_victim))
    monkeypatch.setattr(tm, "train_misinformation", spy(tm.train_misinformation))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vict, path = sw.resolve_victim(get_preset("tiny"), cache_dir=tmp_path, progress=False)
        assert torch.get_num_threads() == 2  # restored
        sw.resolve_misinformation(get_preset("tiny"), vict, path, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [sw.CACHED_TRAINING_THREADS] * 2
