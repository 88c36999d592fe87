"""gradient_redirection (GRAD²): the defense contract as properties, and the solver against an explicit reference.

The reference builds G (K x D) explicitly, one ``torch.autograd.grad`` per class of the surrogate's
log-softmax w.r.t. the last layer's (or all) parameters, builds the target direction T explicitly in parameter
space, and scores many sampled feasible y~ by ``cos(G^T y~, T)``. No sample may beat the defense's answer by
more than 1e-6 where the solver claims exactness (identity Gram: jacobian last_layer / identity, K <= 10).
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from plugins import available_defenses, distance
from plugins import redirection as R
from plugins.defenses.gradient_redirection import _generator, _randn
from tests.dev_secret import build_defense
from tests.unit.strategies import prob_batches, row_sums

# torch.func.jvp scripts its own decompositions; that deprecation is torch's, not ours
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
IN_FEATURES = 6
TARGETS = ("reverse", "least_likely", "shift", "random")
_NETS: dict[int, nn.Module] = {}


def surrogate_for(k: int) -> nn.Module:
    if k not in _NETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(100 + k)
            net = nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.Tanh(), nn.Linear(8, k))
        _NETS[k] = net.double().eval().requires_grad_(False)
    return _NETS[k]


def inputs_for(b: int, seed: int) -> torch.Tensor:
    return torch.randn(b, IN_FEATURES, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@st.composite
def cases(draw, max_classes: int = 12, jacobians=("last_layer", "identity", "all")):
    y = draw(prob_batches(max_batch=6, max_classes=max_classes))
    jac = draw(st.sampled_from(list(jacobians)))
    if jac == "all":
        y = y[:3, :6] / y[:3, :6].sum(1, keepdim=True).clamp_min(1e-12)
        y = torch.where(y.sum(1, keepdim=True) > 0, y, torch.full_like(y, 1.0 / y.shape[1]))
    config = {
        "name": "gradient_redirection",
        "epsilon": draw(st.one_of(st.just(0.0), st.floats(1e-4, 2.0))),
        "target": draw(st.sampled_from(TARGETS)),
        "jacobian": jac,
    }
    return config, y, inputs_for(y.shape[0], draw(st.integers(0, 2**31 - 1)))


def run(config, y, x):
    defense = build_defense(config, surrogate=surrogate_for(y.shape[1]))
    return defense, defense(y, x)


def test_registered():
    assert "gradient_redirection" in available_defenses()


@settings(max_examples=30)
@given(cases())
def test_rows_stay_on_the_simplex_within_the_l1_budget(case):
    config, y, x = case
    defense, out = run(config, y, x)
    assert out.probs.dtype == y.dtype and out.probs.shape == y.shape
    assert (out.probs >= 0).all()
    assert (row_sums(out.probs) - 1).abs().max() <= 1e-6
    assert distance(y, out.probs, "l1").max() <= config["epsilon"] + 1e-6
    assert defense.budget.norm == "l1" and defense.budget.epsilon == config["epsilon"]
    for key in ("target_cosine", "initial_cosine", "target_class"):
        assert out.extras[key].shape == (y.shape[0],) and torch.isfinite(out.extras[key]).all()
    # the answer never points further from the target than y itself did
    assert (out.extras["target_cosine"] >= out.extras["initial_cosine"] - 1e-9).all()
    assert torch.isfinite(out.angular_deviation).all()
    if config["epsilon"] == 0:
        assert torch.equal(out.probs, y)


@settings(max_examples=12)
@given(cases(max_classes=8))
def test_deterministic_and_row_independent(case):
    config, y, x = case
    defense, out = run(config, y, x)
    again = defense(y.clone(), x.clone())
    assert torch.equal(out.probs, again.probs)
    i = y.shape[0] - 1
    alone = defense(y[i : i + 1], x[i : i + 1])
    tol = 1e-6 if config["jacobian"] == "all" else 1e-9  # "all": a fixed-step ascent on batched Gram matrices
    torch.testing.assert_close(alone.extras["target_cosine"][0], out.extras["target_cosine"][i], atol=tol, rtol=0)
    if config["jacobian"] != "all":  # the answer itself, not only its score (R.extend_along_ray)
        torch.testing.assert_close(alone.probs[0], out.probs[i], atol=1e-6, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("target", ["reverse", "least_likely", "shift"])
def test_a_float32_surrogate_gives_the_same_answer_in_any_batch(threads, target):
    """A float32 surrogate's softmax differs in the last bits with the batch size (and thread count); before
    R.extend_along_ray that tipped the solver to another point of a flat optimum (0.07 L-inf seen)."""
    k, torch_threads = 10, torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, k)).eval().requires_grad_(False)
            victim = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, k)).eval()
        x = torch.rand((6, 64), generator=torch.Generator().manual_seed(2)) * 4 - 2
        with torch.no_grad():
            y = torch.softmax(victim(x).double(), dim=1)
        defense = build_defense({"name": "gradient_redirection", "epsilon": 0.5, "target": target}, surrogate=net)
        for i in range(len(y)):
            alone = defense(y[i : i + 1], x[i : i + 1]).probs[0]
            for reps in (2, 7, 64):
                batch = defense(y[i : i + 1].repeat(reps, 1), x[i : i + 1].repeat(reps, 1)).probs
                torch.testing.assert_close(batch, alone.expand_as(batch), atol=1e-6, rtol=0)
            mixed = defense(torch.cat([y, y[i : i + 1]]), torch.cat([x, x[i : i + 1]])).probs
            torch.testing.assert_close(mixed[i], alone, atol=1e-6, rtol=0)
            torch.testing.assert_close(mixed[-1], alone, atol=1e-6, rtol=0)
    finally:
        torch.set_num_threads(torch_threads)


@settings(max_examples=40)
@given(prob_batches(max_batch=5, max_classes=10), st.floats(0.05, 1.9), st.integers(0, 2**31 - 1))
def test_extend_along_ray_keeps_the_score_and_reaches_the_edge_of_the_polytope(y, eps, seed):
    y = y.double() + 1e-3
    y = y / y.sum(1, keepdim=True)
    gen = torch.Generator().manual_seed(seed)
    b, k = y.shape
    c = torch.softmax(torch.randn(b, k, generator=gen, dtype=torch.float64), dim=1)
    g = torch.randn(b, k, generator=gen, dtype=torch.float64)
    v = R.project_polytope(y + 0.3 * torch.randn(b, k, generator=gen, dtype=torch.float64), y, eps)
    s = R.score(v, c, g, None)
    out = R.extend_along_ray(v, s, y, c, eps)
    assert (out >= 0).all() and (row_sums(out) - 1).abs().max() <= 1e-9
    assert (out - y).abs().sum(1).max() <= eps + 1e-9
    moved = s > 0
    torch.testing.assert_close(R.score(out, c, g, None)[moved], s[moved], atol=1e-9, rtol=0)
    assert torch.equal(out[~moved], v[~moved])
    # maximal: a step further along the ray leaves P (a negative entry or the budget)
    d = out - c
    further = out + 1e-6 * d / d.abs().sum(1, keepdim=True).clamp_min(1e-300)
    outside = ((further < -1e-12).any(1)) | ((further - y).abs().sum(1) > eps + 1e-12)
    grown = moved & (d.abs().sum(1) > 1e-9)
    assert outside[grown].all()
    # every point of the same ray (inside P) extends to the same point
    half = c + 0.5 * (out - c) if bool(grown.any()) else out
    torch.testing.assert_close(R.extend_along_ray(half, s, y, c, eps)[grown & _inside(half, y, eps)],
                               out[grown & _inside(half, y, eps)], atol=1e-9, rtol=0)


def _inside(v: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    return (v >= 0).all(1) & ((v - y).abs().sum(1) <= eps)


def test_config_errors_name_the_field():
    net = surrogate_for(4)
    with pytest.raises(ValueError, match="epsilon"):
        build_defense({"name": "gradient_redirection", "epsilon": 2.5}, surrogate=net)
    with pytest.raises(ValueError, match="target"):
        build_defense({"name": "gradient_redirection", "target": "sideways"}, surrogate=net)
    with pytest.raises(ValueError, match="shift: only used with target='shift'"):
        build_defense({"name": "gradient_redirection", "shift": 2}, surrogate=net)
    with pytest.raises(ValueError, match="shift: must not be a multiple"):
        build_defense({"name": "gradient_redirection", "target": "shift", "shift": 4}, surrogate=net, num_classes=4)
    with pytest.raises(ValueError, match="params: only used with jacobian='all'"):
        build_defense({"name": "gradient_redirection", "params": ["2.weight"]}, surrogate=net)
    with pytest.raises(ValueError, match="surrogate"):
        build_defense({"name": "gradient_redirection"})
    with pytest.raises(ValueError, match="inputs"):
        build_defense({"name": "gradient_redirection"}, surrogate=net)(torch.full((2, 4), 0.25))


# ---------------------------------------------------------------------------------------------- the reference


def explicit_G(model: nn.Module, x_i: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """K x D: row k = d log softmax(model(x_i))[k] / d params."""
    log_p = torch.log_softmax(model(x_i.unsqueeze(0)), dim=1)[0]
    rows = []
    for k in range(log_p.shape[0]):
        grads = torch.autograd.grad(log_p[k], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def explicit_setup(defense, net: nn.Module, jac: str, x_i: torch.Tensor, y_i: torch.Tensor, target: str):
    """(G, T): G maps v to the attacker's update G^T v; T the target direction, both built explicitly."""
    k = y_i.shape[0]
    if jac == "identity":
        G = torch.eye(k, dtype=torch.float64)
    else:
        model = copy.deepcopy(net).requires_grad_(True)
        named = dict(model.named_parameters())
        names = ["2.weight", "2.bias"] if jac == "last_layer" else list(named)
        G = explicit_G(model, x_i, [named[n] for n in names]).detach()
    if target == "random":
        if jac == "identity":
            t = _randn(_generator(defense.config.secret), k)
            return G, t / t.norm()
        d = defense._direction
        keys = ["weight", "bias"] if jac == "last_layer" else defense.param_names
        return G, torch.cat([d[n].reshape(-1) for n in keys])
    if target == "reverse":
        return G, -(G.T @ y_i)
    label = int(y_i.argmin()) if target == "least_likely" else (int(y_i.argmax()) + 1) % k
    return G, G.T @ torch.eye(k, dtype=torch.float64)[label]


