"""Attacks on a digits MLP victim with tiny budgets: exact query counting, argmax labels, JB step directions."""

from __future__ import annotations

import pytest
import torch

from mlflow_project.lab import data
from mlflow_project.lab.attacks import (
    ATTACKS,
    AttackConfig,
    jacobian_step,
    release_augmentation,
    release_top3,
    run_attack,
    train_top1_twin,
)
from mlflow_project.lab.models import build_model
from mlflow_project.lab.oracles import ArgmaxOracle, BudgetExceeded, LocalOracle, build_victim_defense
from mlflow_project.lab.training import accuracy, train_classifier


def tiny(name: str, budget: int, spec: data.InputSpec, **kw) -> AttackConfig:
    return AttackConfig(name=name, budget=budget, epochs=2, batch_size=32, jb_seed_size=20, jb_round_epochs=1,
                        jb_round_min_steps=5, pixel_mean=spec.mean, pixel_std=spec.std, **kw)


@pytest.fixture(scope="module")
def pool(digits_victim):
    return data.query_set("digits", digits_victim.spec)


def make_clone_for(victim):
    return lambda: build_model(victim.arch, num_classes=victim.spec.num_classes)


@pytest.mark.parametrize("name", ATTACKS)
def test_each_attack_spends_exactly_its_budget(name, digits_victim, pool):
    budget = 150  # JB: 20 seed + 20 + 40 + 70 (the last round truncated to fit)
    oracle = LocalOracle(digits_victim.model, budget=1000)
    res = run_attack(oracle, pool, make_clone_for(digits_victim), tiny(name, budget, digits_victim.spec),
                     progress=False)
    assert oracle.queries == budget and res.queries == budget
    assert len(res.transfer_x) == len(res.transfer_y) == budget
    rows = res.transfer_y
    assert torch.allclose(rows.sum(1), torch.ones(budget), atol=1e-5)
    is_one_hot = bool(((rows == 0) | (rows == 1)).all())
    assert is_one_hot == name.endswith("_argmax"), "only the argmax attacker sees one-hot labels"
    if not name.startswith(("knockoff", "art_")):
        assert res.rounds == 4 and [h["transfer_size"] for h in res.history] == [40, 80, 150]
        # the augmented queries are new points, not members of the query set
        assert not torch.equal(res.transfer_x[20:40], res.transfer_x[:20])


