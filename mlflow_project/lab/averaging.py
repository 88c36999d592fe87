"""The averaging subversion of a randomised or input-dependent defense, run in the lab (in-process oracle).

The attacker queries each of ``images`` pool images ``repeats`` times, each time slightly augmented (a random
integer shift of up to ``shift`` pixels and Gaussian pixel noise of std ``noise``), averages the returned
probabilities per image, and trains the clone on the augmented queries, each labelled with its image's average.
If the defense's perturbation were independent noise around the true posterior, averaging would wash it out.

Arms, all scored by the clone's accuracy on the victim's test set (same clone architecture, optimiser, seed):

- ``single``: the ``images`` originals, each queried once (budget ``images``);
- ``augmented``: the ``images * repeats`` augmented queries, each labelled with its own answer (same budget
  and same inputs as ``averaged``: only the averaging differs);
- ``averaged``: the same augmented queries, each labelled with its image's averaged answer;
- ``undefended``: the ``augmented`` arm without a defense (the attacker's ceiling).

The identity check of the repeats without augmentation (``repeats`` identical queries of the same images give
identical answers, so averaging them equals one answer) is part of every run (``identical_repeats``).

    .venv/bin/python -m mlflow_project.lab.averaging --victim artifacts/victims/fashion_mnist_lenet
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mlflow_project.lab import data
from mlflow_project.lab.evaluate import Victim, load_victim
from mlflow_project.lab.models import build_model
from mlflow_project.lab.oracles import build_victim_defense
from mlflow_project.lab.training import TrainConfig, accuracy, train_classifier

DEFENSES: dict[str, dict[str, Any]] = {
    "mad_argmax": {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1", "jacobian": "last_layer"},
    "random_noise": {"name": "random_noise", "epsilon": 2.0, "norm": "l2"},
}


@dataclass(frozen=True)
class AveragingConfig:
    images: int = 300
    repeats: int = 10
    shift: int = 2  # pixels, each axis
    noise: float = 0.05  # std of Gaussian noise, in [0, 1] pixel units
    epochs: int = 15
    lr: float = 0.05
    batch_size: int = 64
    seed: int = 0
    surrogate_seed: int = 0
    defenses: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: dict(DEFENSES))


def augment(pixels: torch.Tensor, gen: torch.Generator, shift: int, noise: float) -> torch.Tensor:
    """N x C x H x W images in [0, 1] -> shifted (zero fill) by a random integer offset in [-shift, shift] on
    each axis, plus Gaussian noise of std ``noise``, clamped to [0, 1]."""
    n, _, h, w = pixels.shape
    out = torch.zeros_like(pixels)
    dy = torch.randint(-shift, shift + 1, (n,), generator=gen)
    dx = torch.randint(-shift, shift + 1, (n,), generator=gen)
    padded = torch.nn.functional.pad(pixels, (shift, shift, shift, shift))
    for oy in range(-shift, shift + 1):
        for ox in range(-shift, shift + 1):
            idx = ((dy == oy) & (dx == ox)).nonzero().flatten()
            if len(idx):
                out[idx] = padded[idx, :, shift - oy : shift - oy + h, shift - ox : shift - ox + w]
    if noise > 0:
        out = out + noise * torch.randn(out.shape, generator=gen)
    return out.clamp(0, 1)


def make_oracle(victim: Victim, defense_cfg: Mapping[str, Any] | None, surrogate_seed: int) -> Callable:
    """x (normalised) -> the defended probabilities, in batches, in-process."""
    model = victim.model.eval()
    defense = None
    if defense_cfg is not None:
        defense = build_victim_defense(model, dict(defense_cfg), victim.spec.num_classes, surrogate_seed)

    @torch.no_grad()
    def oracle(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(0, len(x), 512):
            xb = x[i : i + 512]
            y = torch.softmax(model(xb), dim=1)
            outs.append((defense(y, xb).probs if defense is not None else y).double())
        return torch.cat(outs)

    return oracle


def _train(victim: Victim, x: torch.Tensor, targets: torch.Tensor, cfg: AveragingConfig, test) -> float:
    torch.manual_seed(cfg.seed)
    clone = build_model(victim.arch, num_classes=victim.spec.num_classes)
    tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed)
    train_classifier(clone, x, targets.float(), tcfg, progress=False)
    return accuracy(clone, *test)


def run(victim: Victim, cfg: AveragingConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    spec = victim.spec
    pool = data.query_set(spec.dataset, spec)
    test_x, test_y = data.load_raw(spec.dataset, "test")
    test = (data.adapt(test_x, spec), test_y)
    gen = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(pool), generator=gen)[: cfg.images]
    originals = pool[pick]
    pixels = originals * spec.std + spec.mean
    aug_pixels = augment(pixels.repeat(cfg.repeats, 1, 1, 1), gen, cfg.shift, cfg.noise)
    queries = ((aug_pixels - spec.mean) / spec.std).float()  # row r * images + i is a view of image i
    results: dict[str, Any] = {"config": {k: v for k, v in asdict(cfg).items() if k != "defenses"}, "arms": {}}
    arms: dict[str, dict[str, float]] = results["arms"]

    plain = make_oracle(victim, None, cfg.surrogate_seed)
    t0 = time.perf_counter()
    plain_answers = plain(queries)
    plain_averaged = plain_answers.reshape(cfg.repeats, cfg.images, -1).mean(0)
    arms["undefended"] = {"augmented": _train(victim, queries, plain_answers, cfg, test)}
    arms["undefended"]["single"] = _train(victim, originals, plain(originals), cfg, test)
    log(f"undefended: {arms['undefended']}  ({time.perf_counter() - t0:.0f}s)")
    for name, dcfg in cfg.defenses.items():
        t0 = time.perf_counter()
        oracle = make_oracle(victim, dcfg, cfg.surrogate_seed)
        single = oracle(originals)
        repeated = oracle(originals.repeat(cfg.repeats, 1, 1, 1)).reshape(cfg.repeats, cfg.images, -1)
        identical = bool((repeated == single.unsqueeze(0)).all())
        answers = oracle(queries)
        averaged = answers.reshape(cfg.repeats, cfg.images, -1).mean(0)
        arm = {
            "single": _train(victim, originals, single, cfg, test),
            "augmented": _train(victim, queries, answers, cfg, test),
            "averaged": _train(victim, queries, averaged.repeat(cfg.repeats, 1), cfg, test),
            "identical_repeats": identical,
            # the perturbation left in one answer, and in the average of an image's answers (each against the
            # undefended answer, or the undefended average, over the same augmented views)
            "l1_answer": (answers - plain_answers).abs().sum(1).mean().item(),
            "l1_average": (averaged - plain_averaged).abs().sum(1).mean().item(),
        }
        arms[name] = arm
        log(f"{name} {json.dumps(dict(dcfg))}: {json.dumps(arm)}  ({time.perf_counter() - t0:.0f}s)")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--victim", default="artifacts/victims/fashion_mnist_lenet")
    p.add_argument("--images", type=int, default=AveragingConfig.images)
    p.add_argument("--repeats", type=int, default=AveragingConfig.repeats)
    p.add_argument("--shift", type=int, default=AveragingConfig.shift)
    p.add_argument("--noise", type=float, default=AveragingConfig.noise)
    p.add_argument("--epochs", type=int, default=AveragingConfig.epochs)
    p.add_argument("--seed", type=int, default=AveragingConfig.seed)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    cfg = AveragingConfig(images=a.images, repeats=a.repeats, shift=a.shift, noise=a.noise, epochs=a.epochs,
                          seed=a.seed)
    res = run(load_victim(a.victim), cfg)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
