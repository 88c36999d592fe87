"""The lab with adaptive_misinformation and gradient_redirection: evaluate loads the misinformation model from
an export directory; the sweep trains it once per victim, caches it next to the victim, and runs both new
defenses only when their grid flags ask for them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_project.lab import evaluate as ev
from mlflow_project.lifecycle.register import misinformation_of_run
from mlflow_project.sweep import run as sw
from mlflow_project.sweep.presets import defense_grid, get_preset
from mlflow_project.sweep.select import MISINFORMATION_TAG

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def misinformation_dir(digits_victim, digits_victim_dir):
    """The sweep's cached misinformation model for the digits victim (tiny preset: 4 epochs)."""
    out = sw.resolve_misinformation(TINY, digits_victim, str(digits_victim_dir), progress=False)
    assert out == Path(digits_victim_dir).parent / f"{Path(digits_victim_dir).name}.misinformation-e4-s0"
    info = json.loads((out / "misinformation.json").read_text())
    assert info["dataset"] == "digits" and info["arch"] == "mlp" and info["epochs"] == 4
    assert info["test_accuracy"] < 0.2  # trained to be wrong
    return out


def _cfg(tau: float, misinformation: str, nu: float = 1000.0) -> ev.EvalConfig:
    return ev.EvalConfig(dataset="digits", defense={"name": "adaptive_misinformation", "tau": tau, "nu": nu},
                         attack="knockoff", budget=200, epochs=3, batch_size=32, misinformation=misinformation)


def test_evaluate_gates_by_confidence(digits_victim, misinformation_dir):
    # tau below every row's top probability (>= 1/K): nothing is gated, the victim's answers pass unchanged
    low = ev.evaluate(_cfg(0.05, str(misinformation_dir)), victim=digits_victim, progress=False).metrics
    assert low["top1_flip_rate"] == 0 and low["perturbation_l1_max"] < 1e-6
    assert low["defender_accuracy"] == low["victim_accuracy"]
    # tau = 1 and a steep gate: every row is gated (h ~ 1), the attacker learns mostly misinformation
    high = ev.evaluate(_cfg(1.0, str(misinformation_dir), nu=1e6), victim=digits_victim, progress=False).metrics
    assert high["top1_flip_rate"] > 0.5 and high["defender_accuracy"] < low["victim_accuracy"] - 0.4
    assert high["attacker_accuracy"] < low["attacker_accuracy"] - 0.3


def test_evaluate_without_or_with_a_bad_misinformation_dir_names_the_field(digits_victim, tmp_path):
    with pytest.raises(ValueError, match="misinformation: defense 'adaptive_misinformation' needs"):
        ev.evaluate(_cfg(0.5, ""), victim=digits_victim, progress=False)
    with pytest.raises(ValueError, match="misinformation: .* is not a train_misinformation export directory"):
        ev.evaluate(_cfg(0.5, str(tmp_path)), victim=digits_victim, progress=False)


def test_new_defenses_are_opt_in_grid_entries():
    for name in ("tiny", "quick", "paper"):
        names = {g["name"] for g in defense_grid(get_preset(name, ood_gated_max_drop=0))}
        assert not names & {"adaptive_misinformation", "gradient_redirection"}, name
    grid = defense_grid(get_preset("quick", adaptive_misinformation_taus="0.5,0.7,0.9,0.95",
                                   gradient_redirection_epsilons="0.5,1"))
    assert [g["tau"] for g in grid if g["name"] == "adaptive_misinformation"] == [0.5, 0.7, 0.9, 0.95]
    assert [(g["epsilon"], g["target"]) for g in grid if g["name"] == "gradient_redirection"] == [
        (0.5, "reverse"), (0.5, "shift"), (1.0, "reverse"), (1.0, "shift")]
    with pytest.raises(ValueError, match=r"adaptive_misinformation_taus: each tau must be in \(0, 1\]"):
        get_preset("tiny", adaptive_misinformation_taus="0.5,1.5")
    with pytest.raises(ValueError, match=r"gradient_redirection_epsilons: each epsilon must be in \[0, 2\]"):
        get_preset("tiny", gradient_redirection_epsilons="3")


def test_tiny_sweep_with_the_new_grid_flags_and_the_evaluate_cli(tmp_path, digits_victim_dir, misinformation_dir):
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    none = ["--mad-epsilons", "none", "--mad-argmax-epsilons", "none", "--reverse-sigmoid-betas", "none",
            "--random-noise-epsilons", "none", "--rounding-decimals", "none", "--no-label-only"]
    argv = ["--preset", "tiny", "--victim", str(digits_victim_dir), *none, "--adaptive-misinformation-taus", "0.9",
            "--gradient-redirection-epsilons", "0.5", "--tracking-uri", uri, "--no-progress"]
    first = sw.main([*argv, "--results-dir", str(tmp_path / "a")])
    labels = [p["label"] for p in first.points]
    assert labels == ["identity", "adaptive_misinformation(tau=0.9)",
                      "gradient_redirection(epsilon=0.5, target=reverse)",
                      "gradient_redirection(epsilon=0.5, target=shift)"]
    assert first.new_points == 4
    by = {p["label"]: p for p in first.points}
    assert by[labels[1]]["tau"] == 0.9 and by[labels[2]]["target"] == "reverse"
    for label in labels[2:]:  # an l1 budget of 0.5 per row
        assert 0 < by[label]["perturbation_l1_max"] <= 0.5 + 1e-5
    client = MlflowClient(uri)
    run = client.get_run(by[labels[1]]["run_id"])
    assert run.data.params["misinformation"] == str(misinformation_dir)  # the cached model, not a new one
    assert client.get_run(by[labels[0]]["run_id"]).data.params["misinformation"] == ""
    # ... and the store has it too: the parent run carries the export, the point names it (register uses that)
    parent = run.data.tags["stealguard.sweep_parent"]
    assert run.data.tags[MISINFORMATION_TAG] == f"runs:/{parent}/misinformation"
    assert misinformation_of_run(client, run.info.run_id) == f"runs:/{parent}/misinformation"
    assert MISINFORMATION_TAG not in client.get_run(by[labels[2]]["run_id"]).data.tags
    logged = {Path(a.path).name for a in client.list_artifacts(parent, "misinformation")}
    assert logged == {p.name for p in misinformation_dir.iterdir()}
    again = sw.main([*argv, "--results-dir", str(tmp_path / "b")])
    assert again.new_points == 0 and again.reused_points == 4

    # evaluate's command line takes the misinformation export directory (same tracking store: no new database)
    defense = {"name": "adaptive_misinformation", "tau": 0.9}
    metrics = ev.main(["--dataset", "digits", "--victim", str(digits_victim_dir), "--defense", json.dumps(defense),
                       "--misinformation", str(misinformation_dir), "--budget", "100", "--epochs", "1",
                       "--batch-size", "32", "--no-progress", "--tracking-uri", uri])
    assert 0 < metrics["top1_flip_rate"] < 0.5  # the victim is confident on most of its own test set
    (run,) = client.search_runs([run.info.experiment_id], filter_string="attributes.run_name LIKE 'eval-%'")
    assert run.data.params["misinformation"] == str(misinformation_dir)
