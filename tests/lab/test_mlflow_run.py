"""Every MLproject entry point through the real CLI, as a user runs it:

    mlflow run . -e NAME --env-manager local --experiment-name stealguard -P key=value ...

in a subprocess (cwd = the repository root, MLFLOW_TRACKING_URI = a SQLite store under tmp, the venv's bin
first on PATH, OMP_NUM_THREADS=1), at tiny settings and chained: train_victim -> evaluate -> sweep -> register
--sweep-run -> promote -> package, register --run-id, train_misinformation; train_victim and evaluate again
against a running ``mlflow server``. The assertions read what landed in MLflow: MLflow logs every entry-point
parameter as it received it before the code runs, so each run holds those and the resolved values under
``resolved.<key>`` (never a changed value: MLflow refuses that), in the one run ``mlflow run`` created.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mlflow_project.sweep.presets import defense_grid, get_preset
from tests.support.cli import BIN, venv_env
from tests.support.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "stealguard"
TIMINGS: dict[str, float] = {}  # command -> seconds (printed at the end of the module with -s)


def cli_env(tracking_uri: str) -> dict[str, str]:
    return venv_env(MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS="1")


def mlflow_run(entry: str, params: dict[str, object], env: dict[str, str]) -> tuple[str, str]:
    """Run ``mlflow run . -e entry`` with ``-P key=value`` for ``params``; return (run id, stdout)."""
    cmd = [str(BIN / "mlflow"), "run", ".", "-e", entry, "--env-manager", "local", "--experiment-name", EXPERIMENT]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    TIMINGS[" ".join(cmd[1:])] = time.perf_counter() - t0
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}"
    found = re.search(r"=== Run \(ID '([0-9a-f]+)'\) succeeded ===", proc.stderr)
    assert found, tail
    return found.group(1), proc.stdout


def the_run(client: MlflowClient, run_id: str, entry: str, kind: str):
    """The run ``mlflow run`` created: finished, for ``entry``, and the code logged into it (its kind tag)."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == entry
    assert run.data.tags.get("stealguard.kind") == kind, run.data.tags
    return run


def top_level_runs(client: MlflowClient, experiment_id: str) -> list:
    return [r for r in client.search_runs([experiment_id], max_results=1000)
            if "mlflow.parentRunId" not in r.data.tags]


