"""The MLproject entry points train_victim and evaluate: their commands parse and run the lab's mains."""

from __future__ import annotations

import shlex
from pathlib import Path

from mlflow.projects import _project_spec
from mlflow.tracking import MlflowClient

from mlflow_project import evaluate as ev
from mlflow_project import train_victim as tv

REPO = Path(__file__).resolve().parents[2]


def command_args(entry: str, params: dict) -> list[str]:
    ep = _project_spec.load_project(str(REPO)).get_entry_point(entry)
    argv = shlex.split(ep.compute_command(params, storage_dir=None))
    assert argv[:3] == ["python", "-m", f"mlflow_project.{entry}"]
    return argv[3:]


def test_mlproject_train_victim_and_evaluate_commands(tracking_uri, tmp_path):
    out = tmp_path / "v"
    args = command_args("train_victim", {"dataset": "digits", "epochs": 3, "seed": 1,
                                         "registered_model_name": "ep_digits", "output_dir": str(out)})
    summary = tv.main(args)
    assert summary["test_accuracy"] > 0.8 and (out / "model.onnx").exists()
    args = command_args("evaluate", {"dataset": "digits", "victim": str(out), "queryset": "digits",
                                     "defense": '{"name": "top_k", "k": 2}', "attack": "knockoff_argmax",
                                     "budget": 64, "epochs": 1})
    metrics = ev.main(args)
    assert metrics["queries"] == 64
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("stealguard").experiment_id])
    assert {r.data.tags["stealguard.kind"] for r in runs} == {"victim", "evaluation"}
