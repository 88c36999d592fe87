"""ood_gated: the contract as properties (simplex, gate, budget = max of the inner budgets, batch independence),
config validation naming the nested field, the secret passed through, and resource needs of the inner defenses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from plugins import build_defense, needs, validate_config
from plugins.measures import distance
from tests.unit.strategies import prob_batches, row_sums

IN_FEATURES = 5
_NETS: dict[int, nn.Module] = {}


def net_for(k: int) -> nn.Module:
    if k not in _NETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(100 + k)
            _NETS[k] = nn.Sequential(nn.Linear(IN_FEATURES, 7), nn.ReLU(), nn.Linear(7, k)).eval()
    return _NETS[k]


INNER = st.sampled_from([
    {"name": "identity"},
    {"name": "label_only"},
    {"name": "rounding", "decimals": 1},
    {"name": "reverse_sigmoid", "beta": 0.5, "gamma": 0.2},
    {"name": "mad", "epsilon": 0.7, "norm": "l1"},
    {"name": "mad", "epsilon": 1.2, "norm": "l1"},
    {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1"},
])


@st.composite
def cases(draw):
    y = draw(prob_batches(max_batch=16, max_classes=12))
    config = {"name": "ood_gated", "tau": draw(st.floats(0.05, 1.0)), "inside": draw(INNER),
              "outside": draw(INNER)}
    if draw(st.booleans()):
        config["nu"] = draw(st.sampled_from([1.0, 30.0, 1000.0]))
    x = torch.randn(y.shape[0], IN_FEATURES, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
    return config, y, x


def build(config, k):
    return build_defense(config, surrogate=net_for(k), num_classes=k)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_simplex_gate_budget_and_batch_independence(case):
    config, y, x = case
    k = y.shape[1]
    defense = build(config, k)
    out = defense(y, x)
    assert out.probs.dtype == y.dtype and out.probs.shape == y.shape
    assert (out.probs >= 0).all() and (row_sums(out.probs) - 1).abs().max() <= 1e-6
    y64 = y.to(torch.float64) / y.to(torch.float64).sum(1, keepdim=True)
    inside, outside = build(config["inside"], k), build(config["outside"], k)
    a = inside(y, x).probs.to(torch.float64)
    o = outside(y, x).probs.to(torch.float64)
    conf = y.to(torch.float64).amax(1)  # what the gate sees (the checked batch, not renormalised)
    if "nu" in config:
        h = torch.sigmoid(config["nu"] * (config["tau"] - conf))
        torch.testing.assert_close(out.extras["gate"], h, atol=1e-12, rtol=0)
        expected = (1 - h).unsqueeze(1) * a + h.unsqueeze(1) * o
    else:
        gate = (conf < config["tau"]).to(torch.float64)
        torch.testing.assert_close(out.extras["gate"], gate, atol=0, rtol=0)
        # each row gets exactly what its inner defense gives it in a batch of every row (row independence)
        expected = torch.where(gate.bool().unsqueeze(1), o, a)
    torch.testing.assert_close(out.probs.to(torch.float64), expected, atol=1e-5, rtol=0)
    budgets = (inside.budget, outside.budget)
    if None in budgets or budgets[0].norm != budgets[1].norm:
        assert defense.budget is None
    else:
        assert defense.budget.epsilon == max(b.epsilon for b in budgets)
        d = distance(y64, out.probs.to(torch.float64), defense.budget.norm)
        assert (d <= defense.budget.epsilon + 1e-4).all()
    assert torch.equal(defense(y.clone(), x.clone()).probs, out.probs)


def test_identity_inside_keeps_confident_rows_and_outside_moves_the_rest():
    y = torch.tensor([[0.95, 0.03, 0.02], [0.5, 0.3, 0.2], [0.4, 0.35, 0.25]], dtype=torch.float64)
    d = build_defense({"name": "ood_gated", "tau": 0.9, "inside": {"name": "identity"},
                       "outside": {"name": "label_only"}})
    out = d(y)
    assert torch.equal(out.probs[0], y[0])
    assert torch.equal(out.probs[1:], torch.tensor([[1.0, 0, 0], [1.0, 0, 0]], dtype=torch.float64))
    assert out.extras["gate"].tolist() == [0.0, 1.0, 1.0] and d.budget is None
    assert d(y[:0]).probs.shape == (0, 3)


def test_config_errors_name_the_nested_field():
    with pytest.raises(ValueError, match=r"inside: .*defense 'mad'.*epsilon"):
        validate_config({"name": "ood_gated", "inside": {"name": "mad", "epsilon": -1},
                         "outside": {"name": "identity"}})
    with pytest.raises(ValueError, match=r"outside: missing"):
        validate_config({"name": "ood_gated", "inside": {"name": "identity"}})
    with pytest.raises(ValueError, match=r"outside: .*unknown defense 'nope'"):
        validate_config({"name": "ood_gated", "inside": {"name": "identity"}, "outside": {"name": "nope"}})
    with pytest.raises(ValueError, match="cannot nest"):
        validate_config({"name": "ood_gated", "inside": {"name": "identity"},
                         "outside": {"name": "ood_gated", "inside": {"name": "identity"},
                                     "outside": {"name": "identity"}}})
    with pytest.raises(ValueError, match="tau"):
        validate_config({"name": "ood_gated", "tau": 0, "inside": {"name": "identity"},
                         "outside": {"name": "identity"}})


def test_the_secret_keys_the_randomised_inner_defense_and_is_never_dumped():
    from plugins import MissingSecret, with_secret

    plain = {"name": "ood_gated", "tau": 0.99, "inside": {"name": "identity"},
             "outside": {"name": "random_noise", "epsilon": 1.0}}
    assert validate_config(plain).needs_secret
    assert not validate_config({**plain, "outside": {"name": "label_only"}}).needs_secret
    with pytest.raises(MissingSecret, match="ood_gated"):
        build_defense(plain)
    secret = "an-ood-gated-test-secret"
    cfg = with_secret(plain, secret)
    assert secret not in repr(cfg) and secret not in str(cfg.model_dump()) and "secret" not in cfg.outside
    y = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.35, 0.25]], dtype=torch.float64)
    out = build_defense(cfg)(y).probs
    inner = build_defense(with_secret(plain["outside"], secret))(y).probs
    assert torch.allclose(out, inner)  # every row is outside at tau 0.99: the keyed inner defense answers
    other = build_defense(with_secret(plain, "another-test-secret-value"))(y).probs
    assert not torch.allclose(out, other)
    with pytest.raises(ValueError, match="inside: .*give the secret once"):
        validate_config({**plain, "inside": {"name": "random_noise", "epsilon": 1.0, "secret": secret}})


def test_resource_needs_are_the_inner_defenses():
    plain = {"name": "ood_gated", "inside": {"name": "identity"}, "outside": {"name": "label_only"}}
    mad = {**plain, "outside": {"name": "mad", "epsilon": 1.0, "norm": "l1"}}
    am = {**plain, "outside": {"name": "adaptive_misinformation", "tau": 0.5}}
    assert not any(needs(plain, r) for r in ("inputs", "surrogate", "misinformation"))
    assert needs(mad, "surrogate") and needs(mad, "inputs") and not needs(mad, "misinformation")
    assert needs(am, "misinformation") and not needs(am, "surrogate")
    with pytest.raises(ValueError, match="surrogate"):
        build_defense(mad)
    with pytest.raises(ValueError, match="needs the batch of inputs"):
        build_defense(mad, surrogate=net_for(3))(torch.tensor([[0.4, 0.3, 0.3]]))
