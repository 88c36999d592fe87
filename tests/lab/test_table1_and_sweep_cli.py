"""The table1 and sweep entry points through the real ``mlflow run . -e NAME --env-manager local`` CLI: both
attackers per row, several seeds, and resumption (a rerun skips what is finished)."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import venv_env

REPO = Path(__file__).resolve().parents[2]


def mlflow_run(entry: str, params: dict, tracking_uri: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", entry, "--env-manager", "local"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    env = venv_env(MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"mlflow run -e {entry} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_table1_runs_both_attackers_per_seed_and_resumes(digits_victim_dir, tmp_path):
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    out = tmp_path / "table1.csv"
    params = {"victim": str(digits_victim_dir), "seeds": "0,1", "attacks": "knockoff,jbda",
              "knockoff_querysets": "digits", "budget": 120, "epochs": 2, "threads": 1, "out": str(out)}
    first = mlflow_run("table1", params, uri)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["attack"], r["seed"]) for r in rows) == [("jbda", "0"), ("jbda", "1"), ("knockoff", "0"),
                                                              ("knockoff", "1")]
    for r in rows:
        soft, top1, best = (float(r[k]) for k in ("attacker_accuracy_soft", "attacker_accuracy_top1",
                                                  "attacker_accuracy_strongest"))
        assert best == max(soft, top1) and 0 < best <= 1 and float(r["queries"]) == 120
        per_class = json.loads(r["per_class"])  # what the queries elicited, class by class (10 digits)
        assert [c["class"] for c in per_class] == list(range(10))
        assert sum(c["answer_share"] for c in per_class) == pytest.approx(1.0)
        assert 0 < float(r["query_label_entropy"]) <= math.log2(10) + 1e-9
    assert "paper %" in first.stdout and "soft %" in first.stdout
    again = mlflow_run("table1", params, uri)
    assert again.stdout.count("skip ") == 4
    with out.open() as f:
        assert len(list(csv.DictReader(f))) == 4  # nothing appended


def test_sweep_entry_point_with_seeds_and_the_l1_cap(digits_victim_dir, tmp_path):
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    # dataset/attack/queryset/budget/epochs given explicitly (the tiny preset's values): `mlflow run` logs the
    # entry point's parameters on the run the sweep then logs its context to (param logging: issue 15's)
    params = {"preset": "tiny", "victim": str(digits_victim_dir), "seeds": "0,1", "dataset": "digits",
              "attack": "knockoff", "queryset": "digits", "budget": 300, "epochs": 3,
              "multi_seed_points": "identity,label_only", "max_l1": 0.5, "mad_epsilons": "none",
              "reverse_sigmoid_betas": "none", "random_noise_epsilons": "none", "rounding_decimals": "none",
              "ood_gated_inside": "label_only", "ood_gated_outside": "mad", "ood_gated_max_drop": 1.5,
              "ood_gated_epsilon": 2,
              "results_dir": str(tmp_path / "out")}
    proc = mlflow_run("sweep", params, uri)
    assert "selection:" in proc.stdout
    sel = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert sel["max_l1"] == 0.5 and sel["recommended"]["perturbation_l1_mean"] <= 0.5 + 1e-9
    with (tmp_path / "out" / "points_mean.csv").open() as f:
        means = {r["label"]: r for r in csv.DictReader(f)}
    assert means["identity"]["n_seeds"] == "2" and means["mad_argmax(epsilon=0.5)"]["n_seeds"] == "1"
    # ood_gated_max_drop: the tau calibrated on the victim's test set, said on stderr, and the point within it
    said = re.search(r"ood_gated_max_drop 1.5: tau ([0-9.]+) for inside=label_only, outside=mad", proc.stderr)
    assert said, proc.stderr[-2000:]
    gated = means[f"ood_gated(tau={float(said.group(1)):g}, inside=label_only, outside=mad(epsilon=2))"]
    drop = 100 * (float(gated["victim_accuracy"]) - float(gated["defender_accuracy"]))
    assert 0 <= drop <= 1.5 + 1e-9 and gated["n_seeds"] == "1"
    again = mlflow_run("sweep", params, uri)
    assert "(0 new, 6 reused)" in again.stdout


def test_table1_attack_options_run_the_release_augmentation_as_its_own_rows(digits_victim_dir, tmp_path):
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    out = tmp_path / "table1.csv"
    params = {"victim": str(digits_victim_dir), "seeds": "0", "attacks": "jbda", "budget": 120, "epochs": 2,
              "threads": 1, "out": str(out)}
    mlflow_run("table1", params, uri)
    mlflow_run("table1", {**params, "attack_options": '{"jb_release_augmentation": true}'}, uri)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [json.loads(r["attack_options"]) for r in rows] == [{}, {"jb_release_augmentation": True}]
    assert rows[0]["key"] != rows[1]["key"] and all(float(r["queries"]) == 120 for r in rows)
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", "table1", "--env-manager", "local",
           "-P", f"victim={digits_victim_dir}", "-P", "attacks=jbda", "-P", f"out={out}",
           "-P", 'attack_options={"jb_steps": 1}']
    bad = subprocess.run(cmd, cwd=REPO, env=venv_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True)
    assert bad.returncode != 0 and "--attack-options: unknown ['jb_steps']; allowed:" in bad.stderr


def test_table1_clone_lr_and_budget_ladder_are_their_own_rows_with_best_epoch_columns(digits_victim_dir, tmp_path):
    """The release's Knockoff training through the real CLI: -P clone_lr and a budget_ladder attack option make a
    row of their own (its key, its lr column, its label), and every row records each clone's best epoch."""
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    out = tmp_path / "table1.csv"
    params = {"victim": str(digits_victim_dir), "seeds": "0", "attacks": "knockoff", "knockoff_querysets": "digits",
              "budget": 120, "epochs": 3, "threads": 1, "out": str(out)}
    mlflow_run("table1", params, uri)
    release = {**params, "clone_lr": 0.01, "attack_options": '{"budget_ladder": [30, 60], "weight_decay": 0.0005}'}
    proc = mlflow_run("table1", release, uri)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in rows] == [0.1, 0.01] and rows[0]["key"] != rows[1]["key"]
    assert json.loads(rows[1]["attack_options"]) == {"budget_ladder": [30, 60], "weight_decay": 0.0005}
    for r in rows:
        for kind in ("soft", "top1"):
            assert float(r[f"attacker_accuracy_{kind}_best_epoch"]) >= float(r[f"attacker_accuracy_{kind}"])
            assert 1 <= float(r[f"attacker_best_epoch_{kind}"]) <= 3
        assert float(r["attacker_accuracy_strongest_best_epoch"]) == max(
            float(r["attacker_accuracy_soft_best_epoch"]), float(r["attacker_accuracy_top1_best_epoch"]))
    assert "knockoff e3 lr0.01 budget_ladder=30,60 weight_decay=0.0005 " in proc.stdout
    assert "best epoch %" in proc.stdout
    assert mlflow_run("table1", release, uri).stdout.count("skip ") == 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    (run,) = [r for r in client.search_runs(ids) if r.data.params.get("lr") == "0.01"]
    for kind in ("soft", "top1"):  # one step per epoch, in MLflow
        history = client.get_metric_history(run.info.run_id, f"attacker_epoch_accuracy_{kind}")
        assert [h.step for h in history] == [1, 2, 3]
        assert max(h.value for h in history) == pytest.approx(float(rows[1][f"attacker_accuracy_{kind}_best_epoch"]))


