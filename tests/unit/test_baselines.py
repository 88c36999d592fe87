"""The paper's baseline defenses: formulas by hand, and the contract's invariants as property tests."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from plugins import distance
from plugins.simplex import project_l1_ball
from tests.dev_secret import DEV_SECRET, OTHER_SECRET, build_defense
from tests.unit.strategies import prob_batches, row_sums

Y = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)

CONFIGS = [
    {"name": "identity"},
    {"name": "top_k", "k": 1},
    {"name": "top_k", "k": 2},
    {"name": "label_only"},
    {"name": "rounding", "decimals": 0},
    {"name": "rounding", "decimals": 1},
    {"name": "rounding", "decimals": 3},
    {"name": "reverse_sigmoid", "beta": 0.7, "gamma": 0.4},
    {"name": "reverse_sigmoid", "beta": 5.0, "gamma": 2.0},
    {"name": "random_noise", "epsilon": 0.5, "norm": "l1"},
    {"name": "random_noise", "epsilon": 2.0, "norm": "l2", "scale": 3.0},
]


def run(config, y, inputs=None):
    return build_defense(config)(y, inputs).probs


def test_identity_returns_the_same_probabilities():
    torch.testing.assert_close(run({"name": "identity"}, Y), Y)


def test_top_k_by_hand_each_row_keeps_its_own_top_k():
    expected = torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 0.625, 0.375], [1 / 3, 0.0, 2 / 3]], dtype=torch.float64)
    out = run({"name": "top_k", "k": 2}, Y)
    # Row 3 ties classes 0 and 1 for the second place: the lower index is kept, as argmax would choose.
    torch.testing.assert_close(out, expected)


def test_label_only_sets_each_rows_own_argmax_not_every_rows():
    out = run({"name": "label_only"}, Y)
    expected = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


def test_rounding_by_hand_keeps_sums_at_one_with_largest_remainders():
    y = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.125, 0.125, 0.75], [0.004, 0.006, 0.99]], dtype=torch.float64)
    out = run({"name": "rounding", "decimals": 1}, y)
    # 0.3+0.3+0.3 = 0.9: one missing unit goes to the first of the tied remainders.
    torch.testing.assert_close(out, torch.tensor([[0.4, 0.3, 0.3], [0.1, 0.1, 0.8], [0.0, 0.0, 1.0]],
                                                 dtype=torch.float64))
    out2 = run({"name": "rounding", "decimals": 2}, y)
    torch.testing.assert_close(out2[2], torch.tensor([0.0, 0.01, 0.99], dtype=torch.float64))


def test_reverse_sigmoid_by_hand():
    beta, gamma = 0.7, 0.4
    y = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)

    def r(p):
        return beta * (1 / (1 + math.exp(-gamma * math.log(p / (1 - p)))) - 0.5)

    raw = [max(p - r(p), 0.0) for p in (0.6, 0.3, 0.1)]
    expected = torch.tensor([[v / sum(raw) for v in raw]], dtype=torch.float64)
    torch.testing.assert_close(run({"name": "reverse_sigmoid", "beta": beta, "gamma": gamma}, y), expected)


def test_reverse_sigmoid_clips_negative_entries_at_zero():
    y = torch.tensor([[0.98, 0.01, 0.01]], dtype=torch.float64)
    out = run({"name": "reverse_sigmoid", "beta": 5.0, "gamma": 1.0}, y)
    assert out[0, 0].item() == 0.0 and out.sum().item() == pytest.approx(1.0)


def test_random_noise_by_hand_matches_softmax_of_log_plus_projected_noise():
    defense = build_defense({"name": "random_noise", "epsilon": 0.3, "norm": "l1", "secret": DEV_SECRET})
    noise = defense.logit_noise(Y)
    assert noise.abs().sum(dim=1).max().item() <= 0.3 + 1e-12
    torch.testing.assert_close(defense(Y).probs, torch.softmax(torch.log(Y) + noise, dim=1))


def test_l1_projection_by_hand():
    v = torch.tensor([[3.0, -1.0, 0.0], [0.2, 0.1, 0.0]], dtype=torch.float64)
    out = project_l1_ball(v, 1.0)
    # Row 1: soft-threshold at 2 -> [1, 0, 0]; row 2 is inside the ball and unchanged.
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.1, 0.0]], dtype=torch.float64))
    v2 = torch.tensor([[2.0, 1.5, -0.5]], dtype=torch.float64)  # threshold 1.25 -> [0.75, 0.25, 0]
    torch.testing.assert_close(project_l1_ball(v2, 1.0), torch.tensor([[0.75, 0.25, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@given(y=prob_batches())
def test_contract_rows_on_the_simplex_finite_and_within_budget(config, y):
    defense = build_defense(config)
    out = defense(y).probs
    assert out.shape == y.shape and out.dtype == y.dtype
    assert torch.isfinite(out).all()
    assert (out >= 0).all()
    assert (row_sums(out) - 1).abs().max().item() <= 1e-6
    budget = defense.budget
    if budget is not None and budget.space == "probs":
        assert distance(y, out, budget.norm).max().item() <= budget.epsilon + 1e-6
    if budget is not None and budget.space == "logits":
        noise = defense.logit_noise(y.to(torch.float64))
        norm = noise.abs().sum(1) if budget.norm == "l1" else noise.norm(dim=1)
        assert norm.max().item() <= budget.epsilon + 1e-9


@pytest.mark.parametrize("config", [{"name": "label_only"}, {"name": "top_k", "k": 1}, {"name": "top_k", "k": 3}])
@given(y=prob_batches(min_classes=3))
def test_label_only_and_top_k_keep_each_rows_own_top1(config, y):
    out = build_defense(config)(y).probs
    assert torch.equal(out.argmax(dim=1), y.argmax(dim=1))


@given(y=prob_batches(min_classes=2, max_classes=20), secret=st.text(min_size=16, max_size=24))
def test_random_noise_is_repeatable_for_a_query_and_differs_across_queries(y, secret):
    defense = build_defense({"name": "random_noise", "epsilon": 1.0, "norm": "l2", "secret": secret})
    inputs = torch.arange(y.shape[0] * 6, dtype=torch.float32).reshape(y.shape[0], 6)
    first = defense(y, inputs).probs
    again = defense(y.clone(), inputs.clone()).probs
    assert torch.equal(first, again)
    noise = defense.logit_noise(y.to(torch.float64), inputs)
    if y.shape[0] > 1:  # different queries (rows of inputs differ) get different noise
        assert not torch.equal(noise[0], noise[1])
    # the same query in another batch position gets the same answer
    flipped = defense(y.flip(0), inputs.flip(0)).probs
    torch.testing.assert_close(flipped, first.flip(0))


def test_random_noise_depends_on_the_secret_and_not_on_repetition():
    y = Y.repeat(100, 1)
    a = build_defense({"name": "random_noise", "epsilon": 1.0, "secret": DEV_SECRET})(y).probs
    b = build_defense({"name": "random_noise", "epsilon": 1.0, "secret": OTHER_SECRET})(y).probs
    assert torch.equal(a[0::3], a[0:1].expand(100, -1))  # 100 repeats of one query: identical answers
    assert not torch.equal(a[:3], b[:3])