@pytest.fixture(scope="module", autouse=True)
def _report_timings():
    yield
    for cmd, seconds in TIMINGS.items():
        print(f"{seconds:6.1f}s  {cmd}")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh SQLite store whose stealguard experiment keeps its artifacts under tmp (as tracking.setup makes
    it; an experiment `mlflow run` created would put them in ./mlruns of the repository)."""
    root = tmp_path_factory.mktemp("mlflow_run")
    uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "mlartifacts").resolve().as_uri())
    return {"root": root, "uri": uri, "env": cli_env(uri), "client": client, "exp": exp_id}


@pytest.fixture(scope="module")
def victim(store):
    out = store["root"] / "victim"
    run_id, stdout = mlflow_run("train_victim", {"dataset": "digits", "arch": "mlp", "epochs": 2,
                                                 "registered_model_name": "digits_mlp", "output_dir": out},
                                store["env"])
    return {"run_id": run_id, "dir": out, "summary": json.loads(stdout[stdout.index("{"):])}


def test_train_victim(store, victim):
    client = store["client"]
    run = the_run(client, victim["run_id"], "train_victim", "victim")
    p = run.data.params
    # as MLflow received them (defaults included) ...
    assert (p["dataset"], p["arch"], p["epochs"], p["lr"], p["batch_size"], p["seed"]) == ("digits", "mlp", "2", "0",
                                                                                          "0", "0")
    # ... and what the code resolved, where it differs (the digits defaults); equal values are not repeated
    assert p["resolved.lr"] == "0.05" and p["resolved.batch_size"] == "32"
    assert "resolved.epochs" not in p and "resolved.dataset" not in p and p["optimizer"] == "sgd+cosine"
    m = run.data.metrics
    assert m["test_accuracy"] == pytest.approx(victim["summary"]["test_accuracy"]) and m["test_accuracy"] > 0.8
    assert [h.step for h in client.get_metric_history(run.info.run_id, "epoch_loss")] == [0, 1]
    (version,) = client.search_model_versions("name = 'digits_mlp'")
    assert version.run_id == run.info.run_id and str(version.version) == "1"
    assert {"state_dict.pt", "model.onnx", "model.pt2", "input_spec.json"} <= {f.name for f in victim["dir"].iterdir()}
    assert [r.info.run_id for r in top_level_runs(client, store["exp"])
            if r.data.tags.get("mlflow.project.entryPoint") == "train_victim"] == [run.info.run_id]  # no second run


@pytest.fixture(scope="module")
def evaluation(store, victim):
    run_id, _ = mlflow_run("evaluate", {"dataset": "digits", "victim": victim["dir"], "budget": 100, "epochs": 1},
                           store["env"])
    return run_id


def test_evaluate_with_the_default_defense(store, victim, evaluation):
    run = the_run(store["client"], evaluation, "evaluate", "evaluation")
    p = run.data.params
    assert p["defense"] == "identity"  # the MLproject default, stored without shell quotes
    assert json.loads(p["resolved.defense"]) == {"name": "identity"} and p["defense_name"] == "identity"
    assert p["budget"] == "100" and "resolved.budget" not in p and p["victim"] == str(victim["dir"])
    assert p["queryset"] == "''" and p["resolved.queryset"] == "digits"  # MLflow logs an empty string as ''
    m = run.data.metrics
    assert m["queries"] == 100
    assert m["victim_accuracy"] == pytest.approx(victim["summary"]["test_accuracy"], abs=1e-6)
    assert m["defender_accuracy"] == m["victim_accuracy"] and m["perturbation_l1_max"] == 0
    assert run.data.tags["stealguard.defense"] == "identity"


@pytest.fixture(scope="module")
def sweep(store, victim):
    run_id, stdout = mlflow_run("sweep", {"preset": "tiny", "victim": victim["dir"], "budget": 100, "epochs": 1,
                                          "results_dir": store["root"] / "sweep"}, store["env"])
    return run_id, stdout


def test_sweep_points_nest_under_the_mlflow_run(store, victim, sweep):
    client = store["client"]
    run_id, stdout = sweep
    parent = the_run(client, run_id, "sweep", "sweep")
    assert f"parent run {run_id}" in stdout
    p = parent.data.params
    assert p["preset"] == "tiny" and p["budget"] == "100" and p["dataset"] == "''" and p["resolved.dataset"] == "digits"
    # the seed is a point's (sweep --seeds): the parent keeps MLflow's "-1" ("the preset's") and resolves no seed
    assert p["seed"] == "-1" and "resolved.seed" not in p and p["victim"] == str(victim["dir"])
    assert "resolved.victim" not in p and p["arch"] == "mlp"  # arch: no MLproject parameter, logged as is
    grid = defense_grid(get_preset("tiny"))
    children = client.search_runs([store["exp"]], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert sorted(json.loads(c.data.params["defense"])["name"] for c in children) == sorted(g["name"] for g in grid)
    assert all(c.info.status == "FINISHED" and c.data.metrics["queries"] == 100 for c in children)
    recommended = parent.data.tags["stealguard.recommended_run_id"]
    assert recommended in {c.info.run_id for c in children}
    assert parent.data.metrics["points"] == len(grid) and (store["root"] / "sweep" / "points.csv").is_file()
    # the sweep started no parent of its own beside the one `mlflow run` created
    assert [r.info.run_id for r in top_level_runs(client, store["exp"]) if r.data.tags.get("stealguard.kind") == "sweep"
            ] == [run_id]


def test_a_sweep_in_a_fresh_store_imports_the_points_csv_and_runs_only_the_new_points(store, victim, sweep):
    """`-P import_from=<points.csv>` (a session's store is gone, its CSV committed), `-P top_k_ks=2` and an
    ood_gated point with the Gaussian gate (`-P ood_gated_scores=gaussian`), fitted and calibrated on the victim."""
    root = store["root"] / "fresh"
    root.mkdir()
    uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(root / "mlartifacts").resolve().as_uri())
    csv_path = store["root"] / "sweep" / "points.csv"
    run_id, stdout = mlflow_run("sweep", {"preset": "tiny", "victim": victim["dir"], "budget": 100, "epochs": 1,
                                          "top_k_ks": "2", "import_from": csv_path, "results_dir": root / "out",
                                          "ood_gated_scores": "gaussian", "ood_gated_max_drop": 3,
                                          "ood_gated_inside": "label_only", "ood_gated_outside": "mad",
                                          "ood_gated_epsilon": 2}, cli_env(uri))
    grid = defense_grid(get_preset("tiny"))
    assert f"{len(grid) + 2} points (2 new, {len(grid)} reused, {len(grid)} of them imported)" in stdout
    parent = the_run(client, run_id, "sweep", "sweep")
    assert parent.data.params["top_k_ks"] == "2" and parent.data.params["import_from"] == str(csv_path)
    assert parent.data.params["ood_gated_scores"] == "gaussian"
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    imported = {c.data.params["defense_config"] for c in children if "stealguard.imported_from" in c.data.tags}
    assert imported == {json.dumps(g, sort_keys=True) for g in grid}
    new = {json.loads(c.data.params["defense_config"])["name"]: c for c in children
           if "stealguard.imported_from" not in c.data.tags}
    assert sorted(new) == ["ood_gated", "top_k"] and all(c.info.status == "FINISHED" for c in new.values())
    assert json.loads(new["top_k"].data.params["defense_config"]) == {"name": "top_k", "k": 2}
    gated = json.loads(new["ood_gated"].data.params["defense_config"])
    from mlflow_project.lab import screen
    from mlflow_project.lab.evaluate import load_victim

    ours = screen.fit_gaussian(load_victim(victim["dir"])).model_dump()  # this process's threads: equal to rounding
    assert gated["score"] == "gaussian" and gated["gaussian"].keys() == ours.keys()
    for key in ours:
        assert np.allclose(gated["gaussian"][key], ours[key], rtol=1e-5, atol=1e-7), key
    assert gated["outside"] == {"name": "mad", "epsilon": 2.0, "norm": "l1"} and 0 < gated["tau"] <= 0.501
    assert "score=gaussian" in new["ood_gated"].data.tags["stealguard.label"]


@pytest.fixture(scope="module")
def registered(store, sweep):
    run_id, stdout = mlflow_run("register", {"sweep_run": sweep[0], "name": "digits-defense", "alias": "candidate"},
                                store["env"])
    return run_id, json.loads(stdout[stdout.index("{"):])


def test_register_from_the_sweep(store, victim, sweep, registered):
    client = store["client"]
    run_id, result = registered
    run = the_run(client, run_id, "register", "defense-registration")
    point = client.get_run(client.get_run(sweep[0]).data.tags["stealguard.recommended_run_id"])
    defense = json.loads(point.data.params["defense_config"])
    assert run.data.params["victim"] == "''" and run.data.params["resolved.victim"] == str(victim["dir"])
    assert {k[len("defense."):]: v for k, v in run.data.params.items() if k.startswith("defense.")}["name"] == \
        defense["name"]
    version = client.get_model_version("digits-defense", result["version"])
    assert version.run_id == run_id and result["version"] == "1"
    assert json.loads(version.tags["stealguard.defense_config"])["name"] == defense["name"]
    assert str(client.get_model_version_by_alias("digits-defense", "candidate").version) == "1"


def test_register_from_an_evaluate_run(store, victim, evaluation):
    client = store["client"]
    run_id, stdout = mlflow_run("register", {"run_id": evaluation, "name": "digits-identity"}, store["env"])
    run = the_run(client, run_id, "register", "defense-registration")
    assert run.data.params["run_id"] == evaluation and run.data.params["resolved.victim"] == str(victim["dir"])
    (version,) = client.search_model_versions("name = 'digits-identity'")
    assert version.run_id == run_id and version.tags["stealguard.defense"] == "identity"


@pytest.fixture(scope="module")
def promoted(store, registered):
    mlflow_run("promote", {"name": "digits-defense", "version": registered[1]["version"]}, store["env"])
    return registered[1]["version"]


def test_promote_and_package_the_production_version(store, registered, promoted):
    client = store["client"]
    version = client.get_model_version_by_alias("digits-defense", "production")
    assert str(version.version) == promoted and version.tags["stealguard.promoted_production_from"] == "none"
    model_store = store["root"] / "model_store"
    mlflow_run("package", {"name": "digits_defended", "defense": "models:/digits-defense@production",
                           "export_path": model_store}, store["env"])
    mar = model_store / "digits_defended.mar"
    with zipfile.ZipFile(mar) as z:
        config = yaml.safe_load(z.read("model-config.yaml"))["stealguard"]
        names = z.namelist()
    assert config["version"]["name"] == "digits-defense" and str(config["version"]["version"]) == promoted
    assert config["version"]["alias"] == "production" and config["version"]["run_id"] == registered[0]
    assert config["defense"]["name"] == version.tags["stealguard.defense"]
    # victim "" (the MLproject default): the one in the registered bundle, the digits MLP
    assert config["version"]["victim_source"] == "bundle" and config["victim"]["class"] == "MLP"
    assert config["input"]["shape"] == [64] and "victim/state_dict.pt" in names


def test_train_misinformation(store, victim):
    client = store["client"]
    run_id, _ = mlflow_run("train_misinformation", {"victim": victim["dir"], "epochs": 1,
                                                    "output_dir": store["root"] / "misinformation"}, store["env"])
    run = the_run(client, run_id, "train_misinformation", "misinformation")
    p = run.data.params
    assert p["victim"] == str(victim["dir"]) and p["dataset"] == "''" and p["resolved.dataset"] == "digits"
    assert p["arch"] == "''" and p["resolved.arch"] == "mlp" and p["resolved.lr"] == "0.02" and p["epochs"] == "1"
    # wrong on purpose: far below the victim's agreement with the truth
    assert run.data.metrics["test_accuracy"] < victim["summary"]["test_accuracy"] - 0.3
    assert "misinformation/state_dict.pt" in {f.path for f in client.list_artifacts(run_id, "misinformation")}


@pytest.mark.integration
def test_train_victim_and_evaluate_against_an_mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    try:
        env = cli_env(server.url)
        victim_run, _ = mlflow_run("train_victim", {"dataset": "digits", "arch": "mlp", "epochs": 1,
                                                    "registered_model_name": "digits_mlp"}, env)
        eval_run, _ = mlflow_run("evaluate", {"dataset": "digits", "victim": "models:/digits_mlp/1", "budget": 50,
                                              "epochs": 1, "defense": '{"name": "top_k", "k": 2}'}, env)
        client = MlflowClient(server.url)
        run = the_run(client, victim_run, "train_victim", "victim")
        assert run.data.params["resolved.lr"] == "0.05" and run.data.metrics["test_accuracy"] > 0.5
        assert client.get_model_version("digits_mlp", "1").run_id == victim_run
        assert "exports/model.onnx" in {f.path for f in client.list_artifacts(victim_run, "exports")}
        run = the_run(client, eval_run, "evaluate", "evaluation")
        # MLflow logged the JSON shell-quoted, the code its canonical form
        assert run.data.params["defense"] == shlex.quote('{"name": "top_k", "k": 2}')
        assert json.loads(run.data.params["resolved.defense"]) == {"name": "top_k", "k": 2}
        assert run.data.metrics["queries"] == 50 and run.data.tags["stealguard.defense"] == "top_k"
        assert run.data.metrics["victim_accuracy"] == pytest.approx(run.data.metrics["defender_accuracy"])
    finally:
        server.stop()
