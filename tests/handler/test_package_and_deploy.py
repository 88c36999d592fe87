"""Packaging (mlflow_project.lifecycle.package) and the shipped TorchServe configs, without a server."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

from mlflow_project.lifecycle.package import main as package
from tests.support.cli import venv_env
from tests.support.torchserve import REPO
from tests.support.victims import export, make_net

MAD = '{"name": "mad_argmax", "epsilon": 0.5, "norm": "l1", "jacobian": "last_layer"}'


def props(name: str) -> dict[str, str]:
    lines = (REPO / "deploy" / name).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_production_config_is_loopback_prometheus_token_auth_on_model_api_off():
    p = props("config.properties")
    for key in ("inference_address", "management_address", "metrics_address"):
        assert p[key].startswith("http://127.0.0.1:"), key
    assert p["grpc_inference_address"] == p["grpc_management_address"] == "127.0.0.1"
    assert p["metrics_mode"] == "prometheus"
    assert p["metrics_config"] == "deploy/metrics.yaml" and (REPO / p["metrics_config"]).is_file()
    assert p["disable_token_authorization"] == "false"
    assert p["enable_model_api"] == "false"
    assert p["model_store"] == "model_store"


def test_dev_config_differs_only_by_token_auth_and_the_defense_header_and_says_so():
    prod, dev = props("config.properties"), props("config.dev.properties")
    assert dev.pop("disable_token_authorization") == "true"
    prod.pop("disable_token_authorization")
    assert dev.pop("stealguard_defense_header") == "true"
    assert prod.pop("stealguard_defense_header") == "false"  # production tells clients nothing
    assert dev == prod
    text = (REPO / "deploy" / "config.dev.properties").read_text()
    assert "TOKEN AUTHORIZATION IS OFF" in text and "X-StealGuard-Defense" in text
    assert not any("secret" in k and "file" not in k for k in {**prod, **dev}), "no secret in a config file"


def _export_dir(tmp_path: Path) -> Path:
    """A train_victim-style export directory: state_dict.pt, input_spec.json, index_to_name.json."""
    out = tmp_path / "victim"
    net = make_net("lenet")
    state = Path(export(net, "eager", tmp_path / "x", "lenet").file)
    out.mkdir()
    (out / "state_dict.pt").write_bytes(state.read_bytes())
    doc = {
        "arch": "lenet",
        "num_classes": 10,
        "output": "logits",
        "dataset": "fashion_mnist",
        "shape": [1, 28, 28],
        "mean": 0.286,
        "std": 0.353,
        "classes": [f"c{i}" for i in range(10)],
    }
    (out / "input_spec.json").write_text(json.dumps(doc))
    (out / "index_to_name.json").write_text(json.dumps({str(i): f"c{i}" for i in range(10)}))
    return out


def test_package_an_export_directory_with_an_inline_defense(tmp_path):
    victim = _export_dir(tmp_path)
    mar = package(
        [
            "--name",
            "fm",
            "--victim",
            str(victim),
            "--defense",
            MAD,
            "--export-path",
            str(tmp_path / "s"),
            "--version",
            "4",
            "--version-name",
            "fm-defense",
            "--batch-size",
            "8.0",
        ]
    )
    z = zipfile.ZipFile(mar)
    names = set(z.namelist())
    assert {
        "stealguard_handler.py",
        "handlers/stealguard_handler.py",
        "handlers/metrics.py",
        "plugins/registry.py",
        "plugins/defenses/mad_argmax.py",
        "victim/state_dict.pt",
        "victim/models.py",
        "index_to_name.json",
        "surrogate/surrogate.onnx",  # last-layer mad_argmax: the surrogate ships as ONNX by default
        "model-config.yaml",
        "MAR-INF/MANIFEST.json",
    } <= names
    assert not [n for n in names if "__pycache__" in n]
    cfg = yaml.safe_load(z.read("model-config.yaml"))
    assert cfg["batchSize"] == 8
    sg = cfg["stealguard"]
    assert sg["defense"]["name"] == "mad_argmax" and sg["version"] == {"name": "fm-defense", "version": "4"}
    assert sg["input"]["image"] == {"size": [28, 28], "mode": "L", "mean": [0.286], "std": [0.353]}
    assert sg["victim"] == {
        "runtime": "eager",
        "file": "victim/state_dict.pt",
        "model_file": "victim/models.py",
        "class": "LeNet",
        "kwargs": {"num_classes": 10},
    }
    assert sg["surrogate"] == {"runtime": "onnx", "file": "surrogate/surrogate.onnx"}
    manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert manifest["model"]["handler"] == "stealguard_handler.py"
    assert manifest["model"]["configFile"] == "model-config.yaml"


def test_package_a_pt2_file_with_a_config_file_and_identity_needs_no_surrogate(tmp_path):
    net = make_net("mlp")
    pt2 = export(net, "export", tmp_path / "v", "mlp").file
    defense = tmp_path / "identity.yaml"
    defense.write_text("defense: {name: identity}\nversion: {name: twin, version: 1}\n")
    mar = package(
        [
            "--name",
            "twin",
            "--victim",
            str(pt2),
            "--defense",
            str(defense),
            "--input-shape",
            "64",
            "--export-path",
            str(tmp_path / "s"),
        ]
    )
    sg = yaml.safe_load(zipfile.ZipFile(mar).read("model-config.yaml"))["stealguard"]
    assert sg["victim"]["runtime"] == "export" and "surrogate" not in sg and "image" not in sg["input"]
    assert sg["version"]["version"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--defense", '{"name": "mad_argmax", "epsilon": -1}'], "invalid config for defense 'mad_argmax'"),
        (["--defense", '{"name": "nope"}'], "unknown defense 'nope'"),
        (["--runtime", "tflite"], "unknown runtime 'tflite'"),
    ],
)
def test_package_refuses_bad_input(tmp_path, args, message, capsys):
    victim = _export_dir(tmp_path)
    base = ["--name", "x", "--victim", str(victim), "--defense", MAD, "--export-path", str(tmp_path / "s")]
    with pytest.raises((ValueError, SystemExit)) as err:
        package(base + args)
    assert message in str(err.value) + capsys.readouterr().err


def test_package_ships_an_onnx_surrogate_that_the_handler_loads(tmp_path):
    from handlers.stealguard_handler import StealGuardHandler
    from tests.support.handler import make_context

    victim = _export_dir(tmp_path)
    mar = package(
        [
            "--name",
            "fm",
            "--victim",
            str(victim),
            "--defense",
            MAD,
            "--export-path",
            str(tmp_path / "s"),
            "--surrogate-runtime",
            "onnx",
        ]
    )
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(mar).extractall(unpacked)  # what TorchServe does with a .mar
    sg = yaml.safe_load((unpacked / "model-config.yaml").read_text())["stealguard"]
    assert sg["surrogate"] == {"runtime": "onnx", "file": "surrogate/surrogate.onnx"}
    handler = StealGuardHandler()
    handler.initialize(make_context(unpacked, unpacked / "model-config.yaml", name="fm"))
    assert handler.model.surrogate.kind == "onnx"
    assert handler.model.codec.labels == [f"c{i}" for i in range(10)]


def _surrogate_spec(mar: Path, tmp_path: Path) -> dict:
    unpacked = tmp_path / f"unpacked_{mar.stem}"
    zipfile.ZipFile(mar).extractall(unpacked)
    return yaml.safe_load((unpacked / "model-config.yaml").read_text())["stealguard"]["surrogate"]


def test_package_ships_a_last_layer_surrogate_as_checked_onnx_by_default(tmp_path, capsys):
    victim = _export_dir(tmp_path)
    base = ["--victim", str(victim), "--export-path", str(tmp_path / "s")]
    for name, defense in (
        ("mad", '{"name": "mad", "epsilon": 0.2}'),
        ("mad_argmax", MAD),
        ("grad2", '{"name": "gradient_redirection", "epsilon": 0.2, "target": "least_likely"}'),
    ):
        mar = package(["--name", name, "--defense", defense, *base])
        assert _surrogate_spec(mar, tmp_path) == {"runtime": "onnx", "file": "surrogate/surrogate.onnx"}, name
        assert "surrogate onnx (logits within" in capsys.readouterr().out
    forced = package(["--name", "forced", "--defense", MAD, "--surrogate-runtime", "eager", *base])
    assert _surrogate_spec(forced, tmp_path)["runtime"] == "eager"


@pytest.mark.parametrize(
    "defense",
    [
        '{"name": "mad", "epsilon": 0.2, "jacobian": "all"}',  # differentiates through the surrogate's weights
        '{"name": "gradient_redirection", "epsilon": 0.2, "target": "random"}',  # direction over the real layer
    ],
)
def test_auto_keeps_an_eager_surrogate_when_onnx_would_not_defend_the_same(tmp_path, defense, monkeypatch):
    monkeypatch.setenv("STEALGUARD_SECRET", "a-test-secret-of-enough-length-0123456789")
    victim = _export_dir(tmp_path)
    mar = package(["--name", "m", "--victim", str(victim), "--defense", defense, "--export-path", str(tmp_path)])
    assert _surrogate_spec(mar, tmp_path)["runtime"] == "eager"


def test_a_converted_surrogate_that_disagrees_falls_back_to_eager_with_auto_and_fails_when_forced(
    tmp_path, monkeypatch, caplog
):
    """An exporter that writes the wrong network (here: another seed's LeNet) is caught by the build-time check."""
    from mlflow_project.lifecycle import exports

    real = exports.save_onnx
    monkeypatch.setattr(exports, "save_onnx", lambda net, x, path: real(make_net("lenet", seed=99), x, path))
    victim = _export_dir(tmp_path)
    base = ["--victim", str(victim), "--defense", MAD, "--export-path", str(tmp_path / "s")]
    with caplog.at_level("WARNING", logger="mlflow_project.lifecycle.package"):
        mar = package(["--name", "auto", *base])
    assert _surrogate_spec(mar, tmp_path)["runtime"] == "eager"
    assert "shipping the surrogate as eager" in caplog.text and "logits differ from the eager" in caplog.text
    with pytest.raises(ValueError, match=r"--surrogate-runtime onnx: the onnx surrogate's logits differ"):
        package(["--name", "forced", "--surrogate-runtime", "onnx", *base])


def test_mlflow_run_package_ships_an_onnx_surrogate_by_default(tmp_path):
    import subprocess
    import sys

    victim = _export_dir(tmp_path)
    env = venv_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cmd = [str(Path(sys.executable).with_name("mlflow")), "run", str(REPO), "-e", "package", "--env-manager", "local",
           "-P", "name=fm_auto", "-P", f"victim={victim}", "-P", f"defense={MAD}",
           "-P", f"export_path={tmp_path / 's'}"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert _surrogate_spec(tmp_path / "s" / "fm_auto.mar", tmp_path) == {
        "runtime": "onnx", "file": "surrogate/surrogate.onnx"}