def test_table1_csv_written_under_an_older_header_is_migrated_on_append(tmp_path):
    """append_row owns the CSV: a file whose header predates the current columns is rewritten under them before
    the new row goes in, so no value lands under another column's name."""
    from mlflow_project.lab import table1

    path = tmp_path / "t.csv"
    old = ["key", "attack", "queryset", "budget", "epochs", "seed", "attacker_accuracy_strongest"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(old)
        w.writerow(["k0", "knockoff", "handwriting", "50000", "30", "0", "0.537"])
    table1.append_row(path, {"key": "k1", "attack": "knockoff", "queryset": "handwriting", "budget": 50000,
                             "epochs": 50, "lr": 0.01, "seed": 1, "attacker_accuracy_strongest": 0.6,
                             "attacker_accuracy_strongest_best_epoch": 0.65})
    with path.open() as f:
        assert next(csv.reader(f)) == list(table1.COLUMNS)
    first, second = table1.read_done(path)
    assert (first["key"], first["epochs"], first["lr"], first["attacker_accuracy_strongest"]) == ("k0", "30", "",
                                                                                                   "0.537")
    assert (second["lr"], second["attacker_accuracy_strongest_best_epoch"]) == ("0.01", "0.65")


def test_table1_report_groups_rows_by_attack_options_and_shows_the_strongest(tmp_path, capsys):
    from mlflow_project.lab import table1

    def row(attack, seed, soft, top1, options="{}"):
        return {"key": f"{attack}{seed}{options}", "attack": attack, "queryset": "fashion_mnist", "budget": 50000,
                "seed": seed, "victim_accuracy": 0.92, "attacker_accuracy_soft": soft, "attacker_accuracy_top1": top1,
                "attacker_accuracy_strongest": max(soft, top1), "attack_options": options}

    path = tmp_path / "t.csv"
    for r in (row("jbda", 0, 0.78, 0.72), row("jbda", 1, 0.70, 0.74),
              row("jbda", 0, 0.40, 0.30, '{"jb_release_augmentation": true}')):
        table1.append_row(path, r)
    assert table1.main(["--report", str(path)]) == []
    lines = capsys.readouterr().out.splitlines()
    plain = next(line for line in lines if line.startswith("jbda  "))
    release = next(line for line in lines if line.startswith("jbda [release]"))
    assert "76.0 [74.0-78.0]" in plain and plain.split()[3] == "2"  # strongest per seed: 78 and 74
    assert release.split()[-3:] == ["38.7", "+1.3", "-"]  # 40.0 strongest vs the paper's 38.7; no epochs kept
    with pytest.raises(SystemExit, match="no rows"):
        table1.main(["--report", str(tmp_path / "none.csv")])
