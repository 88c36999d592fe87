"""Defense versions in a real MLflow tracking store (SQLite in a temp dir): register, promote, roll back, and the
pyfunc that scores offline exactly as the server does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mlflow_project.lab import data
from mlflow_project.lab.models import build_model
from mlflow_project.lab.train_victim import export_victim
from mlflow_project.lifecycle import tracking
from mlflow_project.lifecycle.bundle import DefendedVictim, build_victim, read_bundle, write_bundle
from mlflow_project.lifecycle.promote import promote
from mlflow_project.lifecycle.register import config_from_run, recommended_child, register
from plugins import build_defense
from tests.support.victims import export_digits_mlp

REPO = Path(__file__).resolve().parents[2]
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


def test_a_version_carries_only_the_pins_and_code_the_pyfunc_scores_with(store, victim_dir, tmp_path):
    reg = register(MAD, str(victim_dir), name="lean")
    local = Path(mlflow.artifacts.download_artifacts(reg["model_uri"], dst_path=str(tmp_path / "version")))
    requirements = {line for line in (local / "requirements.txt").read_text().splitlines() if line}
    pins = {}
    for name in ("serve", "lab", "dev"):
        for line in (REPO / "requirements" / f"{name}.txt").read_text().splitlines():
            if "==" in line:
                pins[line.split("==")[0].lower()] = line
    assert {pins["torch"], pins["numpy"], pins["pydantic"], pins["mlflow"]} <= requirements, requirements
    assert requirements <= set(pins.values()), "every requirement of a version is one of the project's pins"
    for unwanted in ("pytest", "ruff", "hypothesis", "torchserve", "torch-model-archiver", "matplotlib",
                     "scikit-learn", "mlxtend", "tqdm"):
        assert pins[unwanted] not in requirements, f"{unwanted} is not needed to score"
    code = local / "code"
    shipped = {p.relative_to(code).as_posix() for p in code.rglob("*.py")}
    assert {"plugins/registry.py", "plugins/defenses/mad_argmax.py", "mlflow_project/lifecycle/bundle.py",
            "mlflow_project/lab/models.py", "mlflow_project/__init__.py"} <= shipped, shipped
    assert not {p for p in shipped if p.startswith(("mlflow_project/sweep", "mlflow_project/ops"))}, shipped
    assert not {"mlflow_project/lifecycle/register.py", "mlflow_project/lifecycle/package.py",
                "mlflow_project/lab/attacks.py", "mlflow_project/lab/training.py"} & shipped, shipped
    # A fresh process outside the repository scores with the version's own code/ only.
    script = textwrap.dedent(f"""
        import sys, mlflow, numpy as np
        model = mlflow.pyfunc.load_model({str(local)!r})
        print(model.predict(np.zeros((3, 64), dtype=np.float32)).sum(axis=1).tolist())
        for name, module in sorted(sys.modules.items()):
            if name.split(".")[0] in ("plugins", "handlers", "mlflow_project"):
                print(name, getattr(module, "__file__", None))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    sums, *loaded = r.stdout.splitlines()
    np.testing.assert_allclose(json.loads(sums), 1.0, atol=1e-6)
    assert any(line.startswith("mlflow_project.lifecycle.bundle ") for line in loaded), loaded
    outside = [line for line in loaded if not line.split(" ", 1)[1].startswith(str(code))]
    assert not outside, f"imported from outside the version's code/: {outside}"


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


AM = {"name": "adaptive_misinformation", "tau": 1.0}  # tau = 1: every row is gated, the model always shows


def _misinformation_dir(root, seed: int):
    """A train_misinformation-shaped export directory (the victim's layout) with seeded random weights."""
    out = root / f"misinformation-{seed}"
    export_digits_mlp(out, seed=seed)
    return out


@pytest.fixture(scope="module")
def misinformation_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("misinformation")
    return _misinformation_dir(root, 1), _misinformation_dir(root, 2)


def _am_expected(victim_dir, misinformation_dir, x):
    """adaptive_misinformation built directly on the two export directories (what the bundle must reproduce)."""
    victim, mis = build_victim(victim_dir), build_victim(misinformation_dir)
    with torch.no_grad():
        y = torch.softmax(victim(x).to(torch.float64), dim=1)
    return build_defense(AM, misinformation=mis, num_classes=10)(y, x).probs


