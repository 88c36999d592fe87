"""MAD's configuration, its surrogate handling and make_surrogate: errors that name the field, no gradient
leaks, dtypes, the random oracle's keyed determinism, the greedy search's bound."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from mlflow_project.lab.models import MLP, LeNet
from plugins import available_defenses, distance
from plugins.mad import candidates
from plugins.surrogate import make_surrogate
from tests.dev_secret import DEV_SECRET, OTHER_SECRET, build_defense

pytestmark = pytest.mark.usefixtures("one_thread")


def small_case(k: int = 5, b: int = 6, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, k))
    x = torch.randn(b, 4, generator=gen)
    y = torch.softmax(2 * torch.randn(b, k, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    return net, x, y


def test_both_defenses_are_registered():
    assert {"mad", "mad_argmax"} <= set(available_defenses())


@pytest.mark.parametrize(
    "config,field",
    [
        ({"name": "mad", "epsilon": -0.1}, "epsilon"),
        ({"name": "mad", "epsilon": float("nan")}, "epsilon"),
        ({"name": "mad", "norm": "linf"}, "norm"),
        ({"name": "mad_argmax", "norm": "l3"}, "norm"),
        ({"name": "mad", "jacobian": "full"}, "jacobian"),
        ({"name": "mad", "oracle": "argmax"}, "oracle"),
        ({"name": "mad_argmax", "oracle": "best"}, "oracle"),
        ({"name": "mad", "params": ["0.weight"]}, "params"),
        ({"name": "mad", "jacobian": "all", "params": []}, "params"),
        ({"name": "mad_argmax", "max_candidates": 0}, "max_candidates"),
        ({"name": "mad", "max_candidates": 10}, "max_candidates"),
        ({"name": "mad", "secret": ""}, "secret"),
        ({"name": "mad", "jacobian_memory_mb": 0}, "jacobian_memory_mb"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(config, field):
    net, _, _ = small_case()
    with pytest.raises(ValueError, match=field):
        build_defense(config, surrogate=net)


@pytest.mark.parametrize("name", ["mad", "mad_argmax"])
@pytest.mark.parametrize("jacobian", ["last_layer", "all", "identity"])
def test_missing_surrogate_raises_value_error_naming_it(name, jacobian):
    with pytest.raises(ValueError, match="surrogate"):
        build_defense({"name": name, "jacobian": jacobian})


def test_unknown_parameter_name_is_refused_with_the_available_ones():
    net, _, _ = small_case()
    with pytest.raises(ValueError, match=r"params: unknown parameter name.*'nope'.*0\.weight"):
        build_defense({"name": "mad", "jacobian": "all", "params": ["nope"]}, surrogate=net)


def test_last_layer_needs_a_linear_layer_and_says_so():
    conv_only = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="jacobian: 'last_layer'"):
        build_defense({"name": "mad"}, surrogate=conv_only)
    build_defense({"name": "mad", "jacobian": "all"}, surrogate=conv_only)  # fine without a linear layer


def test_last_layer_refuses_a_surrogate_whose_output_is_not_its_last_linear():
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh())  # output is tanh(linear): the closed form would be wrong
    _, x, y = small_case()
    defense = build_defense({"name": "mad"}, surrogate=net)
    with pytest.raises(ValueError, match="jacobian: 'last_layer' needs the surrogate's logits"):
        defense(y, x)


def test_last_layer_accepts_a_trailing_log_softmax_and_an_explicit_attribute():
    base, x, y = small_case()
    with_log_softmax = nn.Sequential(base, nn.LogSoftmax(dim=1))
    a = build_defense({"name": "mad"}, surrogate=with_log_softmax)(y, x)
    b = build_defense({"name": "mad"}, surrogate=base)(y, x)
    torch.testing.assert_close(a.probs, b.probs)

    class TwoHeads(nn.Module):  # the last nn.Linear in module order is not the output layer
        def __init__(self):
            super().__init__()
            self.body = base
            self.aux = nn.Linear(5, 3)
            self.last_layer = "body.2"

        def forward(self, x):
            return self.body(x)

    c = build_defense({"name": "mad"}, surrogate=TwoHeads())(y, x)
    torch.testing.assert_close(c.probs, b.probs)
    with pytest.raises(ValueError, match="last_layer"):
        net = TwoHeads()
        net.last_layer = "body.1"  # a ReLU
        build_defense({"name": "mad"}, surrogate=net)


def test_surrogate_with_the_wrong_number_of_classes_or_inputs_is_refused():
    net, x, y = small_case(k=5)
    defense = build_defense({"name": "mad"}, surrogate=net)
    with pytest.raises(ValueError, match="surrogate: returns 5 classes"):
        defense(torch.softmax(torch.randn(6, 4, dtype=torch.float64), 1), x)
    with pytest.raises(ValueError, match="inputs: need one input per row"):
        defense(y, x[:3])
    with pytest.raises(ValueError, match="inputs"):
        defense(y, None)
    with pytest.raises(ValueError, match="num_classes=7"):
        build_defense({"name": "mad"}, surrogate=net, num_classes=7)


@pytest.mark.parametrize("jacobian", ["last_layer", "all"])
def test_no_gradient_leaks_and_the_surrogate_is_in_eval_mode(jacobian):
    net, x, y = small_case()
    net = nn.Sequential(net[0], nn.Dropout(0.5), net[1], net[2]).train()
    for p in net.parameters():
        p.requires_grad_(True)
    y = y.clone().requires_grad_(True)
    with torch.enable_grad():
        defense = build_defense({"name": "mad_argmax", "jacobian": jacobian}, surrogate=net)
        first = defense(y.detach(), x)
        second = defense(y.detach(), x)
    assert not net.training  # dropout off: repeated calls agree
    assert torch.equal(first.probs, second.probs)
    assert not first.probs.requires_grad and first.probs.grad_fn is None
    assert not first.angular_deviation.requires_grad
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", ["l1", "l2", "kl"])
def test_float32_and_float64_probabilities(dtype, norm):
    net, x, y = small_case(dtype=dtype)
    out = build_defense({"name": "mad", "epsilon": 0.3, "norm": norm}, surrogate=net)(y, x)
    assert out.probs.dtype == dtype
    assert (distance(y, out.probs, norm) <= 0.3 + 1e-6).all()
    assert (distance(y, out.probs, norm) >= 0.3 - 1e-4).all()  # nothing here reaches its target at 0.3
    assert out.angular_deviation.dtype == torch.float64


def test_float64_surrogate_accepts_float32_inputs_and_vice_versa():
    net, x, y = small_case()
    a = build_defense({"name": "mad"}, surrogate=net)(y, x.double())
    b = build_defense({"name": "mad"}, surrogate=net.double())(y, x)
    torch.testing.assert_close(a.probs, b.probs)


def test_kl_bisection_lands_within_1e4_of_epsilon():
    net, x, y = small_case(k=10, b=32)
    for eps in (0.01, 0.1, 0.5, 2.0):
        out = build_defense({"name": "mad", "epsilon": eps, "norm": "kl"}, surrogate=net)(y, x)
        kl = distance(y, out.probs, "kl")
        not_reached = out.extras["mixing"] < 1
        assert (kl <= eps + 1e-12).all()
        assert (kl[not_reached] >= eps - 1e-4).all()


def test_epsilon_zero_returns_y_unchanged_without_running_the_surrogate():
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            raise AssertionError("the surrogate must not run when epsilon = 0")

    _, x, y = small_case()
    y = y + 1e-5 * torch.tensor([1.0, -1.0, 0, 0, 0], dtype=torch.float64)  # rows sum to 1 (not exactly)
    out = build_defense({"name": "mad_argmax", "epsilon": 0.0}, surrogate=Exploding())(y, x)
    assert torch.equal(out.probs, y)
    assert (out.angular_deviation == 0).all()


def test_identity_jacobian_never_runs_the_surrogate():
    class Exploding(nn.Linear):
        def forward(self, x):
            raise AssertionError("jacobian='identity' must not run the surrogate")

    _, x, y = small_case()
    out = build_defense({"name": "mad", "jacobian": "identity"}, surrogate=Exploding(4, 5))(y, x)
    assert (out.angular_deviation > 0).all()


@pytest.mark.parametrize("name", ["mad", "mad_argmax"])
def test_random_oracle_is_keyed_per_query(name):
    net, x, y = small_case(k=8, b=64)
    config = {"name": name, "epsilon": 0.5, "oracle": "random"}
    d1 = build_defense({**config, "secret": DEV_SECRET}, surrogate=net)
    d2 = build_defense({**config, "secret": OTHER_SECRET}, surrogate=net)
    t1 = d1(y, x).extras["target"]
    assert torch.equal(t1, d1(y, x).extras["target"])  # same query, same answer
    assert torch.equal(t1[5:6], d1(y[5:6], x[5:6]).extras["target"])  # not a function of the batch
    assert not torch.equal(t1, d2(y, x).extras["target"])  # another secret, other draws
    support = (t1 > 0).sum(1)
    if name == "mad":
        assert (support == 1).all() and len(set(t1.argmax(1).tolist())) > 3
    else:
        top = y.argmax(1)
        assert (t1[torch.arange(64), top] > 0).all() and len(set(support.tolist())) > 2


def test_greedy_search_scores_at_most_max_candidates():
    assert candidates.greedy_candidates_scored(100, 1) == 1
    assert candidates.greedy_candidates_scored(100, 99) == 1
    assert candidates.greedy_candidates_scored(100, 100) == 100
    assert candidates.greedy_candidates_scored(100, 4096) <= 4096
    assert candidates.greedy_candidates_scored(12, 10**6) == 1 + sum(range(1, 12))
    net, x, y = small_case(k=30, b=8)
    out = build_defense({"name": "mad_argmax", "epsilon": 0.5, "max_candidates": 1}, surrogate=net)(y, x)
    torch.testing.assert_close(out.extras["target"], nn.functional.one_hot(y.argmax(1), 30).double())


# -------------------------------------------------------------------------------------------- make_surrogate


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", [LeNet, functools.partial(MLP, num_classes=10)])
def test_make_surrogate_is_seeded_deterministic_and_leaves_global_rng_alone(arch):
    victim = arch()
    rng = torch.get_rng_state()
    a, b, c = make_surrogate(victim, 1), make_surrogate(victim, 1), make_surrogate(victim, 2)
    assert torch.equal(rng, torch.get_rng_state())
    assert states_equal(a, b) and not states_equal(a, c)
    assert not states_equal(a, victim)
    assert states_equal(a, make_surrogate(arch, 1))  # instance or architecture: the same surrogate
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert victim.training and all(p.requires_grad for p in victim.parameters())  # the victim is untouched


def test_make_surrogate_keeps_dtype_and_resets_buffers():
    victim = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    victim[1].running_mean.fill_(5.0)
    s = make_surrogate(victim, 0)
    assert s[0].weight.dtype == torch.float64
    assert torch.equal(s[1].running_mean, torch.zeros(4, dtype=torch.float64))


def test_make_surrogate_errors_name_the_argument():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match="victim_or_arch: submodule"):
        make_surrogate(Custom(), 0)
    with pytest.raises(ValueError, match="seed"):
        make_surrogate(LeNet, -1)
    with pytest.raises(ValueError, match="victim_or_arch"):
        make_surrogate(lambda: 3, 0)
    with pytest.raises(ValueError, match="victim_or_arch"):
        make_surrogate("lenet", 0)
