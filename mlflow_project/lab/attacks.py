"""Model-stealing attacks from the paper's protocol (Orekondy et al. 2020, Sec. 5): Knockoff, JBDA, JB-self,
JB-top3, and the argmax variant of each.

Every attack queries a black-box oracle (:mod:`mlflow_project.lab.oracles`) within a query budget and trains a
clone (the victim's architecture by default) on what came back, with the soft cross-entropy and SGD with
momentum (:mod:`mlflow_project.lab.training`).

- ``knockoff``: Knockoff Nets, random strategy: ``budget`` images drawn without replacement from the query
  set (if the pool is smaller than the budget, the whole pool: repeating a query teaches nothing).
- ``jbda``: Papernot et al.'s Jacobian-based dataset augmentation. A seed of ``jb_seed_size`` (100) images
  from the query set is labelled; then each round the substitute is retrained from scratch on everything
  labelled so far and every image x gives a new query ``x + lambda * sign(grad_x F(x)[c])`` (c the oracle's
  top-1 label), ``lambda = jb_step`` (0.1 in [0, 1] pixel units) with its sign flipped every ``jb_tau`` (5)
  rounds, until the budget is spent (the last round is truncated to fit exactly).
- ``jbself``: the same loop with ``x - lambda * sign(grad_x F(x)[c])`` (steps that lower the substitute's
  confidence in the returned label).
- ``jbtop3``: targeted steps ``x + lambda * sign(grad_x log F(x)[t])`` toward a class t drawn at random
  from the substitute's top-3 classes other than c.
  With ``jb_top3_all`` (the authors' release), every one of the 3 classes gives a query (the set grows x4 a
  round instead of x2).
- ``jb_release_augmentation``: the JB steps exactly as the authors' release computes them, where they differ
  from the paper's text (jbda / jbself: :func:`release_augmentation`; jbtop3: :func:`release_top3`), so that
  what those differences do to the clone can be measured.
- ``budget_ladder`` (knockoff): the clone is first trained on the first n of its queries for each n of the ladder
  (ascending, below the budget), the weights carried from stage to stage with a fresh optimiser each, then on all
  of them, as the authors' release (knockoffnets ``knockoff/adversary/train.py --budgets 50,100,...``) trains one
  model through its list of budgets; every stage trains ``epochs`` epochs. The twin is trained the same way.
- suffix ``_argmax`` (e.g. ``knockoff_argmax``): the attacker trains on one-hot rows of the returned top-1
  labels (:class:`oracles.ArgmaxOracle`).
- ``art_copycat`` / ``art_knockoff``: IBM ART's CopycatCNN and KnockoffNets (random strategy), an attacker
  implementation independent of ours, over the same oracles (:mod:`mlflow_project.lab.art_attacks`).

Attackers as a set: every attack yields two clones from one query pass (:attr:`AttackResult.clone`, trained on
the returned rows as they are, and :attr:`AttackResult.top1_clone`, its twin trained the same way on one-hot
rows of their top-1 labels). For the adaptive JB attacks the queries are chosen by the soft substitute; the
twin is the top-1 relabelling of that same transfer set (a top-1 attacker running its own adaptive loop would
choose slightly different queries). For the ``_argmax`` attacks the rows already are one-hot, so the twin is
the clone itself.

Defaults are scaled to a 2-core CPU (the paper trains for more epochs on a GPU): clone training 10 epochs,
batch 128, lr 0.05 (cosine), momentum 0.9, weight decay 5e-4; JB substitutes are retrained each round for
``max(jb_round_epochs, enough epochs for jb_round_min_steps SGD steps)``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from mlflow_project.lab.training import TrainConfig, train_classifier

BASE_ATTACKS = ("knockoff", "jbda", "jbself", "jbtop3")
JB_ATTACKS = ("jbda", "jbself", "jbtop3")
ART_ATTACKS = ("art_copycat", "art_knockoff")
ATTACKS = BASE_ATTACKS + tuple(f"{a}_argmax" for a in BASE_ATTACKS) + ART_ATTACKS


@dataclass(frozen=True)
class AttackConfig:
    """An attack and its settings. ``name`` is one of :data:`ATTACKS`."""

    name: str = "knockoff"
    budget: int = 1000
    epochs: int = 10
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    query_batch_size: int = 256
    jb_seed_size: int = 100
    jb_step: float = 0.1
    jb_tau: int = 5
    jb_round_epochs: int = 10
    jb_round_min_steps: int = 100
    jb_round_lr: float | None = None  # the substitute's per-round training; None: the clone's setting
    jb_round_momentum: float | None = None
    jb_round_weight_decay: float | None = None
    jb_top3_all: bool = False  # jbtop3: one query per top-3 class (the authors' release) instead of one random
    # augment as the authors' release does instead (jbda / jbself: _release_step; jbtop3: release_top3), to
    # measure what it changes
    jb_release_augmentation: bool = False
    schedule: str = "cosine"  # the clone's learning-rate schedule (training.SCHEDULES)
    budget_ladder: tuple[int, ...] = ()  # knockoff: train on these prefixes of the queries first (module doc)
    pixel_mean: float = 0.0  # the victim's normalisation, so JB steps and clipping happen in [0, 1] pixels
    pixel_std: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"attack: unknown {self.name!r}; allowed: {', '.join(ATTACKS)}")
        if self.budget < 1:
            raise ValueError(f"budget: must be >= 1 query; got {self.budget}")
        if self.jb_seed_size < 1:
            raise ValueError(f"jb_seed_size: must be >= 1; got {self.jb_seed_size}")
        if self.jb_tau < 1:
            raise ValueError(f"jb_tau: must be >= 1; got {self.jb_tau}")
        if not self.pixel_std > 0:
            raise ValueError(f"pixel_std: must be > 0; got {self.pixel_std}")
        object.__setattr__(self, "budget_ladder", ladder(self.budget_ladder, self.budget))
        if self.budget_ladder and (self.base != "knockoff" or self.art):
            raise ValueError(f"budget_ladder: applies to knockoff and knockoff_argmax only (the release trains its "
                             f"Knockoff clones that way); got attack {self.name!r}")
        if self.jb_release_augmentation and self.base not in JB_ATTACKS:
            raise ValueError(f"jb_release_augmentation: applies to {', '.join(JB_ATTACKS)} (and their _argmax "
                             f"variants) only; got attack {self.name!r}")

    @property
    def base(self) -> str:
        return self.name.removesuffix("_argmax")

    @property
    def art(self) -> bool:
        return self.name in ART_ATTACKS

    @property
    def argmax(self) -> bool:
        return self.name.endswith("_argmax")

    def train_config(self, epochs: int | None = None, seed_offset: int = 0) -> TrainConfig:
        return TrainConfig(epochs=self.epochs if epochs is None else epochs, lr=self.lr, batch_size=self.batch_size,
                           momentum=self.momentum, weight_decay=self.weight_decay, seed=self.seed + seed_offset,
                           schedule=self.schedule)

    def round_config(self, epochs: int, round_: int) -> TrainConfig:
        """The JB substitute's training in round ``round_`` (the clone's settings unless jb_round_* are set)."""
        return replace(self.train_config(epochs, seed_offset=round_),
                       lr=self.lr if self.jb_round_lr is None else self.jb_round_lr,
                       momentum=self.momentum if self.jb_round_momentum is None else self.jb_round_momentum,
                       weight_decay=self.weight_decay if self.jb_round_weight_decay is None
                       else self.jb_round_weight_decay)


def ladder(value, budget: int) -> tuple[int, ...]:
    """``budget_ladder`` as a tuple of strictly ascending query counts in [1, budget); raises naming the field."""
    try:
        if isinstance(value, str | bytes):
            raise TypeError
        steps = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"budget_ladder: a list of query counts, e.g. [50, 100, 500, 1000, 10000]; got {value!r}") \
            from None
    if any(n < 1 or n >= budget for n in steps) or any(a >= b for a, b in itertools.pairwise(steps)):
        raise ValueError(f"budget_ladder: strictly ascending query counts, each >= 1 and below the budget "
                         f"({budget}); got {list(steps)}")
    return steps


@dataclass
class AttackResult:
    clone: nn.Module  # trained on the rows the oracle returned (one-hot for the _argmax attacks)
    queries: int
    transfer_x: torch.Tensor  # every input the attacker queried, in order
    transfer_y: torch.Tensor  # what the attacker trained on (one-hot rows for the argmax attacker)
    rounds: int = 1
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    top1_clone: nn.Module | None = None  # the twin trained on the top-1 labels of the same answers


Watch = Callable[[str, int, nn.Module], None]  # (clone kind "soft" | "top1", epoch from 0, the clone)


def run_attack(oracle, pool: torch.Tensor, make_clone: Callable[[], nn.Module], cfg: AttackConfig,
               progress: bool = True, twin: bool = True, watch: Watch | None = None) -> AttackResult:
    """Run attack ``cfg`` against ``oracle`` with the query set ``pool`` (N x input shape).

    ``make_clone()`` returns a freshly initialised clone (the victim's architecture by default). The oracle's
    own budget, when set, must allow ``cfg.budget`` queries. ``twin``: also train the top-1 twin (see the
    module doc; no further queries). ``watch(kind, epoch, clone)`` is called after every epoch of the final
    clone's training and of its twin's (the last stage of a ``budget_ladder``); ART's attacks train inside ART and
    do not call it.
    """
    from mlflow_project.lab.oracles import ArgmaxOracle

    if len(pool) == 0:
        raise ValueError("the query set is empty")
    if oracle.remaining is not None and oracle.remaining < min(cfg.budget, len(pool)):
        raise ValueError(f"budget: the attack wants {cfg.budget} queries but the oracle allows {oracle.remaining}")
    if cfg.argmax:
        oracle = ArgmaxOracle(oracle)
    start = oracle.queries
    t0 = time.perf_counter()
    if cfg.art:
        from mlflow_project.lab.art_attacks import run_art_attack

        result = run_art_attack(oracle, pool, make_clone, cfg, twin=twin)
    elif cfg.base == "knockoff":
        result = _knockoff(oracle, pool, make_clone, cfg, progress, watch)
    else:
        result = _jacobian(oracle, pool, make_clone, cfg, progress, watch)
    if twin and result.top1_clone is None:
        result.top1_clone = result.clone if cfg.argmax else train_top1_twin(result, make_clone, cfg, progress, watch)
    result.queries = oracle.queries - start
    result.seconds = time.perf_counter() - t0
    return result


def top1_rows(y: torch.Tensor) -> torch.Tensor:
    """One-hot rows of the top-1 class of each row of ``y``."""
    return torch.nn.functional.one_hot(y.argmax(dim=1), y.shape[1]).to(y.dtype)


def train_clone(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig, desc: str, progress: bool,
                watch: Watch | None = None, kind: str = "soft") -> list[float]:
    """Train an attack's final clone (or its twin, ``kind="top1"``) in place on (x, y), through
    ``cfg.budget_ladder``'s prefixes first (stages the transfer set does not exceed are skipped); returns the last
    stage's per-epoch losses. ``watch`` sees every epoch of the last stage."""
    for n in cfg.budget_ladder:
        if n < len(x):
            train_classifier(model, x[:n], y[:n], cfg.train_config(), desc=f"{desc} ({n} queries)", progress=progress)
    hook = None if watch is None else (lambda epoch, _loss: watch(kind, epoch, model))
    return train_classifier(model, x, y, cfg.train_config(), desc=desc, progress=progress, on_epoch=hook)


def train_top1_twin(result: AttackResult, make_clone: Callable[[], nn.Module], cfg: AttackConfig,
                    progress: bool = False, watch: Watch | None = None) -> nn.Module:
    """The top-1 attacker's clone: the same transfer set relabelled with its top-1 classes, trained from the same
    initialisation with the same settings as ``result.clone``. When every answer already is one-hot (label_only,
    misinformation answering top-1 only) that training would repeat the clone's exactly: the clone is returned."""
    labels = top1_rows(result.transfer_y)
    if torch.equal(labels, result.transfer_y):
        return result.clone
    torch.manual_seed(cfg.seed)
    twin = make_clone()
    train_clone(twin, result.transfer_x, labels, cfg, f"{cfg.name}: top-1 twin", progress, watch, "top1")
    return twin


def query_in_batches(oracle, x: torch.Tensor, batch_size: int, progress: bool, desc: str) -> torch.Tensor:
    outs = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False, unit="batch"):
        outs.append(oracle(x[i : i + batch_size]))
    return torch.cat(outs) if outs else torch.empty(0)


