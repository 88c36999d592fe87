"""The demo's sweep preset (ops.demo.demo_preset), without running the demo: the HTTP thief's budget and epochs,
both ood_gated gates with 3 seeds, and the command line's overrides on top."""

from __future__ import annotations

from mlflow_project.ops import demo
from mlflow_project.sweep.presets import defense_grid, describe


def test_the_demo_sweeps_what_its_thief_does_with_both_gates_at_three_seeds():
    cfg = demo.config_from_args([])
    preset = demo.demo_preset(cfg)
    assert (preset.name, preset.queryset, preset.dataset) == ("quick", "mnist5k", "fashion_mnist")
    assert (preset.budget, preset.epochs) == (cfg.attack_budget, cfg.attack_epochs) == (5000, 10)
    assert preset.ood_gated_scores == ("max_prob", "gaussian") and preset.ood_gated_max_drop == 0.9
    assert preset.all_seeds == (0, 1, 2) and set(preset.multi_seed_points) == {"identity", "label_only", "ood_gated"}
    stats = {"means": [[0.0]] * 2, "precision_tril": [[1.0]]}
    calibrated = {("label_only", "mad", "max_prob"): 0.455, ("label_only", "mad", "gaussian"): 3.16e-4}
    labels = [describe(c) for c in defense_grid(preset, calibrated, stats)]
    assert labels == ["identity", "mad(epsilon=0.8)", "mad_argmax(epsilon=1)", "reverse_sigmoid(beta=0.5)",
                      "label_only", "ood_gated(tau=0.455, inside=label_only, outside=mad(epsilon=2))",
                      "ood_gated(tau=0.000316, score=gaussian, inside=label_only, outside=mad(epsilon=2))"]
    small = demo.demo_preset(demo.config_from_args(["--sweep-budget", "300", "--attack-epochs", "3"]))
    assert (small.budget, small.epochs, small.ood_gated_scores) == (300, 3, ("max_prob", "gaussian"))
    assert demo.DemoConfig().sweep_overrides == demo.DEMO_SWEEP and demo.DemoConfig().sweep_overrides is not \
        demo.DEMO_SWEEP


def test_the_demo_prints_a_gaussian_gate_without_its_statistics():
    config = {"name": "ood_gated", "tau": 3e-4, "score": "gaussian",
              "gaussian": {"means": [[1.5], [2.5]], "precision_tril": [[1.0]]}, "inside": {"name": "label_only"},
              "outside": {"name": "mad", "epsilon": 2.0, "norm": "l1"}}
    text = demo.shown(config)
    assert "<fitted: 2 class means" in text and "1.5" not in text and '"tau": 0.0003' in text
    assert config["gaussian"]["means"] == [[1.5], [2.5]]  # the config itself is untouched
    assert demo.shown({"name": "label_only"}) == '{"name": "label_only"}'
