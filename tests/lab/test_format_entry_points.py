"""The entry points that write and read the formats, through the real ``mlflow run . -e NAME --env-manager local``:
train_victim writes a VictimExport (every runtime agreeing with the eager module), train_misinformation reads
it, register bundles both (the pyfunc scores through the server's pipeline), and package builds an archive whose
model-config.yaml handlers.config parses."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml

from handlers.config import CONFIG_FILE, parse
from handlers.victim_export import VictimExport
from mlflow_project.lab.models import ARCHITECTURES
from tests.support.cli import venv_env

REPO = Path(__file__).resolve().parents[2]
DEFENSE = {"name": "adaptive_misinformation", "tau": 0.5}


def mlflow_run(entry: str, uri: str, **params) -> str:
    argv = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        argv += ["-P", f"{key}={value}"]
    env = venv_env(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"mlflow run -e {entry} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_export_bundle_and_archive_formats_through_the_mlflow_cli(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    victim_dir, mis_dir = tmp_path / "victim", tmp_path / "mis"
    # every value given as the main logs it again (it re-logs its params into the project's run)
    mlflow_run("train_victim", uri, dataset="digits", arch="mlp", epochs=3, lr=0.05, batch_size=32, seed=1,
               registered_model_name="fmt-victim", output_dir=victim_dir)
    victim = VictimExport.open(victim_dir)
    assert (victim.arch, victim.num_classes, victim.shape, victim.dataset) == ("mlp", 10, [64], "digits")
    x = torch.rand(5, 64, generator=torch.Generator().manual_seed(0))
    eager = victim.eager(ARCHITECTURES)
    with torch.no_grad():
        ref = eager(x)
        for runtime in ("export", "torchscript", "onnx"):
            torch.testing.assert_close(victim.runtime(runtime)(x), ref, rtol=1e-4, atol=1e-4)

    mlflow_run("train_misinformation", uri, victim=victim_dir, dataset="digits", arch="mlp", epochs=1, lr=0.02,
               batch_size=32, seed=0, output_dir=mis_dir)
    mis = VictimExport.open(mis_dir, "misinformation", "train_misinformation")
    assert (mis.arch, mis.num_classes, mis.dataset) == (victim.arch, victim.num_classes, victim.dataset)

    mlflow_run("register", uri, config=json.dumps(DEFENSE), victim=victim_dir, name="fmt-defense",
               misinformation=mis_dir)
    mlflow.set_tracking_uri(uri)
    try:
        scored = mlflow.pyfunc.load_model("models:/fmt-defense/1").predict(x.numpy())
    finally:
        mlflow.set_tracking_uri(None)
    assert scored.shape == (5, 10) and np.allclose(scored.sum(axis=1), 1.0)

    mlflow_run("package", uri, name="fmt_am", defense="models:/fmt-defense/1", export_path=tmp_path / "store")
    with zipfile.ZipFile(tmp_path / "store" / "fmt_am.mar") as mar:
        mar.extractall(tmp_path / "model")
    cfg = parse(yaml.safe_load((tmp_path / "model" / CONFIG_FILE).read_text()), str(tmp_path / "model"))
    assert cfg.defense_name == "adaptive_misinformation" and cfg.version_label == "fmt-defense/1"
    assert (cfg.victim.runtime, list(cfg.input.shape), cfg.misinformation.runtime) == ("eager", [64], "eager")
