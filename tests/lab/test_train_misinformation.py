"""The train_misinformation entry point: MLproject command -> a wrong-on-purpose model, exported like a victim,
logged to MLflow, and usable as adaptive_misinformation's resource."""

from __future__ import annotations

import json

import torch
from mlflow.tracking import MlflowClient

from mlflow_project.lab import train_misinformation as tm
from mlflow_project.lab.train_victim import load_exported
from plugins import build_defense
from tests.lab.test_entry_points import command_args


def test_entry_point_trains_exports_and_logs(tracking_uri, tmp_path, digits_victim_dir):
    out = tmp_path / "mis"
    args = command_args("train_misinformation", {"victim": str(digits_victim_dir), "epochs": 3, "output_dir": str(out)})
    summary = tm.main(args)
    assert summary["dataset"] == "digits" and summary["arch"] == "mlp" and summary["epochs"] == 3
    assert summary["test_accuracy"] < 0.1 and summary["test_true_class_prob"] < 0.2
    for name in ("state_dict.pt", "model.pt2", "model.torchscript.pt", "model.onnx", "input_spec.json",
                 "index_to_name.json", tm.INFO_FILE):
        assert (out / name).is_file(), name
    info = json.loads((out / tm.INFO_FILE).read_text())
    assert info["kind"] == "misinformation" and info["loss"] == "-log(1 - p_true)"

    client = MlflowClient(tracking_uri)
    run = client.get_run(summary["run_id"])
    assert run.data.tags["stealguard.kind"] == "misinformation"
    assert run.data.metrics["test_accuracy"] == summary["test_accuracy"]
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "misinformation")}
    assert "misinformation/state_dict.pt" in logged and "misinformation/misinformation.json" in logged

    model, _, spec = load_exported(out)
    victim, _, _ = load_exported(digits_victim_dir)
    x = torch.randn(4, *spec.shape)
    with torch.no_grad():
        y = torch.softmax(victim(x), 1)
    defense = build_defense({"name": "adaptive_misinformation", "tau": 1.0}, misinformation=model)
    out_probs = defense(y, x).probs
    with torch.no_grad():  # tau = 1: every row is gated, h = sigmoid(1000 (1 - max y)) >= 1/2
        m = torch.softmax(model(x), 1)
    h = torch.sigmoid(1000 * (1 - y.amax(1, keepdim=True)))
    assert (h >= 0.5).all()
    torch.testing.assert_close(out_probs, (1 - h) * y + h * m, atol=1e-6, rtol=0)
