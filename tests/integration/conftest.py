"""Fixtures for the serving tests: archives built with mlflow_project.lifecycle.package, and ``shared_torchserve``,
one TorchServe per pytest process (private TMPDIR and ports, its own process group, stopped by pid) that every
module which needs no server settings of its own registers its archives on and unregisters them from when it is
done. Modules that change the server itself (token auth, JVM flags, killed workers, the versions' restarts) or
assert on what the whole server reports (Prometheus sums and alerts over every model: an unregistered model's
series stay on the metrics endpoint) start their own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from mlflow_project.lifecycle.package import build_archive, model_files, stage
from tests.support.torchserve import TorchServe, registered
from tests.support.victims import export, make_net

SUPPORT = Path(__file__).resolve().parents[1] / "support"
MAD = {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1", "jacobian": "last_layer"}
IMAGE = {
    "size": [28, 28],
    "mode": "L",
    "mean": [0.5],
    "std": [0.5],
    "max_bytes": 20_000,
    "max_pixels": 1_000_000,
}
LABELS = [f"class_{i}" for i in range(10)]


@dataclass
class Deployment:
    """A running TorchServe and the victims it serves (to recompute undefended outputs locally)."""

    server: TorchServe
    victims: dict[str, nn.Module] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)
    broken_mar: Path | None = None

    def url(self, model: str) -> str:
        return f"{self.server.inference_url}/predictions/{model}"

    def victim_probs(self, model: str, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(self.victims[model](x).double(), dim=1)


def build_store(root: Path) -> tuple[Path, dict[str, nn.Module], Path]:
    """Archives: a LeNet (eager) with mad_argmax and its identity twin, an ONNX and a torch.export MLP with
    mad_argmax, an MLP whose surrogate raises on a sentinel (fail-closed), a broken archive (kept apart)."""
    store = root / "store"
    src = root / "src"
    labels = root / "index_to_name.json"
    labels.write_text(json.dumps(dict(enumerate(LABELS))))
    lenet, mlp = make_net("lenet", seed=0), make_net("mlp", seed=0)
    lenet_files = export(lenet, "eager", src / "lenet", "lenet")
    lenet_sur = export(make_net("lenet", seed=11), "eager", src / "lenet_sur", "lenet")
    image_input = {"shape": [1, 28, 28], "max_rows": 16, "image": IMAGE}
    mlp_input = {"shape": [64], "max_rows": 16}
    common = {"batch_size": 8, "max_batch_delay_ms": 100}
    specs = {
        "lenet_mad": dict(
            victim=lenet_files,
            defense=MAD,
            surrogate=lenet_sur,
            input_spec=image_input,
            labels=labels,
            version={"name": "fmnist-defense", "version": 7},
        ),
        "lenet_identity": dict(
            victim=lenet_files, defense={"name": "identity"}, input_spec=image_input, labels=labels
        ),
        # JSON instances are [0, 1] pixels, normalised by the handler like images (package --json-input pixels)
        "lenet_pixels": dict(
            victim=lenet_files, defense={"name": "identity"}, input_spec={**image_input, "json": "pixels"},
            labels=labels
        ),
        "mlp_onnx_mad": dict(
            victim=export(mlp, "onnx", src / "mlp_onnx", "mlp"),
            defense=MAD,
            surrogate=export(make_net("mlp", seed=5), "onnx", src / "mlp_sur_onnx", "mlp"),
            input_spec=mlp_input,
        ),
        "mlp_export_mad": dict(
            victim=export(mlp, "export", src / "mlp_export", "mlp"),
            defense=MAD,
            surrogate=export(make_net("mlp", seed=5), "eager", src / "mlp_sur", "mlp"),
            input_spec=mlp_input,
        ),
    }
    booby = src / "booby"
    booby.mkdir(parents=True)
    torch.manual_seed(3)
    from tests.support.booby_model import BoobyMLP

    torch.save(BoobyMLP().state_dict(), booby / "booby.pt")
    specs["mlp_explode"] = dict(
        victim=export(mlp, "eager", src / "mlp_eager", "mlp"),
        defense=MAD,
        input_spec=mlp_input,
        surrogate=model_files("eager", booby / "booby.pt", SUPPORT / "booby_model.py", "BoobyMLP"),
    )
    for name, spec in specs.items():
        build_archive(name, stage(root / "stage" / name, **spec, **common), store)
    # An archive whose stealguard config is invalid (epsilon out of range): must fail to load, never serve.
    bad = dict(specs["mlp_export_mad"], defense={**MAD, "epsilon": -1.0})
    broken = build_archive("mlp_broken", stage(root / "stage" / "broken", **bad, **common), root / "broken")
    victims = {
        "lenet_mad": lenet,
        "lenet_identity": lenet,
        "lenet_pixels": lenet,
        "mlp_onnx_mad": mlp,
        "mlp_export_mad": mlp,
        "mlp_explode": mlp,
    }
    return store, victims, broken


@pytest.fixture(scope="session")
def shared_torchserve(tmp_path_factory) -> Iterator[TorchServe]:
    """The TorchServe the serving modules share. The model API is on for this test instance only, so modules can
    register their archives (and the broken one on demand; the production deploy/config.properties keeps it off);
    token auth is off on this loopback-only instance."""
    root = tmp_path_factory.mktemp("shared_ts")
    (root / "store").mkdir()
    server = TorchServe(root / "store", root / "ts", models=[], properties={"enable_model_api": "true"})
    server.start(timeout=180)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, shared_torchserve) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("serving")
    store, victims, broken = build_store(root)
    with registered(shared_torchserve, store):
        yield Deployment(shared_torchserve, victims, {m: MAD["epsilon"] for m in victims}, broken)
