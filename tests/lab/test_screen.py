"""screen: a defense config's benign cost and attacker-side flips without a clone, cross-checked against evaluate."""

from __future__ import annotations

import json

import pytest
import torch

from mlflow_project.lab import screen as sc
from mlflow_project.lab.evaluate import EvalConfig, evaluate

MAD1 = {"name": "mad", "epsilon": 1.0, "norm": "l1"}
GATED = {"name": "ood_gated", "tau": 0.9, "inside": {"name": "mad_argmax", "epsilon": 1.0},
         "outside": {"name": "mad", "epsilon": 1.0}}


@pytest.fixture(scope="module")
def screened(digits_victim):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sc.screen(digits_victim, [{"name": "identity"}, {"name": "label_only"}, MAD1, GATED], "mnist5k",
                         budget=600, seed=3, taus=(0.0, 0.5, 0.9, 1.01))
    finally:
        torch.set_num_threads(before)


def test_top1_keeping_defenses_are_bounded_by_label_only_and_mad_is_not(screened):
    identity, label_only, mad, gated = screened["rows"]
    assert screened["queries"] == 600
    for r in (identity, label_only):
        assert r["query_top1_flip_rate"] == 0.0 and r["top1_flip_rate"] == 0.0 and r["accuracy_drop_points"] == 0.0
        assert r["within_caps"] and r["bound"].startswith("strongest >= label_only")
    assert identity["perturbation_l1_mean"] == 0.0 and identity["query_l1_mean"] == 0.0
    assert mad["perturbation_l1_mean"] == pytest.approx(1.0, abs=1e-5) and mad["query_top1_flip_rate"] > 0
    assert mad["bound"] == ""
    # the gate spares the confident test rows that MAD flips: fewer benign flips, and fewer attacker flips
    assert gated["top1_flip_rate"] < mad["top1_flip_rate"]
    assert 0 < gated["query_top1_flip_rate"] <= mad["query_top1_flip_rate"]


def test_gate_rates_are_monotone_and_bounded(screened, digits_victim):
    g = screened["gate"]
    assert [x["tau"] for x in g] == [0.0, 0.5, 0.9, 1.01]
    assert g[0] == {"tau": 0.0, "test": 0.0, "test_correct": 0.0, "queries": 0.0}
    assert g[-1]["test"] == 1.0 and g[-1]["queries"] == 1.0
    assert g[-1]["test_correct"] == pytest.approx(screened["victim_accuracy"])
    for a, b in zip(g, g[1:], strict=False):
        assert a["test"] <= b["test"] and a["queries"] <= b["queries"] and a["test_correct"] <= b["test_correct"]
    for x in g:
        assert x["test_correct"] <= x["test"]
    # the gated config's flips happen only on gated rows: at most the gate's share at its tau
    gated = screened["rows"][3]
    assert gated["top1_flip_rate"] <= g[2]["test"] and gated["query_top1_flip_rate"] <= g[2]["queries"]


@pytest.mark.parametrize("config", [MAD1, GATED], ids=["mad", "ood_gated"])
def test_figures_match_what_evaluate_measures_with_a_clone(config, digits_victim, digits_victim_dir, screened):
    """The independent path: evaluate answers the same Knockoff draw through LocalOracle and trains a clone; its
    defender metrics and attacker-query flip rate are screen's, to float precision."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = evaluate(EvalConfig(dataset="digits", victim=str(digits_victim_dir), defense=config, queryset="mnist5k",
                                budget=600, epochs=1, seed=3), digits_victim, progress=False)
    finally:
        torch.set_num_threads(before)
    mine = screened["rows"][{"mad": 2, "ood_gated": 3}[config["name"]]]
    for key in ("defender_accuracy", "perturbation_l1_mean", "top1_flip_rate", "defender_nll", "query_top1_flip_rate"):
        assert mine[key] == pytest.approx(r.metrics[key], abs=1e-9), key


def test_cli_prints_the_table_and_writes_json(digits_victim_dir, tmp_path, capsys):
    out = tmp_path / "screen.json"
    result = sc.main(["--victim", str(digits_victim_dir), "--queryset", "digits", "--budget", "300",
                      "--gate-taus", "0.7,0.9", "--defense", "label_only", "--defense", json.dumps(MAD1),
                      "--max-drop", "0", "--out", str(out)])
    text = capsys.readouterr().out
    assert "gate max p < tau fires on" in text and "label_only" in text and "mad(epsilon=1" in text
    assert json.loads(out.read_text())["rows"][1]["label"] == result["rows"][1]["label"]
    assert [r["within_caps"] for r in result["rows"]] == [True, result["rows"][1]["accuracy_drop_points"] <= 0]


def test_bad_arguments_say_what_is_allowed(digits_victim_dir):
    with pytest.raises(SystemExit):
        sc.main(["--victim", str(digits_victim_dir)])  # nothing to screen
    with pytest.raises(ValueError, match="gate-taus: expected a comma-separated list of numbers"):
        sc.main(["--victim", str(digits_victim_dir), "--gate-taus", "0.5,high"])
    with pytest.raises(ValueError, match="mnist5k"):
        sc.main(["--victim", str(digits_victim_dir), "--queryset", "emnist", "--defense", "label_only"])


def test_calibrate_tau_is_the_largest_tau_within_the_drop(digits_victim):
    """Against the slow path: the real ood_gated defense's drop at every tau of the grid, through screen_config."""
    from mlflow_project.lab import data

    inside, outside = {"name": "label_only"}, MAD1
    taus = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # 0.3 .. 0.95
    test_x, test_y = data.load_raw("digits", "test")
    test_x = data.adapt(test_x, digits_victim.spec)
    probs = sc.predict_probs(digits_victim.model, test_x)
    drops = {t: sc.screen_config(digits_victim, {"name": "ood_gated", "tau": t, "inside": inside, "outside": outside},
                                 test_x, test_y, probs, test_x[:8], probs[:8], 1.0, 1.0)["accuracy_drop_points"]
             for t in taus}
    levels = sorted(set(drops.values()))
    assert len(levels) >= 3, drops  # the grid spans several drops, so the choice below is not trivial
    for max_drop in levels[1:-1]:
        found = sc.calibrate_tau(digits_victim, inside, outside, max_drop, taus=taus)
        assert found["tau"] == max(t for t in taus if drops[t] <= max_drop)
        assert found["drop"] == pytest.approx(drops[found["tau"]], abs=1e-9)
        assert found["gated"] == pytest.approx((probs.max(1).values < found["tau"]).double().mean().item())
    with pytest.raises(ValueError, match=r"ood_gated_max_drop: no tau in \[0.3, 0.95\] keeps ood_gated"):
        sc.calibrate_tau(digits_victim, MAD1, outside, 0.0, taus=taus)
    assert sc.CALIBRATION_TAUS[0] == 0.1 and sc.CALIBRATION_TAUS[-1] == 0.995 and len(sc.CALIBRATION_TAUS) == 180


