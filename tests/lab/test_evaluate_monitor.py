"""evaluate and the sweep measure the per-client monitor like a defense: through the real ``mlflow run . -e
evaluate`` a JBDA thief (one client) is flagged and hardened while the 20 benign clients replaying the test set are
not (their top-1 is the victim's); a thief may split its budget over client ids; sweep points get monitored twins
that the selection leaves out."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from mlflow_project.lab import data
from mlflow_project.lab.evaluate import EvalConfig
from mlflow_project.lab.oracles import MonitoredOracle, lab_monitor
from mlflow_project.sweep.presets import defense_grid, describe, get_preset
from mlflow_project.sweep.select import choose
from tests.lab.test_mlflow_run import cli_env, mlflow_run

HARDEN = {"action": "harden", "harden": {"name": "label_only"}, "ood": {"enabled": False}}


@pytest.mark.slow
def test_mlflow_run_evaluate_with_a_monitor(tmp_path, digits_victim_dir):
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    client.create_experiment("stealguard", artifact_location=(tmp_path / "art").resolve().as_uri())
    run_id, stdout = mlflow_run("evaluate", {"dataset": "digits", "victim": digits_victim_dir, "attack": "jbda",
                                             "budget": 600, "epochs": 1, "monitor": json.dumps(HARDEN)},
                                cli_env(uri))
    run = client.get_run(run_id)
    m, p = run.data.metrics, run.data.params
    assert m["monitor_flagged"] == 1 and m["monitor_attacker_ids_flagged"] == 1, m
    assert 0 < m["monitor_queries_until_flagged"] < m["queries"] == 600
    assert m["monitor_benign_flagged"] == 0
    # the benign clients are not flagged and the defense is identity: they get the victim's own top-1
    assert m["defender_accuracy"] == m["victim_accuracy"] and m["perturbation_l1_max"] < 1e-6
    # the clones the thief trained on its (from the flag on, label-only) answers: soft and top-1 both measured
    assert {"attacker_accuracy_soft", "attacker_accuracy_top1", "attacker_accuracy_strongest"} <= set(m)
    assert json.loads(p["resolved.monitor"] if "resolved.monitor" in p else p["monitor"]) == HARDEN
    assert p["attacker_clients"] in ("1", "1.0")
    local = client.download_artifacts(run_id, "monitor.json", str(tmp_path))
    assert json.loads(open(local).read()) == HARDEN
    assert "monitor: attacker flagged      yes after" in stdout and "benign clients flagged 0/20" in stdout


def test_a_thief_split_over_ids(digits_victim):
    v = digits_victim
    # batch i is id i % 4, each id has its own state in the store
    monitor = lab_monitor(v.model, HARDEN, v.spec.num_classes)
    oracle = MonitoredOracle(v.model, None, monitor, client="t", clients=4, batch_size=10)
    pool = data.query_set("digits", v.spec)
    oracle(pool[:80])
    assert {c: s["n"] for c, s in monitor.store._summaries.items()} == {f"t-{i}": 20 for i in range(4)}
    assert oracle.flagged_at is None and oracle.flagged_ids == set()


def test_monitor_config_errors():
    with pytest.raises(ValueError, match="monitor.action: evaluate measures observe and harden; got 'block'"):
        EvalConfig(dataset="digits", monitor={"action": "block"})
    with pytest.raises(ValueError, match="invalid monitor config: monitor.actoin: unknown key"):
        EvalConfig(dataset="digits", monitor={"actoin": "harden"})
    with pytest.raises(ValueError, match="monitor: the lab runs the monitor with oracle=local"):
        EvalConfig(dataset="digits", monitor={}, oracle="http", url="http://127.0.0.1:1/predictions/m")
    with pytest.raises(ValueError, match="monitor: given both"):
        EvalConfig(dataset="digits", defense={"name": "identity", "monitor": {}}, monitor={})
    cfg = EvalConfig(dataset="digits", defense={"name": "identity", "monitor": HARDEN})
    assert cfg.defense == {"name": "identity"} and cfg.monitor == HARDEN


def test_sweep_monitored_twins_and_selection():
    preset = get_preset("tiny", monitor=json.dumps(HARDEN), monitor_points="identity,label_only")
    grid = defense_grid(preset)
    twins = [c for c in grid if "monitor" in c]
    assert [describe(c) for c in twins] == ["identity+monitor(harden->label_only)",
                                           "label_only+monitor(harden->label_only)"]
    assert len(grid) == len(defense_grid(get_preset("tiny"))) + 2
    with pytest.raises(ValueError, match="monitor_points: \\['nope'\\] match no point"):
        defense_grid(get_preset("tiny", monitor="{}", monitor_points="nope"))
    with pytest.raises(ValueError, match="invalid monitor config: monitor.harden"):
        get_preset("tiny", monitor=json.dumps({"harden": {"name": "no_such_defense"}}))
    # the selection never recommends a monitored point, however low its attacker accuracy
    rows = [{"defense": c["name"], "label": describe(c), "defense_config": json.dumps(c, sort_keys=True),
             "victim_accuracy": 0.9, "defender_accuracy": 0.9, "perturbation_l1_mean": 0.0,
             "attacker_accuracy_strongest": 0.1 if "monitor" in c else 0.8} for c in grid
            if c["name"] in ("identity", "label_only")]
    assert "monitor" not in choose(rows).point["label"]


@pytest.mark.slow
def test_mlflow_run_sweep_with_a_monitored_point(tmp_path, digits_victim_dir):
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    exp = client.create_experiment("stealguard", artifact_location=(tmp_path / "art").resolve().as_uri())
    none = dict.fromkeys(("mad_epsilons", "mad_argmax_epsilons", "reverse_sigmoid_betas", "random_noise_epsilons",
                          "rounding_decimals"), "none")
    run_id, _ = mlflow_run("sweep", {"preset": "tiny", "victim": digits_victim_dir, "budget": 100, "epochs": 1,
                                     "monitor": json.dumps(HARDEN), "results_dir": tmp_path / "sweep", **none},
                           cli_env(uri))
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    labels = {c.data.tags["stealguard.label"]: c for c in children}
    assert set(labels) == {"identity", "label_only", "identity+monitor(harden->label_only)"}
    twin = labels["identity+monitor(harden->label_only)"]
    assert json.loads(twin.data.params["defense_config"])["monitor"] == HARDEN
    assert twin.data.metrics["monitor_benign_flagged"] == 0 and "monitor_flagged" in twin.data.metrics
    assert "monitor_flagged" not in labels["identity"].data.metrics
    assert client.get_run(run_id).data.tags["stealguard.recommended_run_id"] != twin.info.run_id
