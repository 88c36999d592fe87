"""MAD's cost on the paper's LeNet (1 x 28 x 28, K = 10), measured side by side in one process.

    .venv/bin/python bench/bench_mad.py [--threads 2] [--rounds 9]

1. overhead ratio = time(victim forward + defense) / time(victim forward + surrogate forward), batch 1 and
   256, jacobian=last_layer (target <= 1.15 at batch 256). The defense includes its own surrogate forward,
   so the ratio is 1 + (the defense's own arithmetic) / (the two forwards). Each round times both sides back
   to back; the median of the per-round ratios is reported (robust to other load on a shared machine).
2. speed-up of the batched defense over the per-sample reference (bench/mad_reference.py: per sample and per
   class autograd.grad, explicit G, explicit objective over every candidate), batch 256, last_layer
   (target >= 100x), and for jacobian=all (cost per row; the reference is timed on a few rows, it is linear
   in the number of rows by construction).
3. mad_argmax cost per row for K = 10 (all 512 subsets) and K = 100 (greedy, max_candidates=4096).
4. per-call cost of the M = I NumPy path (plugins/mad/euclidean.py, what last_layer l1/l2 runs) against the
   general torch pipeline on the same rows and surrogate softmax, batch 1, 8 and 256 (CPU time, minimum over
   rounds).
Not a test: nothing here asserts; it prints what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from mad_reference import prepare, reference_mad  # noqa: E402

from mlflow_project.lab.models import LeNet  # noqa: E402
from plugins import build_defense  # noqa: E402
from plugins.mad import candidates  # noqa: E402
from plugins.surrogate import make_surrogate  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def paired(fn_a, fn_b, rounds: int, calls: int) -> tuple[float, float, float]:
    """Median per-call time of a and b, and the median of the per-round ratios b / a."""
    for _ in range(3):
        fn_a()
        fn_b()
    ta, tb, ratios = [], [], []
    for _ in range(rounds):
        a = per_call(fn_a, calls)
        b = per_call(fn_b, calls)
        ta.append(a)
        tb.append(b)
        ratios.append(b / a)
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


class CachedLogits(torch.nn.Module):
    """Stands in for the surrogate with its logits already computed: an identity nn.Linear over them, so the
    defense's time is its own arithmetic (the last-layer check still sees a linear output layer)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        k = logits.shape[1]
        self.logits = logits
        self.head = torch.nn.Linear(k, k).requires_grad_(False)
        self.head.weight.copy_(torch.eye(k))
        self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.logits)


def arithmetic_time(config, surrogate, probs, x, reps: int) -> float:
    """Median time of the defense given the surrogate's logits (its own arithmetic only)."""
    with torch.no_grad():
        cached = CachedLogits(surrogate(x))
    defense = build_defense(config, surrogate=cached)
    for _ in range(3):
        defense(probs, x)
    return statistics.median(per_call(lambda: defense(probs, x), 1) for _ in range(reps))