def explicit_cos(G: torch.Tensor, T: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    u = v @ G
    return (u @ T) / (u.norm(dim=-1) * T.norm()).clamp_min(1e-300)


def feasible_samples(y_i: torch.Tensor, eps: float, n: int, seed: int) -> torch.Tensor:
    """n points of {v on the simplex, ||v - y||_1 <= eps}: towards Dirichlet draws (many near the simplex's
    faces), half of them stopped exactly at the budget, plus the greedy vertices of random linear objectives."""
    gen = torch.Generator().manual_seed(seed)
    k = y_i.shape[0]
    d = torch.from_numpy(np.random.default_rng(seed).dirichlet(np.full(k, 0.3), size=n))
    l1 = (d - y_i).abs().sum(1, keepdim=True)
    full = torch.clamp(eps / l1.clamp_min(1e-300), max=1.0)
    a = torch.rand(n, 1, generator=gen, dtype=torch.float64) * full
    a[: n // 2] = full[: n // 2]
    pts = y_i + a * (d - y_i)
    w = torch.randn(n // 4, k, generator=gen, dtype=torch.float64)
    verts = R.greedy_vertices(y_i.expand(n // 4, k), torch.zeros(n // 4, k, dtype=torch.float64), w, None, eps)[0]
    return torch.cat([pts, verts])


REFERENCE_CASES = [
    (k, target, jac) for k, target, jac in itertools.product((3, 5, 10), TARGETS, ("last_layer", "identity"))
] + [(4, target, "all") for target in TARGETS]


@pytest.mark.parametrize("k,target,jac", REFERENCE_CASES)
def test_no_sampled_feasible_point_beats_the_solver(k, target, jac):
    seed = 7 * k + TARGETS.index(target)
    gen = torch.Generator().manual_seed(seed)
    b = 3
    y = torch.softmax(3 * torch.randn(b, k, generator=gen, dtype=torch.float64), dim=1)
    x = inputs_for(b, seed)
    eps = [0.05, 0.4, 1.3][seed % 3]
    net = surrogate_for(k)
    defense = build_defense(
        {"name": "gradient_redirection", "epsilon": eps, "target": target, "jacobian": jac}, surrogate=net
    )
    out = defense(y, x)
    exact = jac != "all"
    for i in range(b):
        G, T = explicit_setup(defense, net, jac, x[i], y[i], target)
        got = explicit_cos(G, T, out.probs[i])
        # the defense's own reduced computation of the cosine is the explicit one
        assert abs(float(out.extras["target_cosine"][i]) - float(got)) <= 1e-6
        assert abs(float(out.extras["initial_cosine"][i]) - float(explicit_cos(G, T, y[i]))) <= 1e-6
        best_sample = explicit_cos(G, T, feasible_samples(y[i], eps, 3000, seed + i)).max()
        slack = 1e-6 if exact else 2e-3
        assert float(best_sample) <= float(got) + slack, (i, float(best_sample), float(got))


def test_projection_onto_the_polytope_is_the_nearest_feasible_point():
    gen = torch.Generator().manual_seed(3)
    k, b, eps = 5, 64, 0.6
    y = torch.softmax(2 * torch.randn(b, k, generator=gen, dtype=torch.float64), dim=1)
    z = y + torch.randn(b, k, generator=gen, dtype=torch.float64)
    v = R.project_polytope(z, y, eps)
    assert (v >= 0).all() and ((v.sum(1) - 1).abs() <= 1e-12).all()
    assert ((v - y).abs().sum(1) <= eps + 1e-12).all()
    for i in range(b):
        pts = feasible_samples(y[i], eps, 2000, i)
        assert ((pts - z[i]).norm(dim=1) >= (v[i] - z[i]).norm() - 1e-9).all()


def test_exhaustive_vertex_search_equals_enumeration_by_hand():
    """For K = 4 every vertex of P, listed by brute force over (receiver, partial donor, zeroed donors)."""
    gen = torch.Generator().manual_seed(11)
    k, eps = 4, 0.5
    y = torch.softmax(torch.randn(1, k, generator=gen, dtype=torch.float64), dim=1)
    c = torch.softmax(torch.randn(1, k, generator=gen, dtype=torch.float64), dim=1)
    g = torch.randn(1, k, generator=gen, dtype=torch.float64)
    m = eps / 2
    verts = [torch.eye(k, dtype=torch.float64)[j] for j in range(k) if 2 * (1 - y[0, j]) <= eps]
    for j, r in itertools.permutations(range(k), 2):
        rest = [i for i in range(k) if i not in (j, r)]
        for n in range(len(rest) + 1):
            for s in itertools.combinations(rest, n):
                rho = m - float(y[0, list(s)].sum())
                if 0 <= rho <= float(y[0, r]):
                    v = y[0].clone()
                    v[list(s)] = 0
                    v[j] += m
                    v[r] -= rho
                    verts.append(v)
    verts = torch.stack(verts)
    best = float(R.score(verts, c.expand_as(verts), g.expand_as(verts), None).max())
    _, got = R.exhaustive_vertex(y, c, g, None, eps)
    assert abs(float(got[0]) - best) <= 1e-12