def knockoff_queries(pool: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    """Knockoff's queries: ``min(budget, len(pool))`` rows of the pool drawn without replacement by the seed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return pool[torch.randperm(len(pool), generator=gen)[: min(cfg.budget, len(pool))]]


def _knockoff(oracle, pool, make_clone, cfg: AttackConfig, progress: bool, watch: Watch | None) -> AttackResult:
    x = knockoff_queries(pool, cfg)
    n = len(x)
    y = query_in_batches(oracle, x, cfg.query_batch_size, progress, f"{cfg.name}: querying")
    torch.manual_seed(cfg.seed)
    clone = make_clone()
    losses = train_clone(clone, x, y, cfg, f"{cfg.name}: clone", progress, watch)
    return AttackResult(clone=clone, queries=0, transfer_x=x, transfer_y=y, rounds=1,
                        history=[{"round": 0, "transfer_size": n, "loss": losses[-1] if losses else float("nan")}])


def _to_pixels(x: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    return x * cfg.pixel_std + cfg.pixel_mean


def _from_pixels(p: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    return (p - cfg.pixel_mean) / cfg.pixel_std


def _top3_targets(num_classes: int) -> int:
    return min(3, num_classes - 1)


def jacobian_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg: AttackConfig, round_: int,
                  gen: torch.Generator, batch_size: int = 512) -> torch.Tensor:
    """The JB-family augmentation of ``x`` (normalised inputs) for round ``round_``; returns new inputs.

    jbtop3 with ``cfg.jb_top3_all``: one new input per top-3 class, grouped by rank (all rank-1 targets, then
    rank 2, then rank 3), so 3 x len(x) rows."""
    if cfg.base == "jbtop3" and cfg.jb_release_augmentation:
        return release_top3(model, x, labels, cfg, round_, batch_size)
    if cfg.base == "jbtop3" and cfg.jb_top3_all:
        return torch.cat([_jacobian_step(model, x, labels, cfg, round_, gen, batch_size, rank=r)
                          for r in range(_top3_targets(_num_classes(model, x)))])
    if cfg.jb_release_augmentation:
        return release_augmentation(model, x, labels, cfg, round_, batch_size)[0]
    return _jacobian_step(model, x, labels, cfg, round_, gen, batch_size)


def release_augmentation(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg: AttackConfig, round_: int,
                         batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of jbda / jbself as the authors' release runs them (see :func:`_release_step`): ``(queries,
    rows)``, what the release sends to the oracle and what it writes into its transfer set beside the answers.

    For jbda both are ``x + step``. For jbself the query is ``x - step`` but the row written is ``x + step``: the
    release's loop stores ``X + delta_i`` for either strategy, so a JB-self clone trains on the mirror images of
    what was asked, and the stored rows stay in [0, 1] (normalised units). Re-augmenting the queries instead (this
    lab until session 12) at least doubles a negative input every round (the clip makes step >= -x, so
    x - step <= 2x): a Fashion-MNIST background pixel (-0.81) reaches -0.81 * 2**9 ~ -415 in the 9 rounds of a
    50,000 budget, and that JB-self clone collapsed to one class (10.0 %, seed 0)."""
    model.eval()
    queries, rows = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].clone().requires_grad_(True)
        logp = torch.log_softmax(model(xb), dim=1)
        step = _release_step(xb, logp, labels[i : i + batch_size], cfg, round_)
        base = xb.detach()
        rows.append(base + step)
        queries.append(base + step if cfg.base == "jbda" else base - step)
    return torch.cat(queries), torch.cat(rows)


