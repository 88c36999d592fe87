"""Reproduce the paper's Table 1 row for an undefended victim: each attack's clone accuracy, side by side.

    python -m mlflow_project.lab.table1 --victim artifacts/victims/fashion_mnist_lenet --budget 50000 \
        --jb-budget 10000 --epochs 10 --out results/table1_fashion_mnist.json

Runs, one after another, Knockoff (query sets: the victim's dataset and mnist5k), JBDA, JB-self and JB-top3
against the undefended victim (``identity``), each in a nested MLflow run under one parent, and prints the
measured accuracies next to the paper's (Orekondy et al. 2020, Table 1). Results are appended to ``--out``
after every attack, so a partial run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mlflow_project.lab import evaluate as ev

# Orekondy et al. (ICLR 2020), Table 1, undefended accuracies (%) for the FashionMNIST victim.
PAPER_FASHION_MNIST = {"victim": 92.0, "jbda": 38.7, "jbself": 45.8, "jbtop3": 68.7, "knockoff": 69.2}


def rows(dataset: str, budget: int, jb_budget: int) -> list[tuple[str, str, int]]:
    other = "mnist5k" if dataset != "mnist5k" else "digits"
    return [
        ("knockoff", dataset, budget),
        ("knockoff", other, budget),
        ("jbda", dataset, jb_budget),
        ("jbself", dataset, jb_budget),
        ("jbtop3", dataset, jb_budget),
    ]


def table(results: list[dict], victim_accuracy: float | None) -> str:
    lines = [f"{'attack':10s} {'queryset':14s} {'queries':>8s} {'clone acc %':>12s} {'paper %':>8s} {'wall s':>8s}"]
    if victim_accuracy is not None:
        lines.append(f"{'victim':10s} {'-':14s} {'-':>8s} {100 * victim_accuracy:12.2f} "
                     f"{PAPER_FASHION_MNIST['victim']:8.1f} {'-':>8s}")
    for r in results:
        paper = PAPER_FASHION_MNIST.get(r["attack"], float("nan"))
        lines.append(f"{r['attack']:10s} {r['queryset']:14s} {int(r['queries']):8d} "
                     f"{100 * r['attacker_accuracy']:12.2f} {paper:8.1f} {r['seconds']:8.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m mlflow_project.lab.table1", description=__doc__.split("\n")[0])
    p.add_argument("--victim", required=True)
    p.add_argument("--budget", type=int, default=50_000, help="Knockoff budget")
    p.add_argument("--jb-budget", type=int, default=50_000, help="JBDA / JB-self / JB-top3 budget")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated row numbers (0-4) to run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="results/table1.json")
    p.add_argument("--tracking-uri", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    import mlflow

    from mlflow_project.lifecycle import tracking

    victim = ev.load_victim(a.victim)
    dataset = victim.spec.dataset
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = json.loads(out.read_text()) if out.exists() else []
    todo = rows(dataset, a.budget, a.jb_budget)
    if a.only:
        todo = [todo[int(i)] for i in a.only.split(",")]
    tracking.setup(a.tracking_uri)
    victim_accuracy = None
    with mlflow.start_run(run_name=f"table1-{dataset}"):
        mlflow.log_params({"victim": a.victim, "budget": a.budget, "jb_budget": a.jb_budget, "epochs": a.epochs})
        for attack, queryset, budget in todo:
            cfg = ev.EvalConfig(dataset=dataset, victim=a.victim, defense={"name": "identity"}, attack=attack,
                                queryset=queryset, budget=budget, epochs=a.epochs, seed=a.seed)
            t0 = time.perf_counter()
            with mlflow.start_run(run_name=f"{attack}-{queryset}-{budget}", nested=True):
                r = ev.evaluate(cfg, victim=victim)
                ev.log_evaluation(r)
            victim_accuracy = r.metrics["victim_accuracy"]
            row = {"attack": attack, "queryset": queryset, "budget": budget, "epochs": a.epochs,
                   "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(), **r.metrics}
            results.append(row)
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(ev.summary_text(r), flush=True)
        print(table(results, victim_accuracy), flush=True)
    return results


if __name__ == "__main__":
    main()
