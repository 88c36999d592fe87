"""Packaging (mlflow_project.lifecycle.package) and the shipped TorchServe configs, without a server."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

from mlflow_project.lifecycle.package import main as package
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
        "surrogate/models.py",
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
    assert sg["surrogate"]["runtime"] == "eager"
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