@pytest.mark.parametrize("name", ["knockoff", "jbda", "art_copycat", "knockoff_argmax"])
def test_one_query_pass_gives_two_clones(name, digits_victim, pool):
    """The attackers as a set: the top-1 twin costs no query and is trained on the top-1 labels of the same
    transfer set (an independent training, unless the rows already are one-hot)."""
    oracle = LocalOracle(digits_victim.model, budget=150)
    cfg = tiny(name, 150, digits_victim.spec)
    res = run_attack(oracle, pool, make_clone_for(digits_victim), cfg, progress=False)
    assert oracle.queries == 150 and res.top1_clone is not None
    if name.endswith("_argmax"):
        assert res.top1_clone is res.clone
        return
    assert res.top1_clone is not res.clone
    if name.startswith("art_"):
        return  # ART trains the twin itself (its lookup classifier answers from the recorded rows)
    expected = train_top1_twin(res, make_clone_for(digits_victim), cfg)
    for a, b in zip(expected.state_dict().values(), res.top1_clone.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    soft_first = next(iter(res.clone.state_dict().values()))
    assert not torch.equal(soft_first, next(iter(res.top1_clone.state_dict().values())))



def test_one_hot_answers_make_the_twin_the_clone(digits_victim, pool):
    """label_only answers are one-hot already: the twin would be the same training on the same rows from the same
    initialisation, so the clone is reused, and it is exactly what that training gives."""
    defense = build_victim_defense(digits_victim.model, {"name": "label_only"}, digits_victim.spec.num_classes)
    oracle = LocalOracle(digits_victim.model, defense, budget=150)
    cfg = tiny("knockoff", 150, digits_victim.spec)
    res = run_attack(oracle, pool, make_clone_for(digits_victim), cfg, progress=False)
    assert res.top1_clone is res.clone
    torch.manual_seed(cfg.seed)
    trained = make_clone_for(digits_victim)()
    train_classifier(trained, res.transfer_x, res.transfer_y, cfg.train_config(), progress=False)
    for a, b in zip(trained.state_dict().values(), res.clone.state_dict().values(), strict=True):
        assert torch.equal(a, b)

def test_jbtop3_all_queries_every_target(digits_victim, pool):
    oracle = LocalOracle(digits_victim.model, budget=None)
    cfg = tiny("jbtop3", 420, digits_victim.spec, jb_top3_all=True)
    res = run_attack(oracle, pool, make_clone_for(digits_victim), cfg, progress=False, twin=False)
    # 20 seeds -> x4 a round (one query per top-3 class): 80, 320, then 100 more to fit the budget exactly
    assert [h["transfer_size"] for h in res.history] == [80, 320, 420] and oracle.queries == 420


def test_art_copycat_agrees_with_our_knockoff(digits_victim, pool):
    """An attacker no one here wrote, on one small setting (the digits MLP, the whole pool, argmax labels in both,
    the same SGD settings): the two clones' test accuracies are within a few points."""
    test = data.victim_data("digits").test
    accs = {}
    for name in ("knockoff_argmax", "art_copycat"):
        oracle = LocalOracle(digits_victim.model, budget=len(pool))
        cfg = AttackConfig(name=name, budget=len(pool), epochs=20, lr=0.05, batch_size=32, momentum=0.9,
                           weight_decay=0.0, schedule="constant", seed=0)
        res = run_attack(oracle, pool, make_clone_for(digits_victim), cfg, progress=False)
        assert oracle.queries == len(pool)
        accs[name] = accuracy(res.top1_clone, test.x, test.y)
    assert accs["knockoff_argmax"] > 0.85 and accs["art_copycat"] > 0.85, accs
    assert abs(accs["knockoff_argmax"] - accs["art_copycat"]) <= 0.03, accs


def test_argmax_attacker_trains_on_one_hot_of_the_returned_outputs(digits_victim, pool):
    defense = build_victim_defense(digits_victim.model, {"name": "random_noise", "epsilon": 2.0}, 10)
    soft = LocalOracle(digits_victim.model, defense, budget=None)
    hard = ArgmaxOracle(LocalOracle(digits_victim.model, defense, budget=100))
    x = pool[:100]
    y_soft, y_hard = soft(x), hard(x)
    assert torch.equal(y_hard, torch.nn.functional.one_hot(y_soft.argmax(1), 10).float())
    assert hard.queries == 100 and hard.remaining == 0


def test_knockoff_learns_and_caps_at_the_pool(digits_victim, pool):
    oracle = LocalOracle(digits_victim.model, budget=None)
    cfg = AttackConfig(name="knockoff", budget=10_000, epochs=8, batch_size=32, seed=0)
    res = run_attack(oracle, pool, make_clone_for(digits_victim), cfg, progress=False)
    assert res.queries == len(pool) == oracle.queries  # repeating a query teaches nothing: at most the pool
    test = data.victim_data("digits").test
    acc = accuracy(res.clone, test.x, test.y)
    assert acc > 0.85, f"a clone trained on the whole digits pool should approach the victim; got {acc:.3f}"


def test_oracle_refuses_queries_beyond_its_budget(digits_victim, pool):
    oracle = LocalOracle(digits_victim.model, budget=50)
    oracle(pool[:30])
    with pytest.raises(BudgetExceeded, match="remaining budget of 20"):
        oracle(pool[:21])
    assert oracle.queries == 30
    with pytest.raises(ValueError, match="oracle allows 20"):
        run_attack(oracle, pool, make_clone_for(digits_victim), tiny("knockoff", 100, digits_victim.spec), False)


def step_setup(victim, pool):
    """200 queries, their labels, a generator, and the victim's mean probability of those labels on inputs z."""
    model = victim.model
    x = pool[:200]
    c = model(x).argmax(1)

    def prob_of_label(z):
        with torch.no_grad():
            return torch.softmax(model(z), 1).gather(1, c.unsqueeze(1)).mean().item()

    return victim.spec, model, x, c, torch.Generator().manual_seed(0), prob_of_label


def test_jacobian_steps_move_the_substitute_as_documented(digits_victim, pool):
    spec, model, x, c, gen, prob_of_label = step_setup(digits_victim, pool)
    base = prob_of_label(x)
    up = jacobian_step(model, x, c, tiny("jbda", 10, spec), 0, gen)
    flipped = jacobian_step(model, x, c, tiny("jbda", 10, spec), 5, gen)  # tau = 5: the sign flips
    selfish = jacobian_step(model, x, c, tiny("jbself", 10, spec), 0, gen)
    top3 = jacobian_step(model, x, c, tiny("jbtop3", 10, spec), 0, gen)
    # the step is lambda = 0.1 in [0, 1] pixel units (before clipping to the valid range)
    step = (up - x) * spec.std
    assert step.abs().max().item() <= 0.1 + 1e-5 and step.abs().max().item() > 0.09
    assert prob_of_label(up) > base > prob_of_label(flipped)
    assert prob_of_label(selfish) < base
    assert prob_of_label(top3) < base  # pushed toward another class
    # pixels stay in [0, 1]
    for z in (up, flipped, selfish, top3):
        pixels = z * spec.std + spec.mean
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_release_augmentation_steps_away_from_the_label_and_clips_in_normalised_units(digits_victim, pool):
    """jb_release_augmentation: the authors' release's jbda/jbself (cross-entropy gradient, clip to [0, 1] after
    normalisation, sign flipped when round(r / tau) is odd), which the paper's text does not describe."""
    spec, model, x, c, gen, prob_of_label = step_setup(digits_victim, pool)
    release = tiny("jbda", 10, spec, jb_release_augmentation=True)
    away = jacobian_step(model, x, c, release, 0, gen)
    assert prob_of_label(away) < prob_of_label(x) < prob_of_label(jacobian_step(model, x, c, tiny("jbda", 10, spec),
                                                                                 0, gen))
    assert away.min() >= -1e-6 and away.max() <= 1 + 1e-6  # clipped in normalised units, not in pixels
    background = x < -0.5  # dark pixels (normalised): the clip moves them to exactly 0 whatever the gradient
    assert background.any() and torch.all(away[background] == 0)
    inside = (x > 0.2) & (x < 0.8)
    assert torch.allclose((away - x)[inside].abs(), torch.full_like(x[inside], 0.1 / spec.std))
    # round(3 / 5) = 1: flipped; round(8 / 5) = 2: not; jbself subtracts the (x + step)-clipped step
    assert torch.allclose(jacobian_step(model, x, c, release, 3, gen)[inside] - x[inside], -(away - x)[inside],
                          atol=1e-6)
    assert torch.equal(jacobian_step(model, x, c, release, 8, gen), away)
    selfish = tiny("jbself", 10, spec, jb_release_augmentation=True)
    assert torch.allclose(jacobian_step(model, x, c, selfish, 0, gen), x - (away - x))
    # ... but the row the release writes beside that query's answer is x + step, jbda's row
    queries, rows = release_augmentation(model, x, c, selfish, 0)
    assert torch.allclose(queries, x - (away - x)) and torch.equal(rows, away)
    assert torch.equal(release_augmentation(model, x, c, release, 0)[0], away)
    with pytest.raises(ValueError, match="jb_release_augmentation: applies to jbda, jbself, jbtop3"):
        tiny("knockoff", 10, spec, jb_release_augmentation=True)


def test_release_top3_is_targeted_pgd_on_the_logit_and_a_constant_shift_on_negative_rounds(digits_victim, pool):
    """jbtop3 as the authors' release runs it: 8 PGD steps of eps / 10 on the target's logit, towards each of the
    substitute's top-3 other classes, unclipped; where the sign is negative its clamp has min > max and every
    query is x + eps, the same for all three targets."""
    spec, model, x, c, gen, _ = step_setup(digits_victim, pool)
    cfg = tiny("jbtop3", 10, spec, jb_release_augmentation=True)
    eps = cfg.jb_step / spec.std
    q = release_top3(model, x, c, cfg, 0)
    assert torch.equal(jacobian_step(model, x, c, cfg, 0, gen), q)  # jacobian_step dispatches to it
    assert q.shape == (3 * len(x), *x.shape[1:])
    rows = x.repeat_interleave(3, dim=0)  # row 0's three targets first
    delta = q - rows
    assert delta.abs().max().item() <= 0.8 * eps + 1e-6 and delta.abs().max().item() > 0.7 * eps
    with torch.no_grad():
        logits = model(x)
    others = logits.scatter(1, c.unsqueeze(1), float("-inf"))
    target = others.topk(3, dim=1).indices.reshape(-1)
    with torch.no_grad():
        before = model(rows).gather(1, target.unsqueeze(1))
        after = model(q).gather(1, target.unsqueeze(1))
    assert (after > before).double().mean().item() > 0.95  # each query raises its own target's logit
    assert q.min().item() < x.min().item() - 0.1 * eps  # no clip: dark pixels go below the darkest input
    # round(3 / 5) = 1: the negative round; the clamp returns eps everywhere
    dark = release_top3(model, x, c, cfg, 3)
    assert torch.allclose(dark - rows, torch.full_like(rows, -eps), atol=1e-6)
    assert torch.equal(dark[0::3], dark[1::3]) and torch.equal(dark[0::3], dark[2::3])


def test_release_top3_keeps_its_rows_and_appends_the_first_rows_targets(digits_victim, pool):
    oracle = LocalOracle(digits_victim.model, budget=1000)
    cfg = tiny("jbtop3", 150, digits_victim.spec, jb_release_augmentation=True, jb_tau=1)
    res = run_attack(oracle, pool, make_clone_for(digits_victim), cfg, progress=False)
    x = res.transfer_x
    # 20 seed images, + 60 (3 per row), then 70 more: 3 each for the first ceil(70 / 3) = 24 rows, truncated
    assert oracle.queries == res.queries == len(x) == 150 and [h["transfer_size"] for h in res.history] == [80, 150]
    seeds = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:20]]
    assert torch.equal(x[:20], seeds)  # unlike the release's jbda / jbself, the rows stay
    # jb_tau 1: round 1 is a negative round, so its queries are the first 24 rows shifted by -eps, 3 copies each
    eps = cfg.jb_step / cfg.pixel_std
    assert torch.allclose(x[80:], x[:24].repeat_interleave(3, dim=0)[:70] - eps, atol=1e-6)


