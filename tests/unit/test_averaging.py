"""Averaging repeated queries gains nothing: every defense, randomised ones included, answers 100 repeats of
the same query identically (repeated calls bit for bit; repeats inside one batch to within 1e-12, and the
same row in batches of other sizes and positions to within 1e-6, float32 rounding), so a row's answer does
not depend on the batch it was sent in.
Plus the lab's averaging-attack helpers (mlflow_project/lab/averaging.py)."""

from __future__ import annotations

import pytest
import torch

from mlflow_project.lab.averaging import augment, make_oracle
from mlflow_project.lab.evaluate import Victim
from mlflow_project.lab.models import build_model
from plugins import available_defenses, defense_class
from tests.dev_secret import OTHER_SECRET, build_defense

REPEATS = 100
K = 10

# At least one config per registered defense; every randomised variant (seeded per query) is listed.
CONFIGS = [
    {"name": "identity"},
    {"name": "top_k", "k": 3},
    {"name": "label_only"},
    {"name": "rounding", "decimals": 1},
    {"name": "reverse_sigmoid", "beta": 0.5, "gamma": 0.2},
    {"name": "random_noise", "epsilon": 2.0, "norm": "l2"},
    {"name": "random_noise", "epsilon": 1.0, "norm": "l1", "scale": 3.0, "secret": OTHER_SECRET},
    {"name": "mad", "epsilon": 0.5, "norm": "l1"},
    {"name": "mad", "epsilon": 0.5, "norm": "l1", "oracle": "random"},
    {"name": "mad", "epsilon": 0.5, "norm": "l2", "jacobian": "all"},
    {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1"},
    {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1", "oracle": "random"},
    {"name": "gradient_redirection", "epsilon": 0.5, "refine_steps": 2},
    {"name": "gradient_redirection", "epsilon": 0.5, "target": "random", "refine_steps": 2},
    {"name": "adaptive_misinformation", "tau": 0.5},
    {"name": "ood_gated", "tau": 0.5, "inside": {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1"},
     "outside": {"name": "random_noise", "epsilon": 1.0, "norm": "l1"}},
]
RANDOMISED = [c for c in CONFIGS if c["name"] == "random_noise" or c.get("oracle") == "random"
              or c.get("target") == "random" or c["name"] == "ood_gated"]


def _id(cfg: dict) -> str:
    return "-".join(f"{v}" for v in cfg.values())


@pytest.fixture(scope="module")
def setup():
    victim = build_model("mlp", K)
    torch.manual_seed(1)
    resources = {"surrogate": build_model("mlp", K).eval(), "misinformation": build_model("mlp", K).eval(),
                 "num_classes": K}
    g = torch.Generator().manual_seed(2)
    x = torch.rand((6, 64), generator=g) * 4 - 2
    with torch.no_grad():
        y = torch.softmax(victim.eval()(x).double(), dim=1)
    return resources, x, y


def test_every_registered_defense_is_covered():
    # Built-in defenses only: other test modules register misbehaving test defenses in the same process.
    builtin = {n for n in available_defenses() if defense_class(n).__module__.startswith("plugins.")}
    assert {c["name"] for c in CONFIGS} == builtin
    assert len(RANDOMISED) >= 3


# 100 separate calls per config (every defense, every randomised variant). Two deterministic configs that cost
# 0.1-0.5 s a call on a loaded 2-core machine, MAD with jacobian "all" and gradient_redirection's default
# target, get their 100 repeats in one batch only (test below); their defense classes are called 100 times
# here through the other configs.
def _slow(cfg: dict) -> bool:
    return cfg.get("jacobian") == "all" or (cfg["name"] == "gradient_redirection" and "target" not in cfg)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if not _slow(c)], ids=_id)
def test_100_repeated_calls_give_identical_answers(setup, cfg):
    resources, x, y = setup
    defense = build_defense(cfg, **resources)
    first = defense(y[:1].clone(), x[:1].clone()).probs
    for _ in range(REPEATS - 1):
        again = defense(y[:1].clone(), x[:1].clone()).probs
        assert torch.equal(again, first), f"{cfg}: a repeat of the same query got a different answer"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_100_repeats_in_one_batch_are_identical_and_equal_the_single_answer(setup, cfg):
    resources, x, y = setup
    defense = build_defense(cfg, **resources)
    alone = defense(y[:1], x[:1]).probs
    batch = defense(y[:1].repeat(REPEATS, 1), x[:1].repeat(REPEATS, 1)).probs
    # Within one batch, vectorised float64 kernels may round a row's last bit differently by its position
    # (seen: 2.8e-17 for reverse_sigmoid), and a float32 network (MAD's surrogate, the misinformation model)
    # rounds differently for another batch size (seen: 2e-9): float noise an average cannot exploit, far
    # below any budget. Tolerances: 1e-12 between copies in one batch, 1e-6 across batch sizes.
    torch.testing.assert_close(batch, batch[:1].expand_as(batch), rtol=0, atol=1e-12)
    torch.testing.assert_close(batch[0], alone[0], rtol=0, atol=1e-6)
    mixed = defense(torch.cat([y, y[:1]]), torch.cat([x, x[:1]])).probs  # the same row at another position
    torch.testing.assert_close(mixed[-1], alone[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", RANDOMISED, ids=_id)
def test_randomised_defenses_do_vary_across_different_queries(setup, cfg):
    """The test above could pass for a defense that ignores its randomness: show the randomness is there
    (different queries get different perturbations, and another secret gives another answer)."""
    resources, x, y = setup
    out = build_defense(cfg, **resources)(y, x).probs
    delta = out - y
    assert not torch.allclose(delta[0], delta[1], atol=1e-6)
    other = build_defense({**cfg, "secret": "stealguard-tests-third-secret-03"}, **resources)(y, x).probs
    assert not torch.equal(out, other)


def test_augment_shifts_within_bounds_adds_noise_and_is_seeded():
    img = torch.zeros(50, 1, 9, 9)
    img[:, :, 4, 4] = 1.0
    a = augment(img, torch.Generator().manual_seed(0), shift=2, noise=0.0)
    b = augment(img, torch.Generator().manual_seed(0), shift=2, noise=0.0)
    assert torch.equal(a, b)
    assert torch.equal(a.sum((1, 2, 3)), torch.ones(50)), "a shift of 2 keeps the centre pixel in the image"
    rows, cols = (a[:, 0] == 1).nonzero()[:, 1], (a[:, 0] == 1).nonzero()[:, 2]
    assert rows.min() >= 2 and rows.max() <= 6 and cols.min() >= 2 and cols.max() <= 6
    assert len({(int(r), int(c)) for r, c in zip(rows, cols, strict=True)}) > 5, "the offsets vary"
    noisy = augment(img, torch.Generator().manual_seed(0), shift=0, noise=0.1)
    assert noisy.min() >= 0 and noisy.max() <= 1 and not torch.equal(noisy, img)


@pytest.mark.parametrize("name", ["random_noise", "mad_argmax"])
def test_lab_oracle_answers_repeats_identically_but_augmented_views_differently(name):
    from mlflow_project.lab import data
    from mlflow_project.lab.averaging import DEFENSES

    torch.manual_seed(0)
    victim = Victim(build_model("lenet", K).eval(), "lenet", data.input_spec("fashion_mnist"), "random")
    oracle = make_oracle(victim, DEFENSES[name], surrogate_seed=0)
    x = torch.rand(4, 1, 28, 28)
    first = oracle(x)
    assert torch.equal(oracle(x.repeat(3, 1, 1, 1)).reshape(3, 4, K), first.expand(3, 4, K))
    views = augment(x, torch.Generator().manual_seed(1), shift=2, noise=0.05)
    plain = make_oracle(victim, None, surrogate_seed=0)
    assert not torch.allclose(oracle(views) - plain(views), first - plain(x), atol=1e-4)
