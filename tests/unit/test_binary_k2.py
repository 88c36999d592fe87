"""K = 2: a single-output binary model is served as two classes [1 - p, p], and every built-in defense answers
two-class rows on the simplex within its declared budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from handlers.runtimes import LogitsHead, TorchRuntime, TwoClassLogits, two_classes
from plugins import BUDGET_TOLERANCE, build_defense, check_probs, distance, with_secret

SECRET = "k2-test-secret-value-0123456789"
FEATURES = 5


def binary_net(seed: int, sigmoid: bool) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, 1)]
    return nn.Sequential(*layers, nn.Sigmoid()) if sigmoid else nn.Sequential(*layers)


def test_one_column_probability_becomes_two_classes():
    net = binary_net(0, sigmoid=True)
    x = torch.randn(16, FEATURES)
    p = net(x).detach().double()
    y = TorchRuntime(net, "eager", "probabilities").probabilities(x)
    assert y.shape == (16, 2)
    assert torch.allclose(y, torch.cat([1 - p, p], dim=1), atol=1e-12)


def test_one_column_logit_becomes_sigmoid_and_two_column_outputs_are_unchanged():
    net = binary_net(0, sigmoid=False)
    x = torch.randn(16, FEATURES)
    z = net(x).detach().double()
    y = TorchRuntime(net, "eager", "logits").probabilities(x)
    assert torch.allclose(y[:, 1:], torch.sigmoid(z), atol=1e-12)
    assert torch.allclose(y.sum(1), torch.ones(16, dtype=y.dtype))
    two = torch.randn(4, 2)
    assert two_classes(two, "logits") is two and two_classes(torch.randn(4, 3, 1), "logits").shape == (4, 3, 1)


def test_binary_surrogate_seen_with_two_logits():
    """A one-output eager surrogate: LogitsHead for last_layer (its Linear(8, 1) cannot be MAD's K x h layer),
    TwoClassLogits for jacobian 'all'; a two-output one is passed as it is."""
    runtime = TorchRuntime(binary_net(1, sigmoid=False), "eager", "logits")
    x = torch.randn(3, FEATURES)
    head = runtime.as_surrogate(2, "last_layer")
    assert isinstance(head, LogitsHead) and head(x).shape == (3, 2)
    every = runtime.as_surrogate(2, "all")
    assert isinstance(every, TwoClassLogits) and every(x).shape == (3, 2)
    wide = TorchRuntime(nn.Sequential(nn.Linear(FEATURES, 2)), "eager")
    assert wide.as_surrogate(2, "last_layer") is wide.module


CONFIGS = {
    "identity": {"name": "identity"},
    "top_k": {"name": "top_k", "k": 1},
    "rounding": {"name": "rounding", "decimals": 1},
    "label_only": {"name": "label_only"},
    "reverse_sigmoid": {"name": "reverse_sigmoid", "beta": 0.7},
    "random_noise": {"name": "random_noise", "epsilon": 0.5, "norm": "l2"},
    "mad": {"name": "mad", "epsilon": 0.5, "norm": "l1"},
    "mad_all": {"name": "mad", "epsilon": 0.5, "norm": "l2", "jacobian": "all"},
    "mad_argmax": {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1"},
    "ood_gated": {"name": "ood_gated", "tau": 0.9, "inside": {"name": "identity"},
                  "outside": {"name": "random_noise", "epsilon": 0.5}},
}


@pytest.mark.parametrize("surrogate_kind", ["two_outputs", "one_output"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_defense_at_k2(name, surrogate_kind):
    victim = TorchRuntime(binary_net(0, sigmoid=True), "eager", "probabilities")
    x = torch.randn(64, FEATURES) * 3
    y = victim.probabilities(x)
    assert y.shape == (64, 2)
    config = CONFIGS[name]
    jacobian = config.get("jacobian", "last_layer")
    if surrogate_kind == "two_outputs":
        torch.manual_seed(7)
        surrogate = TorchRuntime(nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, 2)), "eager")
    else:
        surrogate = TorchRuntime(binary_net(7, sigmoid=False), "eager")
    defense = build_defense(with_secret(config, SECRET if name in ("random_noise", "ood_gated") else None),
                            surrogate=surrogate.as_surrogate(2, jacobian), num_classes=2)
    out = defense(y, x)
    assert out.probs.shape == (64, 2)
    check_probs(out.probs)
    budget = defense.budget
    if budget is not None and budget.space == "probs":
        assert distance(y, out.probs, budget.norm).max() <= budget.epsilon + BUDGET_TOLERANCE
    if name in ("mad", "mad_all", "mad_argmax", "reverse_sigmoid", "random_noise", "label_only"):
        assert (out.probs - y).abs().max() > 1e-3, "the defense left every row as it was"
    if name in ("mad_argmax", "top_k", "label_only", "identity"):
        assert torch.equal(out.probs.argmax(1), y.argmax(1))
