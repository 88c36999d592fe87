"""``package`` from the registry, against a real MLflow tracking store (SQLite in a temp dir): a registered
defense alone builds a complete archive (defense config, the version's own surrogate weights, the victim it was
tuned for), model-config.yaml records name, version, run id and alias, and the archive's handler answers what
the version's pyfunc predicts."""

from __future__ import annotations

import json
import zipfile

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from ts.context import RequestProcessor

from handlers.stealguard_handler import StealGuardHandler
from mlflow_project.lifecycle import tracking
from mlflow_project.lifecycle.bundle import read_bundle
from mlflow_project.lifecycle.package import main as package
from mlflow_project.lifecycle.promote import promote
from mlflow_project.lifecycle.register import register
from tests.support.handler import make_context
from tests.support.victims import export_digits_mlp

MAD = {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1", "jacobian": "last_layer"}
NAME = "digits_mlp-defense"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite store with a tiny digits MLP victim and two registered defense versions (production -> 1)."""
    root = tmp_path_factory.mktemp("registry")
    victim = root / "digits_mlp"
    export_digits_mlp(victim)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.setup(uri)
    v1 = register(MAD, str(victim), alias="production")
    v2 = register({**MAD, "epsilon": 1.0}, str(victim))
    yield {"root": root, "victim": victim, "v1": v1, "v2": v2}
    mlflow.set_tracking_uri(None)
    mp.undo()


def _unpack(mar, dest):
    with zipfile.ZipFile(mar) as z:
        z.extractall(dest)
    return dest, yaml.safe_load((dest / "model-config.yaml").read_text())["stealguard"]


def _serve(model_dir):
    handler = StealGuardHandler()
    context = make_context(model_dir, model_dir / "model-config.yaml", name="dv")
    handler.initialize(context)
    return handler, context


def _serve_and_ask(model_dir, x: np.ndarray) -> tuple[str, np.ndarray]:
    """Initialise the unpacked archive's handler and send it ``x``: (its header label, the probabilities)."""
    handler, context = _serve(model_dir)
    context.request_ids = {0: "r0"}
    context.request_processor = [RequestProcessor({"body": {"content-type": "application/json"}})]
    (body,) = handler.handle([{"body": {"instances": x.tolist()}}], context)
    return handler.model.header, np.array([p["probabilities"] for p in json.loads(body)["predictions"]])


def test_a_registered_alias_alone_builds_a_complete_archive_that_serves_like_the_pyfunc(registry, tmp_path):
    # the pyfunc runs the registered (eager) surrogate: shipped eager too, the answers agree to 1e-12
    mar = package(["--name", "dv", "--defense", f"models:/{NAME}@production", "--export-path", str(tmp_path),
                   "--surrogate-runtime", "eager"])
    model_dir, sg = _unpack(mar, tmp_path / "unpacked")
    v1 = registry["v1"]
    assert sg["version"] == {"name": NAME, "version": "1", "run_id": v1["run_id"], "alias": "production",
                             "source": f"models:/{NAME}@production", "victim_source": "bundle"}
    assert sg["defense"]["epsilon"] == 0.5 and sg["victim"]["class"] == "MLP"
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "v1"))
    bundle = read_bundle(f"{local}/artifacts/bundle")
    shipped = torch.load(model_dir / sg["surrogate"]["file"], weights_only=True)
    registered = torch.load(bundle.root / "surrogate_state_dict.pt", weights_only=True)
    assert shipped.keys() == registered.keys() and all(torch.equal(shipped[k], registered[k]) for k in shipped)
    victim = torch.load(model_dir / sg["victim"]["file"], weights_only=True)
    assert all(torch.equal(victim[k], v) for k, v in
               torch.load(registry["victim"] / "state_dict.pt", weights_only=True).items())

    x = np.random.default_rng(1).random((6, 64), dtype=np.float32)
    header, served = _serve_and_ask(model_dir, x)
    assert header == f"mad_argmax@{NAME}/1"
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}@production").predict(x)
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-12)


