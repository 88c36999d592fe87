"""train_victim: trains, exports every runtime format, logs to MLflow and registers the model."""

from __future__ import annotations

import json

import mlflow
import onnxruntime as ort
import pytest
import torch
from mlflow.tracking import MlflowClient

from handlers.victim_export import ALL_FILES
from mlflow_project.lab import train_victim as tv
from mlflow_project.lab.evaluate import load_victim


def test_train_victim_logs_registers_and_exports(tracking_uri, tmp_path):
    out = tmp_path / "victim"
    summary = tv.main([
        "--dataset", "digits", "--arch", "mlp", "--epochs", "6", "--lr", "0.05", "--seed", "3",
        "--registered-model-name", "lab_digits_victim", "--output-dir", str(out), "--no-progress",
    ])
    assert summary["test_accuracy"] > 0.9
    client = MlflowClient(tracking_uri)
    run = client.get_run(summary["run_id"])
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "stealguard"
    params = run.data.params
    for k, v in {"dataset": "digits", "arch": "mlp", "epochs": "6", "lr": "0.05", "seed": "3",
                 "registered_model_name": "lab_digits_victim"}.items():
        assert params[k] == v
    assert abs(run.data.metrics["test_accuracy"] - summary["test_accuracy"]) < 1e-9
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6

    versions = client.search_model_versions("name='lab_digits_victim'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].run_id == run.info.run_id

    logged = {f.path for f in client.list_artifacts(run.info.run_id, "exports")}
    assert {f"exports/{n}" for n in ALL_FILES} <= logged

    # every exported runtime gives the same logits as the eager model
    model, arch, spec = tv.load_exported(out)
    x = torch.randn(7, *spec.shape)
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(torch.export.load(out / "model.pt2").module()(x), ref, atol=1e-5)
        assert torch.allclose(torch.jit.load(str(out / "model.torchscript.pt"))(x), ref, atol=1e-5)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert torch.allclose(torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]), ref, atol=1e-4)
    doc = json.loads((out / "input_spec.json").read_text())
    assert doc["shape"] == [64] and doc["arch"] == "mlp" and len(doc["classes"]) == 10 and doc["std"] > 0
    assert json.loads((out / "index_to_name.json").read_text())["3"] == "3"

    # the registered model loads back as a victim, with its input spec
    mlflow.set_tracking_uri(tracking_uri)
    victim = load_victim("models:/lab_digits_victim/1")
    assert victim.arch == "mlp" and victim.spec == spec
    with torch.no_grad():
        assert torch.allclose(victim.model(x), ref, atol=1e-6)


def test_exports_are_checked_against_the_eager_model(tmp_path):
    result = tv.train_victim("digits", "mlp", epochs=1, seed=0, progress=False)
    tv.export_victim(result.model, result.arch, result.spec, tmp_path)
    other = tv.train_victim("digits", "mlp", epochs=1, seed=1, progress=False).model
    tv.check_exports(tmp_path, result.model, result.spec)  # the model they came from passes
    with pytest.raises(RuntimeError, match="disagrees with the eager model"):
        tv.check_exports(tmp_path, other, result.spec)