RELEASE_PGD_STEPS = 8  # the release's pgd_linf_targ: num_iter 8, alpha 0.01 = a tenth of its epsilon 0.1


def release_top3(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg: AttackConfig, round_: int,
                 batch_size: int = 512) -> torch.Tensor:
    """One round of jbtop3 as the authors' release runs it (prediction-poisoning, defenses/adversary/jacobian.py,
    ``jacobian_augmentation_topk`` and ``pgd_linf_targ``, read for this): 3 x len(x) queries, row by row (row 0's
    three targets, then row 1's, ...).

    Per row, for each of the substitute's 3 highest-logit classes other than the returned label: 8 steps of
    ``delta <- clamp(delta + alpha * sign(grad_delta logit_t(x + delta)), -eps, eps)`` from ``delta = 0``, with
    ``eps = jb_step`` in pixels (``jb_step / pixel_std`` normalised) times ``(-1) ** round(round_ / jb_tau)`` and
    ``alpha = |eps| / 10``; the query is ``x + delta``, not clipped to any range. On the rounds where the sign is
    negative, ``clamp(min=-eps, max=eps)`` has ``min > max`` and torch then returns ``max`` for every element:
    ``delta`` is the constant ``eps``, the same uniform darkening for all three targets, whatever the gradient.
    In a 50,000 budget from 100 seeds (rounds 0-4 with ``jb_tau`` 5) rounds 3 and 4 ask 43,600 of the queries,
    so 87 % of the transfer set is brightness-shifted copies of earlier rows, three identical ones per row (13,378
    distinct inputs in all, RESULTS.md).
    Without a negative round the clamp never binds: 8 steps of ``|eps| / 10`` stay inside ``eps``."""
    model.eval()
    eps = (-1.0) ** round(round_ / cfg.jb_tau) * cfg.jb_step / cfg.pixel_std
    alpha = abs(eps) / 10
    k = _top3_targets(_num_classes(model, x))
    out = []
    for i in range(0, len(x), batch_size):
        xb, cb = x[i : i + batch_size], labels[i : i + batch_size]
        with torch.no_grad():
            ranked = model(xb)
        ranked.scatter_(1, cb.unsqueeze(1), float("-inf"))
        targets = ranked.topk(k, dim=1).indices  # (B, k), highest logit first
        rows = xb.repeat_interleave(k, dim=0)  # row-major: row 0 x k targets, row 1 x k, ...
        target = targets.reshape(-1)
        delta = torch.zeros_like(rows)
        for _ in range(RELEASE_PGD_STEPS):
            delta.requires_grad_(True)
            objective = model(rows + delta).gather(1, target.unsqueeze(1)).sum()
            (grad,) = torch.autograd.grad(objective, delta)
            delta = torch.clamp(delta.detach() + alpha * grad.sign(), min=-eps, max=eps)
        out.append(rows + delta)
    return torch.cat(out)


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return model(x[:1]).shape[1]


