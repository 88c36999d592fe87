"""verify through the real `mlflow run . -e verify` CLI: a clone trained on watermarked answers is identified
(p < 1e-6), a model trained independently on the victim's own data is not (p > 0.01); both runs log to MLflow."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from handlers.monitor_stores import open_store
from mlflow_project.lab import data
from mlflow_project.lab.models import build_model
from mlflow_project.lab.train_victim import export_victim, train_victim
from mlflow_project.lab.training import TrainConfig, train_classifier
from plugins.monitor import StoreLimits
from plugins.monitor.watermark import Watermark
from tests.support.cli import BIN, venv_env

REPO = Path(__file__).resolve().parents[2]


def _mlflow_verify(suspect: Path, store: str, tracking_uri: str) -> dict:
    env = venv_env(MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS="1")
    cmd = [str(BIN / "mlflow"), "run", str(REPO), "-e", "verify", "--env-manager", "local", "-P", f"suspect={suspect}",
           "-P", f"watermarks={store}", "-P", "model=digits"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("{") and '"p_value"' in ln)
    return json.loads(line)


def test_verify_identifies_a_clone_and_not_an_independent_model(digits_victim, tmp_path, tracking_uri):
    victim = digits_victim
    spec = victim.spec
    pool = data.query_set("digits", spec)  # the attacker's queries: the victim's train part
    with torch.no_grad():
        y = torch.softmax(victim.model(pool).double(), dim=1)
    # a test-only rate (10 %) so that 1,437 queries leave ~140 records; production's default is 0.5 %
    answers, records, _ = Watermark(b"verify test key, not a real one", 0.10).apply(pool, y, y, now=1.0)
    store_url = f"sqlite:///{tmp_path}/monitor.sqlite"
    store = open_store(store_url, "digits", StoreLimits(max_records=100_000))
    store.record_watermarks(records)
    store.close()
    clone = build_model("mlp", spec.num_classes)
    train_classifier(clone, pool, answers.float(), TrainConfig(epochs=60, lr=0.05, seed=3), progress=False)
    export_victim(clone.eval(), "mlp", spec, tmp_path / "clone", runtimes=False)
    independent = train_victim("digits", "mlp", epochs=8, lr=0.05, seed=7, batch_size=32, progress=False)
    export_victim(independent.model, "mlp", spec, tmp_path / "independent", runtimes=False)

    stolen = _mlflow_verify(tmp_path / "clone", store_url, tracking_uri)
    innocent = _mlflow_verify(tmp_path / "independent", store_url, tracking_uri)
    assert stolen["watermarks"] == innocent["watermarks"] == len(records)
    assert stolen["p_value"] < 1e-6, stolen
    assert innocent["p_value"] > 0.01, innocent
    assert stolen["watermark_agreement"] > innocent["watermark_agreement"] + 0.3
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    logged = {r.data.params["suspect"]: r for r in runs if r.data.tags.get("stealguard.kind") == "verification"}
    assert logged[str(tmp_path / "clone")].data.metrics["p_value"] == stolen["p_value"]
    assert logged[str(tmp_path / "independent")].data.params["watermarks"] == store_url
