"""evaluate: every metric logged to MLflow, one-screen summary, reproducible with fixed seeds."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from mlflow_project.lab import evaluate as ev

BASE = ["--dataset", "digits", "--queryset", "digits", "--budget", "200", "--epochs", "3", "--batch-size", "32",
        "--no-progress"]


def test_evaluate_logs_every_metric(tracking_uri, digits_victim_dir, capsys):
    defense = {"name": "random_noise", "epsilon": 2.0, "norm": "l2"}
    metrics = ev.main(BASE + ["--victim", str(digits_victim_dir), "--defense", json.dumps(defense),
                              "--attack", "knockoff"])
    out = capsys.readouterr().out
    assert "attacker accuracy" in out and "defender accuracy" in out and len(out.splitlines()) <= 24
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("stealguard").experiment_id])
    logged = run.data.metrics
    expected = set(ev.METRICS) - {"angular_deviation_mean"}  # MAD family only
    assert expected <= set(logged)
    assert logged["queries"] == 200
    assert 0.9 < logged["victim_accuracy"] <= 1
    n_test = len(ev.data.load_raw("digits", "test")[1])
    for k in ("victim_accuracy", "defender_accuracy", "attacker_accuracy"):  # fractions of the test set's images
        assert logged[k] * n_test == pytest.approx(round(logged[k] * n_test), abs=1e-3), k
    assert logged["perturbation_l1_mean"] > 0 and logged["perturbation_l1_max"] >= logged["perturbation_l1_mean"]
    assert logged["kl_mean"] > 0
    for k in expected:
        assert logged[k] == pytest.approx(metrics[k])
    p = run.data.params
    assert p["attack"] == "knockoff" and p["budget"] == "200" and p["seed"] == "0" and p["oracle"] == "local"
    assert json.loads(p["defense"]) == defense and p["queryset"] == "digits"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluation.png", "summary.txt", "defense.json"} <= arts


def test_identity_defense_costs_nothing_and_label_only_flips_nothing(digits_victim):
    cfg = ev.EvalConfig(dataset="digits", defense={"name": "identity"}, attack="knockoff", budget=100, epochs=1)
    r = ev.evaluate(cfg, victim=digits_victim, progress=False)
    assert r.metrics["defender_accuracy"] == r.metrics["victim_accuracy"]
    assert r.metrics["perturbation_l1_max"] == 0 and r.metrics["top1_flip_rate"] == 0
    cfg = ev.EvalConfig(dataset="digits", defense={"name": "label_only"}, attack="knockoff", budget=100, epochs=1)
    r = ev.evaluate(cfg, victim=digits_victim, progress=False)
    assert r.metrics["defender_accuracy"] == r.metrics["victim_accuracy"] and r.metrics["top1_flip_rate"] == 0
    assert r.metrics["perturbation_l1_mean"] > 0


def test_fixed_seeds_reproduce(digits_victim):
    cfg = ev.EvalConfig(dataset="digits", defense={"name": "random_noise", "epsilon": 1.0}, attack="jbda",
                        budget=300, epochs=3, batch_size=32, seed=7)
    a = ev.evaluate(cfg, victim=digits_victim, progress=False).metrics
    b = ev.evaluate(cfg, victim=digits_victim, progress=False).metrics
    assert abs(a["attacker_accuracy"] - b["attacker_accuracy"]) <= 0.005
    assert a["queries"] == b["queries"] == 300


def test_mad_logs_angular_deviation(digits_victim):
    cfg = ev.EvalConfig(dataset="digits", defense={"name": "mad", "epsilon": 0.5, "norm": "l1"},
                        attack="knockoff", budget=100, epochs=1)
    r = ev.evaluate(cfg, victim=digits_victim, progress=False)
    assert r.metrics["angular_deviation_mean"] > 0
    assert r.metrics["perturbation_l1_max"] <= 0.5 + 1e-4


def test_observers_see_both_stages(digits_victim):
    seen = []
    cfg = ev.EvalConfig(dataset="digits", attack="knockoff", budget=50, epochs=1)
    ev.evaluate(cfg, victim=digits_victim, progress=False, observers=[lambda stage, m: seen.append((stage, m))])
    stages = [s for s, _ in seen]
    assert stages[0] == "defense_batch" and stages[-1] == "attacker" and stages.count("defender") == 1
    assert stages.index("defender") < stages.index("attacker")
    assert "attacker_accuracy" in seen[-1][1]
    batches = [m for s, m in seen if s == "defense_batch"]
    n_test = len(ev.data.load_raw("digits", "test")[1])
    assert sum(len(b["probs"]) for b in batches) == n_test + 50  # the test-set pass and the attack's queries
    assert all(b["perturbed"].shape == b["probs"].shape and b["latency_s"] >= 0 for b in batches)


def test_bad_inputs_say_what_is_allowed(tmp_path, digits_victim):
    with pytest.raises(ValueError, match="allowed: knockoff"):
        ev.EvalConfig(dataset="digits", attack="boost")
    with pytest.raises(ValueError, match="url: oracle=http needs"):
        ev.EvalConfig(dataset="digits", oracle="http")
    with pytest.raises(ValueError, match="neither an inline JSON object, an existing config file nor a defense "
                       "name .*identity"):
        ev.parse_defense("nope.json")
    assert ev.parse_defense("identity") == {"name": "identity"}  # MLproject's default, a bare name
    cfg_file = tmp_path / "d.yaml"
    cfg_file.write_text("name: top_k\nk: 2\n")
    assert ev.parse_defense(str(cfg_file)) == {"name": "top_k", "k": 2}
    with pytest.raises(ValueError, match="trained on 'digits', not 'mnist5k'"):
        ev.evaluate(ev.EvalConfig(dataset="mnist5k"), victim=digits_victim, progress=False)
    with pytest.raises(ValueError, match="unknown defense"):
        ev.evaluate(ev.EvalConfig(dataset="digits", defense={"name": "nope"}), victim=digits_victim, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.load_victim(tmp_path / "missing")


def test_answer_statistics_measure_label_spread_and_confidence():
    import math

    import torch

    even = torch.eye(4).repeat(5, 1) * 0.7 + 0.075  # 20 rows, each class top-1 five times, top-1 prob 0.775
    stats = ev.answer_statistics(even)
    assert stats["query_label_entropy"] == pytest.approx(2.0) and stats["query_confidence_mean"] == pytest.approx(0.775)
    one = torch.tensor([[0.6, 0.2, 0.1, 0.1]] * 7)
    assert ev.answer_statistics(one) == pytest.approx({"query_label_entropy": 0.0, "query_confidence_mean": 0.6})
    skew = torch.eye(4)[torch.tensor([0, 0, 0, 1])]  # shares 3/4, 1/4
    expected = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert ev.answer_statistics(skew)["query_label_entropy"] == pytest.approx(expected)


def test_class_breakdown_lines_up_answer_shares_with_recalls():
    import torch

    class Fixed(torch.nn.Module):  # predicts class 0 for the first half of the inputs, class 1 for the rest
        def forward(self, x):
            n = len(x)
            logits = torch.zeros(n, 3)
            logits[: n // 2, 0] = 5.0
            logits[n // 2 :, 1] = 5.0
            return logits

    x, y = torch.zeros(4, 2), torch.tensor([0, 0, 1, 2])
    answers = torch.eye(3)[torch.tensor([0, 0, 0, 1])]
    out = ev.class_breakdown(answers, Fixed()(x).argmax(1), Fixed()(x).argmax(1), y)
    assert [r["class"] for r in out] == [0, 1, 2]
    assert [r["answer_share"] for r in out] == pytest.approx([0.75, 0.25, 0.0])
    assert [r["clone_recall"] for r in out] == pytest.approx([1.0, 1.0, 0.0])  # class 2 never elicited, never learnt
    assert [r["victim_recall"] for r in out] == pytest.approx([1.0, 1.0, 0.0])


@pytest.mark.parametrize("defense", [{"name": "identity"}, {"name": "label_only"}])
def test_track_epochs_scores_each_clone_after_every_epoch(digits_victim, defense):
    """track_epochs: one test accuracy per epoch and clone; the last is the clone's own attacker accuracy, the best
    epoch's is the curve's maximum (and where it is). Under label_only the twin is the clone, one curve for both."""
    cfg = ev.EvalConfig(dataset="digits", defense=defense, attack="knockoff", budget=200, epochs=4,
                        batch_size=32, track_epochs=True)
    r = ev.evaluate(cfg, victim=digits_victim, progress=False)
    m = r.metrics
    for kind in ("soft", "top1"):
        curve = r.epoch_accuracy[kind]
        assert len(curve) == 4 and curve[-1] == m[f"attacker_accuracy_{kind}"]
        assert m[f"attacker_accuracy_{kind}_best_epoch"] == max(curve)
        assert curve[int(m[f"attacker_best_epoch_{kind}"]) - 1] == max(curve)
    assert m["attacker_accuracy_strongest_best_epoch"] == max(max(r.epoch_accuracy["soft"]),
                                                              max(r.epoch_accuracy["top1"]))
    assert (r.epoch_accuracy["soft"] == r.epoch_accuracy["top1"]) == (defense["name"] == "label_only")
    plain = ev.evaluate(ev.EvalConfig(**{**cfg.__dict__, "track_epochs": False}), victim=digits_victim,
                        progress=False)
    assert plain.epoch_accuracy == {} and "attacker_accuracy_soft_best_epoch" not in plain.metrics
    assert plain.metrics["attacker_accuracy_soft"] == m["attacker_accuracy_soft"]  # watching changes no weight


def test_best_epoch_metrics_and_art_refusal():
    got = ev.best_epoch_metrics({"soft": [0.2, 0.5, 0.4], "top1": [0.3, 0.3, 0.45]})
    assert got == {"attacker_accuracy_soft_best_epoch": 0.5, "attacker_best_epoch_soft": 2.0,
                   "attacker_accuracy_top1_best_epoch": 0.45, "attacker_best_epoch_top1": 3.0,
                   "attacker_accuracy_strongest_best_epoch": 0.5}
    assert ev.best_epoch_metrics({"soft": [0.3, 0.3], "top1": [0.1, 0.1]})["attacker_best_epoch_soft"] == 1.0
    with pytest.raises(ValueError, match="no epochs recorded for the top1 clone"):
        ev.best_epoch_metrics({"soft": [0.1], "top1": []})
    with pytest.raises(ValueError, match="track_epochs: art_copycat trains its clone inside ART.*allowed with: "
                                         "knockoff"):
        ev.EvalConfig(dataset="digits", attack="art_copycat", track_epochs=True)
