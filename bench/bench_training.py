"""The lab's training loop against a bare PyTorch loop, side by side: LeNet, 28 x 28 images, soft targets.

    .venv/bin/python bench/bench_training.py [--threads 2] [--n 50000] [--batch-size 64] [--epochs 1] [--rounds 3]

Both sides train a fresh LeNet (the paper's conv20-conv50-fc500-fc10) on the same ``n`` random images with
soft targets (rows on the simplex), SGD lr 0.1 momentum 0.5, the paper preset's batch size, one epoch per
timing: the lab side is :func:`mlflow_project.lab.training.train_classifier` with the paper preset's settings
(constant lr, no weight decay), the bare side is the textbook loop (shuffle, slice, forward, soft CE,
backward, step; no logging, no schedule). Each round times the lab between two bare runs and compares it with
their mean; the median of the per-round throughput ratios (lab / bare) is reported (target >= 0.8), robust to
other load on a shared machine.
Also prints the projected time of a paper-protocol clone (50,000 images x 30 epochs). Not a test: nothing
here asserts; it prints what it measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mlflow_project.lab.models import LeNet  # noqa: E402
from mlflow_project.lab.training import TrainConfig, train_classifier  # noqa: E402


def bare_loop(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, batch_size: int, epochs: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = -(t[idx] * F.log_softmax(model(x[idx]), dim=1)).sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(a.n, 1, 28, 28, generator=gen)
    t = torch.softmax(3 * torch.randn(a.n, 10, generator=gen), dim=1)
    cfg = TrainConfig(epochs=a.epochs, lr=0.1, momentum=0.5, weight_decay=0.0, batch_size=a.batch_size,
                      schedule="constant")
    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return a.n * a.epochs / (time.perf_counter() - t0)

    def bare_run(seed: int) -> float:
        torch.manual_seed(seed)
        m = LeNet()
        return timed(lambda: bare_loop(m, x, t, a.batch_size, a.epochs))

    def lab_run(seed: int) -> float:
        torch.manual_seed(seed)
        m = LeNet()
        return timed(lambda: train_classifier(m, x, t, cfg, progress=False))

    ratios, lab_rates, bare_rates = [], [], []
    before = bare_run(0)
    for r in range(a.rounds):
        # sandwiched: the lab's time against the mean of the bare runs just before and just after it
        lab = lab_run(r)
        after = bare_run(r + 1)
        bare = 2 / (1 / before + 1 / after)
        ratios.append(lab / bare)
        lab_rates.append(lab)
        bare_rates.append(bare)
        print(f"round {r}: bare {bare:7.0f} img/s   lab {lab:7.0f} img/s   ratio {lab / bare:.3f}", flush=True)
        before = after
    lab_med = statistics.median(lab_rates)
    print(f"threads={a.threads} n={a.n} batch={a.batch_size} epochs/round={a.epochs}")
    print(f"median: bare {statistics.median(bare_rates):.0f} img/s, lab {lab_med:.0f} img/s, "
          f"ratio lab/bare {statistics.median(ratios):.3f} (target >= 0.8)")
    minutes = 50_000 * 30 / lab_med / 60
    print(f"projected paper-protocol clone (50,000 x 30 epochs) with the lab loop: {minutes:.1f} min")


if __name__ == "__main__":
    main()
