"""The registered pyfunc scores through the server's pipeline (handlers.service.DefendedPipeline): for the same
victim and defense it answers what the handler answers, and a defense that breaks its declared budget is refused
by both the same way: at load when the warm-up batch breaks it, per batch (DefenseFailed, never an undefended
answer) when only some inputs do."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pytest
import torch

from handlers.errors import ConfigError
from handlers.service import DefenseFailed
from handlers.stealguard_handler import StealGuardHandler
from handlers.victim_export import VictimExport
from mlflow_project.lab.models import build_model
from mlflow_project.lifecycle.bundle import write_bundle
from mlflow_project.lifecycle.package import eager_from_arch, stage
from mlflow_project.lifecycle.pyfunc import DefensePyfunc
from plugins import registry
from plugins.base import Budget, Defense, DefenseConfig, DefenseOutput
from tests.support.handler import Served, make_context
from tests.support.victims import export_digits_mlp

SENTINEL = 123.0
BREAKER = "test_budget_breaker"


class BreakerConfig(DefenseConfig):
    name: Literal["test_budget_breaker"] = BREAKER
    always: bool = False


class BudgetBreaker(Defense):
    """Declares an l1 budget of 0.1 but answers the least likely class one-hot (l1 distance near 2) on rows whose
    first input is SENTINEL, or on every row with ``always``; other rows unchanged."""

    name = BREAKER
    Config = BreakerConfig
    needs_inputs = True

    @property
    def budget(self) -> Budget:
        return Budget(norm="l1", epsilon=0.1)

    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        hit = torch.ones(len(y), dtype=torch.bool) if self.config.always else inputs[:, 0] == SENTINEL
        flipped = torch.nn.functional.one_hot(y.argmin(dim=1), y.shape[1]).to(y.dtype)
        return DefenseOutput(probs=torch.where(hit[:, None], flipped, y))


@pytest.fixture(autouse=True)
def breaker(monkeypatch):
    registry.available_defenses()  # the built-in defenses first, so the test one is only added
    monkeypatch.setitem(registry._REGISTRY, BREAKER, BudgetBreaker)


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("victim") / "digits_mlp"
    export_digits_mlp(out)
    return out


def pyfunc(tmp_path, victim_dir, defense: dict) -> DefensePyfunc:
    bundle = write_bundle(tmp_path / "bundle", defense, victim_dir)
    model = DefensePyfunc()
    model.load_context(SimpleNamespace(artifacts={"bundle": str(bundle)}))
    return model


def handler(tmp_path, victim_dir, defense: dict) -> Served:
    export = VictimExport.open(victim_dir)
    victim = eager_from_arch(export.file("eager"), export.arch, export.num_classes)
    config = stage(tmp_path / "model", victim=victim, defense=defense, input_spec={"shape": export.shape,
                                                                                    "max_rows": 64})
    h = StealGuardHandler()
    context = make_context(tmp_path / "model", config)
    h.initialize(context)
    return Served(h, context, export.eager({"mlp": lambda num_classes: build_model("mlp", num_classes)}))


def test_a_defense_breaking_its_budget_on_the_warm_up_batch_loads_in_neither(tmp_path, victim_dir):
    defense = {"name": BREAKER, "always": True}
    with pytest.raises(ConfigError, match="exceeded its budget") as server:
        handler(tmp_path / "h", victim_dir, defense)
    with pytest.raises(ConfigError, match="exceeded its budget") as offline:
        pyfunc(tmp_path / "p", victim_dir, defense)
    assert str(offline.value) == str(server.value)  # the same check on the same warm-up batch


def test_a_batch_breaking_the_budget_is_refused_by_both_and_clean_batches_agree(tmp_path, victim_dir):
    defense = {"name": BREAKER}
    served, offline = handler(tmp_path / "h", victim_dir, defense), pyfunc(tmp_path / "p", victim_dir, defense)
    x = torch.rand(6, 64, generator=torch.Generator().manual_seed(0))
    trapped = x.clone()
    trapped[2, 0] = SENTINEL

    clean, refused = served.batch([(x.tolist(), "application/json"), (trapped.tolist(), "application/json")])
    assert clean.status == 200 and refused.status == 500 and refused.json["type"] == "DefenseFailed"
    assert "probabilities" not in refused.body.decode()
    with pytest.raises(DefenseFailed, match=f"defense '{BREAKER}' exceeded its budget: l1 distance"):
        offline.predict(None, trapped.numpy())

    got = offline.predict(None, x.numpy())
    served_probs = np.array([row["probabilities"] for row in clean.json["predictions"]])
    np.testing.assert_array_equal(got, served_probs)
    np.testing.assert_allclose(got, served.victim_probs(x).numpy(), rtol=0, atol=1e-12)  # unchanged rows
