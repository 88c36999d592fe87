"""Training and scoring shared by the victim and the attackers' clones.

One loop for both: mini-batch SGD with momentum and a learning-rate schedule (cosine by default; constant, as
in the paper's clone training, or step decay), minimising the soft cross-entropy ``-sum_k t_k log
softmax(f(x))_k`` against targets ``t`` that are either class indices (the victim's labels: plain
cross-entropy) or rows on the simplex (the oracle's returned probabilities).

The loop is kept close to a bare PyTorch loop's throughput (bench/bench_training.py measures the ratio): the
data are in-memory tensors sliced per batch (no DataLoader), and the epoch's loss is accumulated on the tensor
side, so there is one host sync per epoch, not one per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

SCHEDULES = ("cosine", "constant", "step")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, restoring the previous count. A CPU run is bit-for-bit reproducible only at
    a fixed thread count (the reductions' order depends on it), so whatever is cached and keyed by its weights
    (the sweep's victim, the handwriting set) is computed under a fixed count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings. Defaults are the clone's (scaled to a 2-core CPU; see attacks.AttackConfig)."""

    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    schedule: str = "cosine"  # cosine (per step, to 0) | constant | step (lr *= step_gamma every step_epochs)
    step_epochs: int = 30
    step_gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: unknown {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if self.step_epochs < 1:
            raise ValueError(f"step_epochs: must be >= 1; got {self.step_epochs}")
        if self.epochs < 0:
            raise ValueError(f"epochs: must be >= 0; got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0; got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1; got {self.batch_size}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: must be in [0, 1); got {self.momentum}")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_k t_k log softmax(logits)_k``; ``targets`` are indices or B x K rows."""
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    cfg: TrainConfig,
    desc: str = "train",
    progress: bool = True,
    on_epoch=None,
    loss_fn=soft_cross_entropy,
) -> list[float]:
    """Train ``model`` in place on (``x``, ``targets``); return the mean loss of each epoch.

    ``on_epoch(epoch, loss)`` is called after every epoch (e.g. to log to MLflow). ``loss_fn(logits, targets)``
    defaults to the soft cross-entropy (the misinformation model passes its own). Deterministic for a fixed
    ``cfg.seed`` (shuffling uses its own generator).
    """
    if len(x) != len(targets):
        raise ValueError(f"x has {len(x)} rows but targets has {len(targets)}")
    losses: list[float] = []
    if cfg.epochs == 0 or len(x) == 0:
        return losses
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    sched = None  # stepped per batch (cosine) or per epoch (step); constant: none
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    elif cfg.schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_epochs, gamma=cfg.step_gamma)
    per_batch = cfg.schedule == "cosine"
    targets = targets.float() if targets.dim() == 2 else targets.long()
    model.train()
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False, unit="epoch")
    for epoch in bar:
        perm = torch.randperm(len(x), generator=gen)
        total = torch.zeros((), dtype=torch.float64)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = loss_fn(model(x[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if per_batch:
                sched.step()
            total += loss.detach() * len(idx)  # no host sync per batch
        if sched is not None and not per_batch:
            sched.step()
        losses.append(total.item() / len(x))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else None
    model.train(was_training)
    return out if out is not None else torch.empty(0)


@torch.no_grad()
def predict_probs(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.softmax(predict_logits(model, x, batch_size), dim=1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in [0, 1]."""
    if len(y) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return (predict_logits(model, x, batch_size).argmax(dim=1) == y).float().mean().item()