def setup(num_classes: int, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    victim = LeNet(num_classes).eval().requires_grad_(False)
    surrogate = make_surrogate(victim, seed + 1)
    x = torch.randn(batch, 1, 28, 28)
    return victim, surrogate, x


def overhead(victim, surrogate, x, config, rounds):
    defense = build_defense(config, surrogate=surrogate)

    def base():
        with torch.no_grad():
            torch.softmax(victim(x), dim=1)
            surrogate(x)

    def defended():
        with torch.no_grad():
            probs = torch.softmax(victim(x), dim=1)
        defense(probs, x)

    calls = 20 if x.shape[0] == 1 else 1
    return paired(base, defended, rounds, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"bench_mad  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  torch {torch.__version__}  "
          f"threads={torch.get_num_threads()}  cpus={os.cpu_count()} ({cpu_name()})  load1={load:.1f}")

    print("\n1) overhead ratio (victim + defense) / (victim + surrogate), LeNet K=10, jacobian=last_layer")
    print(f"{'batch':>5}  {'defense':<11}{'norm':<5}{'victim+surr ms':>15}{'victim+def ms':>14}{'ratio':>7}")
    for batch in (1, 256):
        victim, surrogate, x = setup(10, batch)
        for name in ("mad", "mad_argmax"):
            for norm, eps in (("l1", 0.5), ("l2", 0.5), ("kl", 0.5)):
                config = {"name": name, "epsilon": eps, "norm": norm}
                ta, tb, ratio = overhead(victim, surrogate, x, config, args.rounds)
                print(f"{batch:>5}  {name:<11}{norm:<5}{ta * 1e3:>15.3f}{tb * 1e3:>14.3f}{ratio:>7.3f}")

    print("\n2) speed-up over the per-sample reference (same rows, same surrogate), LeNet K=10, l1, eps=0.5")
    print("   end-to-end: each side includes its surrogate computation (reference: forward + K autograd.grad")
    print("   per sample; batched: the defense call). arithmetic: the reference reuses one batched forward")
    print("   and pays per row only for its K gradients, objective and mixing; batched: the defense given")
    print("   the surrogate's logits (median of 15 calls).")
    print(f"{'jacobian':<11}{'defense':<11}{'rows':>5}{'ref ms/row':>11}{'batched ms/row':>15}{'speed-up':>9}"
          f"{'ref arith':>10}{'batched arith':>14}{'speed-up':>9}{'max|dy|':>9}")
    victim, surrogate, x = setup(10, 256)
    with torch.no_grad():
        probs = torch.softmax(victim(x), dim=1)
    cases = [("last_layer", "mad", 256, 256), ("last_layer", "mad_argmax", 256, 256),
             ("all", "mad", 32, 4), ("all", "mad_argmax", 32, 1)]
    for jac, name, batch, ref_rows in cases:
        config = {"name": name, "epsilon": 0.5, "norm": "l1", "jacobian": jac}
        defense = build_defense(config, surrogate=surrogate)
        xb, pb = x[:batch], probs[:batch]
        defense(pb, xb)  # warm-up (torch.func's first call initialises it)

        def surrogate_only(s=surrogate, xx=xb):
            with torch.no_grad():
                torch.softmax(s(xx), dim=1)

        reps = 5 if jac == "last_layer" else 1
        _, batched, _ = paired(surrogate_only, lambda d=defense, p=pb, xx=xb: d(p, xx), reps, 1)
        out = defense(pb[:ref_rows], xb[:ref_rows]).probs.to(torch.float64)
        prepared = prepare(surrogate, jac)
        start = time.perf_counter()
        ref = reference_mad(surrogate, xb[:ref_rows], pb[:ref_rows], name, 0.5, "l1", jac, prepared=prepared)
        ref_row = (time.perf_counter() - start) / ref_rows
        row = batched / batch
        diff = (out - ref).abs().max().item()
        line = f"{jac:<11}{name:<11}{batch:>5}{ref_row * 1e3:>11.3f}{row * 1e3:>15.4f}{ref_row / row:>8.0f}x"
        if jac == "last_layer":
            start = time.perf_counter()
            reference_mad(surrogate, xb[:ref_rows], pb[:ref_rows], name, 0.5, "l1", jac, shared_forward=True,
                          prepared=prepared)
            ref_arith = (time.perf_counter() - start) / ref_rows
            arith = arithmetic_time(config, surrogate, pb, xb, 15) / batch
            line += f"{ref_arith * 1e3:>10.3f}{arith * 1e3:>14.4f}{ref_arith / arith:>8.0f}x"
        else:
            line += f"{'-':>10}{'-':>14}{'-':>9}"
        print(line + f"{diff:>9.1e}")

    print("\n3) mad_argmax cost per row, batch 256, jacobian=last_layer, l1, eps=0.5 (arithmetic: the defense"
          " given the surrogate's logits)")
    print(f"{'K':>4}  {'candidates/row':<28}{'surrogate us/row':>17}{'defense us/row':>15}"
          f"{'arithmetic us/row':>18}")
    for k in (10, 100):
        victim, surrogate, x = setup(k, 256)
        with torch.no_grad():
            probs = torch.softmax(victim(x), dim=1)
        defense = build_defense({"name": "mad_argmax", "epsilon": 0.5, "norm": "l1"}, surrogate=surrogate)

        def surrogate_only(s=surrogate, xx=x):
            with torch.no_grad():
                torch.softmax(s(xx), dim=1)

        t_s, t_d, _ = paired(surrogate_only, lambda d=defense, p=probs, xx=x: d(p, xx), args.rounds, 1)
        t_a = arithmetic_time({"name": "mad_argmax", "epsilon": 0.5, "norm": "l1"}, surrogate, probs, x, 15)
        used = candidates.greedy_candidates_scored(k, 4096)
        desc = "2^(K-1) = 512 (exhaustive)" if k <= 10 else f"greedy, {used} (bound 4096)"
        per_row = [t / 256 * 1e6 for t in (t_s, t_d, t_a)]
        print(f"{k:>4}  {desc:<28}{per_row[0]:>17.1f}{per_row[1]:>15.1f}{per_row[2]:>18.1f}")

    print("\n4) M = I: NumPy path vs the torch pipeline, per call given the surrogate's softmax (CPU us, min over"
          f" {max(args.rounds, 15)} rounds), LeNet K=10, last_layer, eps=0.5")
    print(f"{'batch':>5}  {'defense':<11}{'norm':<5}{'torch us':>9}{'numpy us':>9}{'numpy/torch':>12}")
    victim, surrogate, x = setup(10, 256)
    with torch.no_grad():
        probs = torch.softmax(victim(x), dim=1).to(torch.float64)
    for batch in (1, 8, 256):
        xb, pb = x[:batch], probs[:batch]
        for name in ("mad", "mad_argmax"):
            for norm in ("l1", "l2"):
                defense = build_defense({"name": name, "epsilon": 0.5, "norm": norm}, surrogate=surrogate)
                geometry = defense.geometry(pb, xb)
                kind = defense.euclidean_kind(10)
                torch_path = lambda d=defense, p=pb, g=geometry, xx=xb: d._perturb_torch(p, g, xx)  # noqa: E731
                numpy_path = lambda d=defense, p=pb, g=geometry, k=kind: d._perturb_euclidean(p, g, k)  # noqa: E731
                t_torch, t_numpy = (cpu_min(fn, max(args.rounds, 15), 20 if batch < 256 else 2)
                                    for fn in (torch_path, numpy_path))
                print(f"{batch:>5}  {name:<11}{norm:<5}{t_torch * 1e6:>9.0f}{t_numpy * 1e6:>9.0f}"
                      f"{t_numpy / t_torch:>12.2f}")


def cpu_min(fn, rounds: int, calls: int) -> float:
    """Minimum over rounds of the per-call CPU time (time.thread_time) of ``fn``."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls)
    return best


if __name__ == "__main__":
    main()
