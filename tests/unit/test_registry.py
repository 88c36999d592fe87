"""The registry: names, validation errors that name the field, and third-party entry points."""

from __future__ import annotations

import sys
import textwrap
from typing import Literal

import pytest
import torch

import plugins
from plugins import registry

BASELINES = {"identity", "top_k", "label_only", "rounding", "reverse_sigmoid", "random_noise"}


def test_available_defenses_lists_the_six_baselines():
    assert BASELINES <= set(plugins.available_defenses())


@pytest.mark.parametrize(
    ("config", "field", "allowed"),
    [
        ({"name": "no_such_defense"}, "name", "available"),
        ({"beta": 1.0}, "name", "missing"),
        ({"name": "reverse_sigmoid", "beta": 0.0}, "beta", "greater than 0"),
        ({"name": "reverse_sigmoid", "beta": -1.0}, "beta", "greater than 0"),
        ({"name": "reverse_sigmoid", "gamma": 0}, "gamma", "greater than 0"),
        ({"name": "top_k", "k": 0}, "k", "greater than or equal to 1"),
        ({"name": "random_noise", "epsilon": -0.1}, "epsilon", "greater than or equal to 0"),
        ({"name": "random_noise", "norm": "l7"}, "norm", "'l1' or 'l2'"),
        ({"name": "rounding", "decimals": -1}, "decimals", "greater than or equal to 0"),
        ({"name": "rounding", "decimals": "two"}, "decimals", "integer"),
        ({"name": "identity", "epsilon": 1}, "epsilon", "allowed: name"),
    ],
)
def test_bad_configs_raise_value_error_naming_the_field(config, field, allowed):
    with pytest.raises(ValueError) as info:
        plugins.build_defense(config)
    message = str(info.value)
    assert f"{field}:" in message
    assert allowed in message


def test_k_larger_than_the_number_of_classes_is_refused_at_build_and_at_call():
    with pytest.raises(ValueError, match=r"k: must be <= the number of classes K=3; got k=5"):
        plugins.build_defense({"name": "top_k", "k": 5}, num_classes=3)
    defense = plugins.build_defense({"name": "top_k", "k": 5})
    with pytest.raises(ValueError, match="k: must be <= the number of classes K=4"):
        defense(torch.full((2, 4), 0.25))


def test_a_config_that_is_not_a_mapping_is_refused():
    with pytest.raises(ValueError, match="mapping"):
        plugins.build_defense("identity")


def test_defaults_are_filled_and_described():
    defense = plugins.build_defense({"name": "reverse_sigmoid"})
    assert defense.describe() == {"name": "reverse_sigmoid", "beta": 0.7, "gamma": 0.4}


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(2, 3), torch.tensor([[0.5, float("nan")]]),
                                 torch.tensor([[1.5, -0.5]]), torch.tensor([[1, 0]])])
def test_inputs_off_the_simplex_are_refused(bad):
    with pytest.raises(ValueError):
        plugins.build_defense({"name": "identity"})(bad)


@pytest.fixture
def third_party_package(tmp_path, monkeypatch):
    """An installed distribution (dist-info on sys.path) that declares a defense under stealguard.defenses."""
    pkg = tmp_path / "acme_defense.py"
    pkg.write_text(textwrap.dedent('''
        from typing import Any, Literal
        import torch
        from plugins import Defense, DefenseConfig, DefenseOutput

        class HalfUniformConfig(DefenseConfig):
            name: Literal["acme_half_uniform"] = "acme_half_uniform"

        class HalfUniform(Defense):
            name = "acme_half_uniform"
            Config = HalfUniformConfig

            def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
                return DefenseOutput(probs=0.5 * y + 0.5 / y.shape[1])
    '''))
    dist = tmp_path / "acme_defense-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-defense\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[stealguard.defenses]\nacme_half_uniform = acme_defense:HalfUniform\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "acme_half_uniform"
    registry._REGISTRY.pop("acme_half_uniform", None)
    sys.modules.pop("acme_defense", None)


def test_third_party_defenses_load_from_the_entry_point_group(third_party_package):
    assert third_party_package in registry.load_entry_points()
    assert third_party_package in plugins.available_defenses()
    out = plugins.build_defense({"name": third_party_package})(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(out.probs, torch.tensor([[0.75, 0.25]]))


def test_register_refuses_a_class_without_a_config_or_a_clashing_name():
    class NoConfig(plugins.Defense):
        name = "no_config"

        def perturb(self, y, inputs):
            raise AssertionError

    with pytest.raises(ValueError, match="Config"):
        plugins.register(NoConfig)

    class Clash(plugins.Defense):
        name = "identity"
        Config = type("C", (plugins.DefenseConfig,), {"__annotations__": {"name": Literal["identity"]}})

        def perturb(self, y, inputs):
            raise AssertionError

    with pytest.raises(ValueError, match="already registered"):
        plugins.register(Clash)
