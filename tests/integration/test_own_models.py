"""Bring your own registered model: five models registered with plain MLflow calls by a script that knows nothing
about StealGuard (tests/support/register_own_models.py: a residual CNN, an ONNX graph, LogisticRegression on
digits, a binary GradientBoostingClassifier on breast cancer, a RandomForest on iris), packaged from
``models:/<name>@production`` with identity, mad and reverse_sigmoid (each model's MAD archive through ``mlflow run
. -e package``), served by one real TorchServe: answers on the simplex, MAD's budget held, the undefended twin equal to
the original model's predict_proba, the describe API showing the contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from mlflow import MlflowClient

from mlflow_project.lifecycle import package
from tests.support.cli import BIN, venv_env
from tests.support.torchserve import REPO, TorchServe

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = REPO / "tests" / "support" / "register_own_models.py"
MAD = {"name": "mad", "epsilon": 0.5, "norm": "l1"}
DEFENSES = {"identity": {"name": "identity"}, "mad": MAD, "reverse_sigmoid": {"name": "reverse_sigmoid", "beta": 0.7}}
SHAPES = {"own_cnn": [1, 8, 8], "own_onnx": [13], "own_logreg": [64], "own_gbc": [30], "own_forest": [4]}
DIGITS = [str(i) for i in range(10)]
CLASSES = {"own_cnn": DIGITS, "own_onnx": ["0", "1", "2"], "own_logreg": DIGITS,
           "own_gbc": ["malignant", "benign"], "own_forest": ["setosa", "versicolor", "virginica"]}
# Every model undefended (its twin must equal predict_proba), with MAD (the imported model's surrogate) and with
# reverse_sigmoid; each model's MAD archive is packaged through `mlflow run . -e package`, as a user would.
ARCHIVES = [(m, d) for d in DEFENSES for m in SHAPES]
VIA_CLI = "mad"
# what the operator passes as a flag where neither the signature nor registered metadata says it
CLI_FLAGS = {"own_gbc": ["-P", "class_names=malignant,benign"]}
ROWS = 40


def env_for(uri: str) -> dict[str, str]:
    return venv_env(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_models")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = env_for(uri)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(root / "data")], cwd=root, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    # the operator's registered metadata (the script set none): iris's class names as a tag
    client.set_registered_model_tag("own_forest", "stealguard.classes", "setosa,versicolor,virginica")
    store = root / "store"
    for model, defense in ARCHIVES:
        if defense != VIA_CLI:
            package.main(["--name", f"{model}_{defense}", "--victim", f"models:/{model}@production", "--defense",
                          json.dumps(DEFENSES[defense]), "--tracking-uri", uri, "--export-path", str(store)])
    (root / "mad.json").write_text(json.dumps(MAD))
    for model in SHAPES:
        cmd = [str(BIN / "mlflow"), "run", ".", "-e", "package", "--env-manager", "local", "-P",
               f"name={model}_{VIA_CLI}", "-P", f"victim=models:/{model}@production", "-P",
               f"defense={root / 'mad.json'}", "-P", f"export_path={store}", *CLI_FLAGS.get(model, [])]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (model, (proc.stdout + proc.stderr)[-3000:])
        assert "succeeded" in proc.stderr and (store / f"{model}_{VIA_CLI}.mar").is_file(), model
    names = [f"{model}_{defense}.mar" for model, defense in ARCHIVES]
    server = TorchServe(store, root / "ts", models=names)
    server.start(timeout=3600)  # waits for a READY worker of every model (15 workers on a loaded 2-core machine)
    try:
        yield server, root / "data"
    finally:
        server.stop()


def data(root: Path, model: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(root / f"{model}.npz") as npz:
        return npz["x"][:ROWS], npz["p"][:ROWS]


def answer(server: TorchServe, name: str, x: np.ndarray) -> np.ndarray:
    r = requests.post(f"{server.inference_url}/predictions/{name}", json={"instances": x.tolist()}, timeout=600)
    assert r.status_code == 200, r.text
    return np.array([row["probabilities"] for row in r.json()["predictions"]], dtype=np.float64)


@pytest.mark.parametrize("model", list(SHAPES))
def test_undefended_twin_equals_the_original_model(served, model):
    server, root = served
    x, p = data(root, model)
    got = answer(server, f"{model}_identity", x)
    assert got.shape == p.shape == (min(ROWS, len(p)), len(CLASSES[model]))
    assert np.abs(got - p).max() <= 1e-5, np.abs(got - p).max()


@pytest.mark.parametrize(("model", "defense"), [a for a in ARCHIVES if a[1] != "identity"])
def test_defended_answers_on_the_simplex_within_budget(served, model, defense):
    server, root = served
    x, p = data(root, model)
    got = answer(server, f"{model}_{defense}", x)
    assert got.shape == p.shape
    assert (got >= 0).all() and np.allclose(got.sum(axis=1), 1.0, atol=1e-6)
    assert np.abs(got - p).max() > 1e-3  # defended: not the victim's posterior
    if defense == "mad":
        assert np.abs(got - p).sum(axis=1).max() <= MAD["epsilon"] + 1e-5


@pytest.mark.parametrize("model", list(SHAPES))
def test_describe_api_shows_the_contract(served, model):
    server, _ = served
    r = requests.get(f"{server.management_url}/models/{model}_mad?customized=true", timeout=60)
    assert r.status_code == 200, r.text
    meta = r.json()[0]["customizedMetadata"]
    contract = json.loads(meta) if isinstance(meta, str) else meta
    assert contract["input"]["shape"] == SHAPES[model] and contract["input"]["dtype"] == "float32"
    assert contract["input"]["json"] == "normalised"
    assert [str(c) for c in contract["classes"]] == CLASSES[model]
    assert contract["defense"]["name"] == "mad"
