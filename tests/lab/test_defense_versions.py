"""Defense versions in a real MLflow tracking store (SQLite in a temp dir): register, promote, roll back, and the
pyfunc that scores offline exactly as the server does."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mlflow_project import data, tracking
from mlflow_project.defense_bundle import DefendedVictim, read_bundle, write_bundle
from mlflow_project.models import build_model
from mlflow_project.promote import promote
from mlflow_project.register import config_from_run, recommended_child, register
from mlflow_project.train_victim import export_victim

MAD = {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1", "jacobian": "last_layer"}


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("victim") / "digits_mlp"
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10)
    export_victim(model, "mlp", data.input_spec("digits", "mlp"), out, check=False)
    return out


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.setup(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_bundle_round_trip_builds_the_same_defended_victim(tmp_path, victim_dir):
    bundle = read_bundle(write_bundle(tmp_path / "b", MAD, victim_dir, surrogate_seed=3))
    assert bundle.defense["epsilon"] == 0.5 and bundle.surrogate["seed"] == 3
    x = torch.randn(8, 64)
    a, b = DefendedVictim(bundle)(x), DefendedVictim(read_bundle(bundle.root))(x)
    assert torch.equal(a.probs, b.probs)
    assert torch.equal(a.probs.argmax(1), DefendedVictim(bundle).probabilities(x).argmax(1))  # argmax kept


def test_a_bad_config_or_victim_is_refused_before_anything_is_written(tmp_path, victim_dir):
    with pytest.raises(ValueError, match="epsilon"):
        write_bundle(tmp_path / "b", {"name": "mad", "epsilon": -1}, victim_dir)
    with pytest.raises(ValueError, match="not a victim export directory"):
        write_bundle(tmp_path / "b", MAD, tmp_path)


def test_register_promote_and_roll_back_with_the_pyfunc_scoring_like_the_server(store, victim_dir):
    v1 = register(MAD, str(victim_dir))
    assert v1["name"] == "digits_mlp-defense" and v1["version"] == "1"
    v2 = register({**MAD, "epsilon": 1.0}, str(victim_dir))
    assert v2["version"] == "2"
    client = MlflowClient()
    assert promote(v1["name"], 1)["previous"] == ""
    x = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)

    def production():
        model = mlflow.pyfunc.load_model(f"models:/{v1['name']}@production")
        return model.predict(x)

    def expected(version):
        local = mlflow.artifacts.download_artifacts(f"models:/{v1['name']}/{version}")
        return DefendedVictim(read_bundle(f"{local}/artifacts/bundle"))(torch.from_numpy(x)).probs.numpy()

    first = production()
    np.testing.assert_array_equal(first, expected(1))
    np.testing.assert_allclose(first.sum(1), 1.0, atol=1e-6)
    assert promote(v1["name"], 2)["previous"] == "1"
    second = production()
    np.testing.assert_array_equal(second, expected(2))
    assert not np.allclose(first, second)  # epsilon 1.0 moves rows further than 0.5
    assert promote(v1["name"], 1)["previous"] == "2"  # rollback
    np.testing.assert_array_equal(production(), first)
    mv = client.get_model_version(v1["name"], "1")
    assert json.loads(mv.tags["stealguard.defense_config"])["epsilon"] == 0.5
    assert mv.tags["stealguard.promoted_production_from"] == "2"


def test_promote_refuses_unknown_aliases_and_versions(store, victim_dir):
    reg = register({"name": "reverse_sigmoid", "beta": 0.5}, str(victim_dir), name="rs")
    with pytest.raises(ValueError, match="allowed: production, candidate"):
        promote(reg["name"], 1, alias="live")
    with pytest.raises(ValueError, match="no version 7"):
        promote(reg["name"], 7)


def test_register_from_a_sweep_point_tagged_recommended(store, victim_dir, tmp_path):
    with mlflow.start_run(run_name="sweep") as parent:
        for eps, recommended in ((0.2, "false"), (0.8, "true")):
            with mlflow.start_run(run_name=f"mad_argmax {eps}", nested=True):
                mlflow.log_param("victim", str(victim_dir))
                mlflow.log_dict({**MAD, "epsilon": eps}, "defense.json")
                mlflow.log_metrics({"defender_accuracy": 0.9, "attacker_accuracy": 0.5})
                mlflow.set_tag("stealguard.recommended", recommended)
    client = MlflowClient()
    child = recommended_child(client, parent.info.run_id)
    config, victim, tuned = config_from_run(client, child, tmp_path)
    assert config["epsilon"] == 0.8 and victim == str(victim_dir) and tuned["run_id"] == child
    reg = register(config, victim, provenance={"tuned": tuned})
    doc = mlflow.pyfunc.load_model(reg["model_uri"]).metadata.metadata["stealguard"]
    assert doc["provenance"]["tuned"]["run_id"] == child and doc["defense"]["epsilon"] == 0.8
    with mlflow.start_run(run_name="empty sweep") as empty:
        pass
    with pytest.raises(ValueError, match="no point of sweep"):
        recommended_child(client, empty.info.run_id)
