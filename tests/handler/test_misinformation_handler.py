"""adaptive_misinformation served: the misinformation model ships in the archive (eager or ONNX), the handler
loads it as ``stealguard.misinformation``, confident rows keep the victim's answer and gated rows get the
misinformation model's; a missing, unloadable or unneeded misinformation model stops the worker from loading."""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from handlers.config import RuntimeSpec
from handlers.stealguard_handler import StealGuardHandler
from mlflow_project.lifecycle.package import main as package
from mlflow_project.lifecycle.package import model_files, stage
from tests.support.handler import Served, make_context
from tests.support.victims import export, make_net

TAU = 0.7
DEFENSE = {"name": "adaptive_misinformation", "tau": TAU}


def nets() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A victim that is confident on inputs of norm ~1 and near-uniform on inputs near 0 (no biases, a large
    last layer), and a misinformation model that is the victim with its class rows rolled by one: wherever it
    decides, it names the victim's top-1 + 1, so a gated row's top-1 always changes."""
    victim = make_net("mlp")
    with torch.no_grad():
        for layer in (victim.net[1], victim.net[3], victim.net[5]):
            layer.bias.zero_()
        victim.net[5].weight.mul_(300)
    mis = make_net("mlp")
    mis.load_state_dict(victim.state_dict())
    with torch.no_grad():
        mis.net[5].weight.copy_(torch.roll(victim.net[5].weight, 1, 0))
    return victim.eval(), mis.eval()


def served(root: Path, victim_files: RuntimeSpec, victim: torch.nn.Module, defense: dict,
           misinformation: RuntimeSpec | None) -> Served:
    config = stage(root, victim=victim_files, defense=defense, input_spec={"shape": [64], "max_rows": 64},
                   misinformation=misinformation)
    handler = StealGuardHandler()
    context = make_context(root, config)
    handler.initialize(context)
    return Served(handler, context, victim)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mis")
    victim, mis = nets()
    return victim, mis, export(victim, "eager", root / "v", "mlp"), root, {}


def mis_files(models, runtime: str) -> RuntimeSpec:
    """The misinformation model exported for ``runtime`` (once per module: ONNX export takes seconds)."""
    _, mis, _, root, cache = models
    if runtime not in cache:
        cache[runtime] = export(mis, runtime, root / f"m_{runtime}", "mlp")
    return cache[runtime]


@pytest.mark.parametrize("runtime", ["eager", "onnx"])
def test_confident_rows_keep_top1_and_gated_rows_get_the_misinformation(models, tmp_path, runtime):
    victim, mis, victim_files, _, _ = models
    files = mis_files(models, runtime)
    s = served(tmp_path / "model", victim_files, victim, DEFENSE, files)
    assert s.handler.model.misinformation.kind == runtime
    assert (tmp_path / "model" / "misinformation" / Path(files.file).name).is_file()

    x_in = torch.rand(24, 64, generator=torch.Generator().manual_seed(0))
    x = torch.cat([x_in, x_in * 1e-3])  # the second half: near 0, where the victim is near uniform
    a = s.one({"instances": x.tolist()})
    assert a.status == 200 and a.headers["X-StealGuard-Defense"] == "adaptive_misinformation@unversioned"
    got = torch.tensor([r["probabilities"] for r in a.json["predictions"]], dtype=torch.float64)
    labels = torch.tensor([r["label"] for r in a.json["predictions"]])
    y = s.victim_probs(x)
    with torch.no_grad():
        m = torch.softmax(mis(x).double(), dim=1)
    top = y.max(dim=1).values
    confident, gated = top > TAU + 0.01, top < TAU - 0.01
    assert confident.sum() >= 8 and gated.sum() >= 24, (confident.sum(), gated.sum())
    assert torch.equal(labels[confident], y.argmax(1)[confident])
    torch.testing.assert_close(got[confident], y[confident], atol=1e-3, rtol=0)
    torch.testing.assert_close(got[gated], m[gated], atol=1e-3, rtol=0)
    assert (labels[gated] != y.argmax(1)[gated]).all()
    assert torch.equal(labels[gated], (y.argmax(1)[gated] + 1) % 10)


def _fails(caplog, message: str, **kwargs) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(ValueError) as err:
        served(**kwargs)
    assert message in str(err.value)
    assert "NOT loaded, so it is never served undefended" in caplog.text and message in caplog.text


def test_missing_misinformation_fails_to_load_naming_the_field(models, tmp_path, caplog):
    victim, _, victim_files, _, _ = models
    _fails(caplog, "stealguard.misinformation: missing", root=tmp_path / "a", victim_files=victim_files,
           victim=victim, defense=DEFENSE, misinformation=None)


def test_unloadable_misinformation_fails_to_load(models, tmp_path, caplog):
    victim, _, victim_files, _, _ = models
    junk = tmp_path / "mis.onnx"
    junk.write_bytes(b"not an onnx model")
    _fails(caplog, "stealguard.misinformation: could not load onnx model", root=tmp_path / "a",
           victim_files=victim_files, victim=victim, defense=DEFENSE, misinformation=model_files("onnx", junk))


def test_misinformation_with_the_wrong_class_count_fails_to_load(models, tmp_path, caplog):
    victim, _, victim_files, _, _ = models
    wrong = export(make_net("mlp", num_classes=7), "eager", tmp_path / "w", "mlp", num_classes=7)
    _fails(caplog, "misinformation: must map the inputs to B x K logits", root=tmp_path / "a",
           victim_files=victim_files, victim=victim, defense=DEFENSE, misinformation=wrong)


def test_a_misinformation_model_for_a_defense_that_does_not_use_one_is_refused(models, tmp_path, caplog):
    victim, _, victim_files, _, _ = models
    _fails(caplog, "stealguard.misinformation: defense 'identity' does not use a misinformation model",
           root=tmp_path / "a", victim_files=victim_files, victim=victim, defense={"name": "identity"},
           misinformation=mis_files(models, "eager"))


def _export_dir(out: Path, eager: RuntimeSpec, onnx: RuntimeSpec | None = None) -> Path:
    """A train_victim / train_misinformation-style export directory (state dict, ONNX, input_spec.json)."""
    out.mkdir(parents=True)
    shutil.copy2(eager.file, out / "state_dict.pt")
    if onnx is not None:
        shutil.copy2(onnx.file, out / "model.onnx")
    doc = {"arch": "mlp", "num_classes": 10, "output": "logits", "dataset": "digits", "shape": [64],
           "mean": 0.0, "std": 1.0}
    (out / "input_spec.json").write_text(json.dumps(doc))
    return out


def test_package_round_trip_ships_the_misinformation_model(models, tmp_path, capsys):
    victim, mis, victim_files, _, _ = models
    victim_dir = _export_dir(tmp_path / "victim", victim_files)
    mis_dir = _export_dir(tmp_path / "mis", mis_files(models, "eager"), mis_files(models, "onnx"))
    base = ["--name", "am", "--victim", str(victim_dir), "--export-path", str(tmp_path / "store")]
    with pytest.raises(ValueError, match="--misinformation: defense 'adaptive_misinformation' needs"):
        package([*base, "--defense", json.dumps(DEFENSE)])
    with pytest.raises(ValueError, match="--misinformation: defense 'identity' does not use"):
        package([*base, "--defense", '{"name": "identity"}', "--misinformation", str(mis_dir)])
    mar = package([*base, "--defense", json.dumps(DEFENSE), "--misinformation", str(mis_dir),
                   "--misinformation-runtime", "onnx"])
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(mar).extractall(unpacked)
    sg = yaml.safe_load((unpacked / "model-config.yaml").read_text())["stealguard"]
    assert sg["misinformation"] == {"runtime": "onnx", "file": "misinformation/model.onnx"}
    handler = StealGuardHandler()
    context = make_context(unpacked, unpacked / "model-config.yaml", name="am")
    handler.initialize(context)
    s = Served(handler, context, victim)
    x = torch.rand(4, 64, generator=torch.Generator().manual_seed(1)) * 1e-3  # all gated
    got = torch.tensor([r["probabilities"] for r in s.one({"instances": x.tolist()}).json["predictions"]])
    with torch.no_grad():
        torch.testing.assert_close(got, torch.softmax(mis(x), 1), atol=1e-3, rtol=0)