def test_a_bundle_carries_the_misinformation_model_and_uses_it(tmp_path, victim_dir, misinformation_dirs):
    first, second = misinformation_dirs
    bundle = read_bundle(write_bundle(tmp_path / "b", AM, victim_dir, misinformation_dir=first))
    assert bundle.misinformation["source"] == str(first) and bundle.surrogate is None
    assert (bundle.root / bundle.misinformation["file"]).is_file()
    x = torch.randn(8, 64)
    got = DefendedVictim(read_bundle(bundle.root))(x).probs
    torch.testing.assert_close(got, _am_expected(victim_dir, first, x), rtol=0, atol=1e-12)
    assert not torch.allclose(got, _am_expected(victim_dir, second, x))  # the bundled model, not any model


def test_the_misinformation_model_is_required_exactly_when_the_defense_needs_it(tmp_path, victim_dir,
                                                                              misinformation_dirs):
    with pytest.raises(ValueError, match="needs a misinformation model"):
        write_bundle(tmp_path / "b", AM, victim_dir)
    with pytest.raises(ValueError, match="does not use a misinformation model.*adaptive_misinformation"):
        write_bundle(tmp_path / "b", MAD, victim_dir, misinformation_dir=misinformation_dirs[0])
    with pytest.raises(ValueError, match="not a misinformation export directory"):
        write_bundle(tmp_path / "b", AM, victim_dir, misinformation_dir=tmp_path)
    other = _misinformation_dir(tmp_path, 3)  # then said to answer 3 classes (trained for another victim)
    spec = json.loads((other / "input_spec.json").read_text())
    (other / "input_spec.json").write_text(json.dumps({**spec, "num_classes": 3}))
    with pytest.raises(ValueError, match="answers 3 classes but the victim has 10"):
        write_bundle(tmp_path / "b", AM, victim_dir, misinformation_dir=other)


def test_register_ships_the_misinformation_model_in_the_pyfunc(store, victim_dir, misinformation_dirs):
    first, second = misinformation_dirs
    with mlflow.start_run(run_name="misinformation") as trained:  # where train_misinformation logs its export
        mlflow.log_artifacts(str(second), artifact_path="misinformation")
    x = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    for ref, expected_dir in ((str(first), first), (f"runs:/{trained.info.run_id}/misinformation", second)):
        reg = register(AM, str(victim_dir), name="am", misinformation=ref)
        model = mlflow.pyfunc.load_model(reg["model_uri"])
        assert model.metadata.metadata["stealguard"]["misinformation"]["source"] == ref
        expected = _am_expected(victim_dir, expected_dir, torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(model.predict(x), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs a misinformation model"):
        register(AM, str(victim_dir), name="am")
    with pytest.raises(ValueError, match="neither an MLflow artifact URI.*nor an export directory"):
        register(AM, str(victim_dir), name="am", misinformation=str(victim_dir.parent / "nowhere"))


def test_register_from_a_point_run_takes_the_misinformation_model_it_was_evaluated_with(store, victim_dir,
                                                                                      misinformation_dirs, capsys):
    from mlflow_project.lifecycle.register import main

    first, second = misinformation_dirs
    runs = {}
    for name, config, mis in (("am", AM, first), ("mad", MAD, "")):
        with mlflow.start_run(run_name=name) as run:  # what evaluate logs for a sweep point
            mlflow.log_params({"victim": str(victim_dir), "misinformation": str(mis)})
            mlflow.log_dict(config, "defense.json")
        runs[name] = run.info.run_id
    x = torch.randn(5, 64)

    def registered(*argv):
        local = mlflow.artifacts.download_artifacts(main([*argv, "--tracking-uri", store])["model_uri"])
        return read_bundle(f"{local}/artifacts/bundle")

    bundle = registered("--run-id", runs["am"])
    assert bundle.misinformation["source"] == str(first)
    torch.testing.assert_close(DefendedVictim(bundle)(x).probs, _am_expected(victim_dir, first, x), rtol=0, atol=1e-12)
    explicit = registered("--run-id", runs["am"], "--misinformation", str(second))
    torch.testing.assert_close(DefendedVictim(explicit)(x).probs, _am_expected(victim_dir, second, x), rtol=0,
                               atol=1e-12)
    assert registered("--run-id", runs["mad"]).misinformation is None  # the run's empty param is not used
    with pytest.raises(SystemExit):
        main(["--run-id", runs["mad"], "--misinformation", str(first), "--tracking-uri", store])
    assert "does not use a misinformation model" in capsys.readouterr().err