def _jacobian_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg: AttackConfig, round_: int,
                   gen: torch.Generator, batch_size: int = 512, rank: int | None = None) -> torch.Tensor:
    model.eval()
    new = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].clone().requires_grad_(True)
        cb = labels[i : i + batch_size]
        logp = torch.log_softmax(model(xb), dim=1)
        if cfg.base == "jbtop3":
            ranked = logp.detach().clone()
            ranked.scatter_(1, cb.unsqueeze(1), float("-inf"))
            k = _top3_targets(ranked.shape[1])
            top = ranked.topk(k, dim=1).indices
            pick = torch.randint(0, k, (len(xb),), generator=gen) if rank is None else torch.full((len(xb),), rank)
            target = top.gather(1, pick.unsqueeze(1)).squeeze(1)
            objective = logp.gather(1, target.unsqueeze(1)).sum()
            direction = 1.0
        else:
            # sign(d F(x)[c] / dx), Papernot et al.'s Jacobian row of the returned label, taken through log F
            # (same sign, since F > 0; no underflow to a zero gradient when the substitute is confident)
            objective = logp.gather(1, cb.unsqueeze(1)).sum()
            if cfg.base == "jbda":
                direction = -1.0 if (round_ // cfg.jb_tau) % 2 == 1 else 1.0
            else:  # jbself
                direction = -1.0
        (grad,) = torch.autograd.grad(objective, xb)
        step = direction * cfg.jb_step * grad.sign()
        pixels = (_to_pixels(xb.detach(), cfg) + step).clamp(0.0, 1.0)
        new.append(_from_pixels(pixels, cfg))
    return torch.cat(new)


def _release_step(xb: torch.Tensor, logp: torch.Tensor, labels: torch.Tensor, cfg: AttackConfig,
                  round_: int) -> torch.Tensor:
    """jbda / jbself as the authors' release computes them (prediction-poisoning, defenses/adversary/jacobian.py,
    read for this; the paper's text describes Papernot's step instead):

    - the step is the sign of the gradient of the *cross-entropy* of the returned label (a step away from it),
      ``jb_step`` in pixels, i.e. ``jb_step / pixel_std`` in the normalised units the release works in, its sign
      flipped when ``round(round_ / jb_tau)`` is odd, for jbself too;
    - that step is clipped so that ``x + step`` lies in [0, 1] *in normalised units* (the release's clamp for
      pixels, applied after normalisation): a background pixel of Fashion-MNIST (-0.81 normalised) jumps to 0;
    - jbda queries ``x + step``, jbself ``x - step`` (with the step clipped for ``x + step``); both write
      ``x + step`` into the transfer set (:func:`release_augmentation`).

    Returns the clipped step.
    """
    (grad,) = torch.autograd.grad(-logp.gather(1, labels.unsqueeze(1)).sum(), xb)
    x = xb.detach()
    step = (-1.0) ** round(round_ / cfg.jb_tau) * (cfg.jb_step / cfg.pixel_std) * grad.sign()
    return torch.minimum(torch.maximum(step, -x), 1.0 - x)


def _jacobian(oracle, pool, make_clone, cfg: AttackConfig, progress: bool, watch: Watch | None) -> AttackResult:
    gen = torch.Generator().manual_seed(cfg.seed)
    n_seed = min(cfg.jb_seed_size, cfg.budget, len(pool))
    x = pool[torch.randperm(len(pool), generator=gen)[:n_seed]]
    y = oracle(x)
    history = []
    round_ = 0
    bar = tqdm(total=cfg.budget, desc=f"{cfg.name}: queries", disable=not progress, leave=False, unit="q")
    bar.update(len(x))
    substitute = None
    while True:
        remaining = cfg.budget - len(x)
        if remaining <= 0:
            break
        # retrain the substitute from scratch on everything labelled so far
        torch.manual_seed(cfg.seed + round_)
        substitute = make_clone()
        steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
        epochs = max(cfg.jb_round_epochs, math.ceil(cfg.jb_round_min_steps / steps_per_epoch))
        losses = train_classifier(substitute, x, y, cfg.round_config(epochs, round_),
                                  desc=f"{cfg.name}: round {round_}", progress=False)
        labels = y.argmax(dim=1)
        all_top3 = cfg.base == "jbtop3" and (cfg.jb_top3_all or cfg.jb_release_augmentation)
        per_point = _top3_targets(y.shape[1]) if all_top3 else 1
        take = min(math.ceil(remaining / per_point), len(x))
        if cfg.jb_release_augmentation and cfg.base == "jbtop3":
            # the release augments the first rows (all of them until the budget truncates) and appends the new
            # rows; unlike its jbda / jbself it keeps the rows they came from
            x_new = release_top3(substitute, x[:take], labels[:take], cfg, round_)[:remaining]
        elif cfg.jb_release_augmentation:
            # the release augments the first rows (all of them until the budget truncates) and writes the new rows
            # over the ones they came from, then appends them again: the set becomes [A', rest, A'] (its
            # TensorDataset aliases D with the augmented part), and the originals are gone
            # (jbself: the rows written are the mirror images x + step of the queries x - step)
            queries, x_new = release_augmentation(substitute, x[:take], labels[:take], cfg, round_)
            y_new = query_in_batches(oracle, queries, cfg.query_batch_size, False, "")
            x, y = x.clone(), y.clone()
            x[:take], y[:take] = x_new, y_new
            x, y = torch.cat([x, x_new]), torch.cat([y, y_new])
            history.append({"round": round_, "transfer_size": len(x), "loss": losses[-1] if losses else float("nan")})
            bar.update(len(x_new))
            round_ += 1
            continue
        else:
            sel = torch.arange(take) if take == len(x) else torch.randperm(len(x), generator=gen)[:take].sort().values
            x_new = jacobian_step(substitute, x[sel], labels[sel], cfg, round_, gen)[:remaining]
        y_new = query_in_batches(oracle, x_new, cfg.query_batch_size, False, "")
        x, y = torch.cat([x, x_new]), torch.cat([y, y_new])
        history.append({"round": round_, "transfer_size": len(x), "loss": losses[-1] if losses else float("nan")})
        bar.update(len(x_new))
        round_ += 1
    bar.close()
    # the final clone: trained from scratch on the whole transfer set with the full clone settings
    torch.manual_seed(cfg.seed)
    clone = make_clone()
    train_clone(clone, x, y, cfg, f"{cfg.name}: clone", progress, watch)
    return AttackResult(clone=clone, queries=0, transfer_x=x, transfer_y=y, rounds=round_ + 1, history=history)


def with_pixel_stats(cfg: AttackConfig, mean: float, std: float) -> AttackConfig:
    return replace(cfg, pixel_mean=mean, pixel_std=std)