def test_release_augmentation_overwrites_the_rows_it_augments_and_appends_them_again(digits_victim, pool):
    oracle = LocalOracle(digits_victim.model, budget=1000)
    res = run_attack(oracle, pool, make_clone_for(digits_victim),
                     tiny("jbda", 150, digits_victim.spec, jb_release_augmentation=True), progress=False)
    x = res.transfer_x
    assert oracle.queries == res.queries == len(x) == 150 and [h["transfer_size"] for h in res.history] == [40, 80, 150]
    # last round: 70 of the 80 rows augmented, written over the first 70 and appended: rows [0:70] == [80:150]
    assert torch.equal(x[:70], x[80:]) and torch.equal(res.transfer_y[:70], res.transfer_y[80:])
    # and none of the 20 seed images survives as it was (every round rewrote them)
    seeds = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:20]]
    assert not any(torch.equal(s, row) for s in seeds for row in x)


def test_release_jbself_trains_on_the_mirror_rows_and_stays_in_range(digits_victim, pool):
    """The release's JB-self asks x - step and keeps x + step: its transfer set stays in [0, 1] (normalised) over
    every round while its queries stay in [-1, 2]. Keeping the queries instead (as this lab did until session 12)
    at least doubles a dark pixel's distance each round, and the clone collapsed to one class."""
    asked = []

    class Recording(LocalOracle):
        def _answer(self, x):
            asked.append(x.clone())
            return super()._answer(x)

    oracle = Recording(digits_victim.model, budget=1000)
    res = run_attack(oracle, pool, make_clone_for(digits_victim),
                     tiny("jbself", 150, digits_victim.spec, jb_release_augmentation=True), progress=False)
    x, q = res.transfer_x, torch.cat(asked)
    assert len(q) == res.queries == 150 and [h["transfer_size"] for h in res.history] == [40, 80, 150]
    assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6
    # rows 0-20 are the seed images as they are, 20-40 their mirrors (x - step in [2x - 1, 2x]); from round 1 on
    # every query mirrors a row in [0, 1]
    seeds, later = q[:20], q[40:]
    assert torch.all(q[20:40] >= 2 * seeds - 1 - 1e-5) and torch.all(q[20:40] <= 2 * seeds + 1e-5)
    assert later.min() >= -1 - 1e-6 and later.max() <= 2 + 1e-6 and later.min() < -1e-3
    # the last round's rows [80:150] are the mirror images of its 70 queries about the rows they came from
    assert not torch.equal(x[80:], q[80:])