def test_the_gaussian_gate_is_fitted_on_the_training_posteriors_and_calibrated_like_max_prob(
        digits_victim, digits_victim_dir, tmp_path):
    """--fit-gaussian writes what fit_gaussian fits (the victim's training posteriors); calibrate_tau with it is the
    largest typicality tau within the drop, against the real ood_gated defense at every tau of a grid."""
    from mlflow_project.lab import data
    from plugins.ood import PosteriorGaussian, fit_posterior_gaussian, gaussian_typicality

    out = tmp_path / "gaussian.json"
    sc.main(["--victim", str(digits_victim_dir), "--fit-gaussian", str(out)])
    stats = PosteriorGaussian.model_validate(json.loads(out.read_text()))
    train_x, _ = data.load_raw("digits", "train")
    expected = fit_posterior_gaussian(sc.predict_probs(digits_victim.model, data.adapt(train_x, digits_victim.spec)))
    assert stats == expected == sc.fit_gaussian(digits_victim)
    inside, outside = {"name": "label_only"}, MAD1
    taus = (1e-12, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5)
    test_x, test_y, probs = sc.victim_test_set(digits_victim)
    gate = {"score": "gaussian", "gaussian": stats.model_dump()}
    drops = {t: sc.screen_config(digits_victim, {"name": "ood_gated", "tau": t, "inside": inside, "outside": outside,
                                                 **gate}, test_x, test_y, probs, test_x[:8], probs[:8], 1.0,
                                 1.0)["accuracy_drop_points"] for t in taus}
    levels = sorted(set(drops.values()))
    assert len(levels) >= 3, drops
    typical = gaussian_typicality(probs, stats)
    for max_drop in levels[1:-1]:
        found = sc.calibrate_tau(digits_victim, inside, outside, max_drop, taus=taus, gaussian=stats)
        assert found["tau"] == max(t for t in taus if drops[t] <= max_drop)
        assert found["gated"] == pytest.approx((typical < found["tau"]).double().mean().item())
    assert sc.GAUSSIAN_CALIBRATION_TAUS[0] == 0.501 and sc.GAUSSIAN_CALIBRATION_TAUS[-1] == 1e-15


def test_score_rates_take_the_asked_share_of_the_test_set(digits_victim, capsys):
    """score_rates against a direct count; screen reports both gate scores and the table prints them."""
    scores_test = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], dtype=torch.float64)
    correct = torch.tensor([True, False] * 5)
    scores_q = torch.tensor([0.05, 0.15, 0.95, 0.35], dtype=torch.float64)
    (r,) = sc.score_rates(scores_test, correct, scores_q, [0.25])
    assert r["tau"] == pytest.approx(0.325) and r["test"] == 0.3 and r["test_correct"] == 0.2
    assert r["queries"] == 0.5
    res = sc.screen(digits_victim, [], "mnist5k", budget=400, seed=0, fractions=(0.01, 0.05))
    assert set(res["scores"]) == {"max_prob", "gaussian"}
    for rates in res["scores"].values():
        assert [g["fraction"] for g in rates] == [0.01, 0.05]
        assert all(abs(g["test"] - g["fraction"]) <= 0.02 and 0 <= g["queries"] <= 1 for g in rates)
    print(sc.table(res))
    assert "gate score gaussian < tau takes" in capsys.readouterr().out