def test_a_version_number_promotion_and_rebuild_change_what_is_embedded(registry, tmp_path):
    sg2 = _unpack(package(["--name", "dv2", "--defense", f"models:/{NAME}/2", "--export-path", str(tmp_path)]),
                  tmp_path / "u2")[1]
    assert sg2["version"]["version"] == "2" and sg2["version"]["alias"] is None
    assert sg2["version"]["run_id"] == registry["v2"]["run_id"] and sg2["defense"]["epsilon"] == 1.0
    promote(NAME, 2)
    try:
        mar = package(["--name", "dv", "--defense", f"models:/{NAME}@production", "--export-path", str(tmp_path),
                       "--resolve-at-start", "--fallback", "embedded"])
        model_dir, sg = _unpack(mar, tmp_path / "u3")
        assert sg["version"]["version"] == "2" and sg["version"]["alias"] == "production"
        assert sg["version"]["resolve_at_start"] is True and sg["version"]["fallback"] == "embedded"
        assert (model_dir / "registry_models.py").is_file()  # to build another version's networks at start
    finally:
        promote(NAME, 1)


def test_a_registered_victim_is_taken_from_its_runs_exports_and_recorded(registry, tmp_path):
    with mlflow.start_run(run_name="victim") as run:
        mlflow.log_artifacts(str(registry["victim"]), artifact_path="exports")
    client = MlflowClient()  # a registered victim whose run logged train_victim's export directory
    client.create_registered_model("digits_mlp")
    client.create_model_version("digits_mlp", f"{run.info.artifact_uri}/exports", run_id=run.info.run_id)
    mar = package(["--name", "dvv", "--defense", f"models:/{NAME}/1", "--victim", "models:/digits_mlp/1",
                   "--runtime", "eager", "--export-path", str(tmp_path)])
    sg = _unpack(mar, tmp_path / "u")[1]
    assert sg["version"]["victim_source"] == "models:/digits_mlp/1"
    assert sg["version"]["victim"] == {"name": "digits_mlp", "version": "1", "run_id": run.info.run_id,
                                       "alias": None}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--defense", f"models:/{NAME}@nope"], "--defense: cannot resolve models:/digits_mlp-defense@nope"),
        (["--defense", "models:/no-such-defense/1"], "--defense: cannot resolve"),
        (["--defense", f"models:/{NAME}/1", "--resolve-at-start"], "--resolve-at-start needs"),
        (["--defense", f"models:/{NAME}@production", "--version", "3"], "--version/--version-name"),
        (["--defense", '{"name": "identity"}'], "--victim is required"),
    ],
)
def test_bad_registry_references_are_refused_with_the_field_named(registry, tmp_path, capsys, args, message):
    with pytest.raises((ValueError, SystemExit)) as info:
        package(["--name", "bad", "--export-path", str(tmp_path), *args])
    text = str(info.value) if info.type is ValueError else capsys.readouterr().err
    assert message in text
    assert not list(tmp_path.glob("*.mar"))
    assert str(MlflowClient().get_model_version_by_alias(NAME, "production").version) == "1"


def _weights_equal(a, b) -> bool:
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_registered_adaptive_misinformation_ships_its_own_misinformation_model(registry, tmp_path):
    mis = {}
    for seed in (7, 8):
        mis[seed] = tmp_path / f"misinformation-{seed}"
        export_digits_mlp(mis[seed], seed=seed)
    name = "digits_mlp-am"
    register({"name": "adaptive_misinformation", "tau": 1.0}, str(registry["victim"]), name=name,
             misinformation=str(mis[7]))
    mar = package(["--name", "am", "--defense", f"models:/{name}/1", "--export-path", str(tmp_path)])
    model_dir, sg = _unpack(mar, tmp_path / "u")
    assert sg["defense"]["name"] == "adaptive_misinformation" and "surrogate" not in sg
    assert _weights_equal(model_dir / sg["misinformation"]["file"], mis[7] / "state_dict.pt")

    x = np.random.default_rng(2).random((5, 64), dtype=np.float32)
    header, served = _serve_and_ask(model_dir, x)
    assert header == f"adaptive_misinformation@{name}/1"
    np.testing.assert_allclose(served, mlflow.pyfunc.load_model(f"models:/{name}/1").predict(x), rtol=0, atol=1e-12)

    mar = package(["--name", "am2", "--defense", f"models:/{name}/1", "--misinformation", str(mis[8]),
                   "--export-path", str(tmp_path)])  # an explicit model still wins over the bundle's
    model_dir, sg = _unpack(mar, tmp_path / "u2")
    assert _weights_equal(model_dir / sg["misinformation"]["file"], mis[8] / "state_dict.pt")
    with pytest.raises(ValueError, match="does not use a misinformation model"):
        package(["--name", "x", "--defense", f"models:/{NAME}/1", "--misinformation", str(mis[8]),
                 "--export-path", str(tmp_path)])