def test_attacks_are_reproducible(digits_victim, pool):
    def once():
        oracle = LocalOracle(digits_victim.model, budget=None)
        res = run_attack(oracle, pool, make_clone_for(digits_victim), tiny("jbtop3", 120, digits_victim.spec),
                         progress=False)
        return res.transfer_x, [p.detach().clone() for p in res.clone.parameters()]

    (x1, p1), (x2, p2) = once(), once()
    assert torch.equal(x1, x2) and all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))


def test_unknown_attack_and_bad_budget_are_refused():
    with pytest.raises(ValueError, match="allowed: knockoff, jbda"):
        AttackConfig(name="fgsm")
    with pytest.raises(ValueError, match="budget: must be >= 1"):
        AttackConfig(name="knockoff", budget=0)


def test_budget_ladder_trains_one_clone_through_the_prefixes_as_a_plain_loop_would(digits_victim, pool):
    """budget_ladder (the release's Knockoff training): the clone is trained on the first 30, then the first 80
    queries, then all of them, one model carried through with a fresh optimiser per stage. A slow reference made
    of plain train_classifier calls from the same initialisation gives the same weights, bit for bit; the twin is
    trained the same way on the top-1 rows; watch sees the last stage's epochs only, of each clone."""
    from mlflow_project.lab.attacks import knockoff_queries, top1_rows

    cfg = tiny("knockoff", 150, digits_victim.spec, budget_ladder=[30, 80])
    assert cfg.budget_ladder == (30, 80)  # a JSON list becomes a tuple (the config stays hashable)
    seen: list[tuple[str, int]] = []
    res = run_attack(LocalOracle(digits_victim.model, budget=150), pool, make_clone_for(digits_victim), cfg,
                     progress=False, watch=lambda kind, epoch, model: seen.append((kind, epoch)))
    x = knockoff_queries(pool, cfg)
    assert torch.equal(res.transfer_x, x)
    for rows, clone in ((res.transfer_y, res.clone), (top1_rows(res.transfer_y), res.top1_clone)):
        torch.manual_seed(cfg.seed)
        ref = make_clone_for(digits_victim)()
        for n in (30, 80, 150):
            train_classifier(ref, x[:n], rows[:n], cfg.train_config(), progress=False)
        for a, b in zip(ref.state_dict().values(), clone.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert seen == [("soft", 0), ("soft", 1), ("top1", 0), ("top1", 1)]  # 2 epochs each, the last stage only
    plain = run_attack(LocalOracle(digits_victim.model, budget=150), pool, make_clone_for(digits_victim),
                       tiny("knockoff", 150, digits_victim.spec), progress=False)
    assert not torch.equal(next(iter(plain.clone.parameters())), next(iter(res.clone.parameters())))


def test_budget_ladder_skips_stages_the_pool_does_not_reach(digits_victim, pool):
    """A pool smaller than a stage (Knockoff caps its queries at the pool): that stage and those above it would
    repeat the full training, so they are skipped."""
    small = pool[:60]
    cfg = tiny("knockoff", 150, digits_victim.spec, budget_ladder=[30, 100])
    res = run_attack(LocalOracle(digits_victim.model, budget=150), small, make_clone_for(digits_victim), cfg,
                     progress=False)
    torch.manual_seed(cfg.seed)
    ref = make_clone_for(digits_victim)()
    for n in (30, 60):
        train_classifier(ref, res.transfer_x[:n], res.transfer_y[:n], cfg.train_config(), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), res.clone.state_dict().values(),
                                                  strict=True))


@pytest.mark.parametrize(("kw", "match"), [
    ({"budget_ladder": [100, 50]}, "strictly ascending"),
    ({"budget_ladder": [50, 50]}, "strictly ascending"),
    ({"budget_ladder": [0, 50]}, ">= 1 and below the budget"),
    ({"budget_ladder": [50, 150]}, "below the budget \\(150\\)"),
    ({"budget_ladder": "50,100"}, "a list of query counts"),
    ({"budget_ladder": [50], "name": "jbda"}, "applies to knockoff and knockoff_argmax only"),
    ({"budget_ladder": [50], "name": "art_knockoff"}, "applies to knockoff and knockoff_argmax only"),
])
def test_budget_ladder_is_validated_with_what_is_allowed(kw, match):
    with pytest.raises(ValueError, match=f"budget_ladder: .*{match}"):
        AttackConfig(**{"name": "knockoff", "budget": 150, **kw})
