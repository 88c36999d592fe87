"""Reproduce the paper's Table 1 row for an undefended victim: each attack's clone accuracy, both attackers.

    python -m mlflow_project.lab.table1 --seeds 0,1,2 --threads 2            # the paper preset, ~5 h per seed
    mlflow run . -e table1 -P seeds=0,1,2 --env-manager local

Runs Knockoff (transfer sets: the handwriting set, the EMNIST stand-in, and mnist5k), JBDA, JB-self and JB-top3
(seeded from the victim's own train split) against the undefended victim (``identity``) at the ``paper``
preset's protocol (:data:`mlflow_project.sweep.presets.PAPER_PROTOCOL`: LeNet clone, SGD lr 0.1 momentum 0.5,
30 epochs, batch 64, budget 50,000), for every seed; every row trains the soft-label clone and its top-1 twin
from one query pass (:mod:`mlflow_project.lab.attacks`). Each (attack, query set, budget, epochs, seed) is one
nested MLflow run under one parent and one row of ``--out`` (CSV), appended as soon as it finishes; a rerun
skips the rows whose key is already in the CSV, so an interrupted run continues where it stopped. The table
printed at the end puts the mean [min-max] over seeds next to the paper's (Orekondy et al. 2020, Table 1).

Every row also scores both clones on the test set after each epoch (MLflow step metrics
``attacker_epoch_accuracy_soft`` / ``_top1``) and records each clone's best epoch (``*_best_epoch`` columns): the
checkpoint the authors' release keeps (knockoffnets' ``train_model`` saves the epoch of best test accuracy), chosen
on the test set, so an upper bound beside the last epoch's measurement. The release trains Knockoff's clone
differently from the paper's text; to run it that way:

    python -m mlflow_project.lab.table1 --attacks knockoff --knockoff-querysets handwriting --epochs 50 \
        --clone-lr 0.01 --attack-options '{"weight_decay": 0.0005, "budget_ladder": [50, 100, 500, 1000, 10000]}'

(its README's ``knockoff/adversary/train.py --budgets 50,100,500,1000,10000,60000 --epochs 50`` at the script's
defaults lr 0.01, momentum 0.5, weight decay 5e-4, batch 64, one model trained through the budgets in turn.)

The victim: ``--victim`` (an export directory or model URI), else the paper preset's (the lab's saved victim,
or one trained once and cached, as the sweep does), so the Table 1 row and the paper sweeps share it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from mlflow_project.cli import integer
from mlflow_project.lab import evaluate as ev

# Orekondy et al. (ICLR 2020), Table 1, undefended accuracies (%) for the FashionMNIST victim.
PAPER_FASHION_MNIST = {"victim": 92.0, "jbda": 38.7, "jbself": 45.8, "jbtop3": 68.7, "knockoff": 69.2}
JB_ATTACKS = ("jbda", "jbself", "jbtop3")
COLUMNS = ("key", "attack", "queryset", "budget", "epochs", "lr", "seed", "victim_accuracy", "attacker_accuracy_soft",
           "attacker_accuracy_top1", "attacker_accuracy_strongest", "attacker_accuracy_soft_best_epoch",
           "attacker_accuracy_top1_best_epoch", "attacker_accuracy_strongest_best_epoch", "attacker_best_epoch_soft",
           "attacker_best_epoch_top1", "attacker_agreement_soft",
           "attacker_agreement_top1", "query_top1_flip_rate", "query_label_entropy", "query_confidence_mean", "queries",
           "paper", "seconds", "threads", "run_id", "attack_options", "per_class")


def rows(dataset: str, budget: int, knockoff_querysets: list[str], attacks: list[str]) -> list[tuple[str, str, int]]:
    """(attack, query set, budget) of each Table 1 row to run: Knockoff once per transfer set, JB from the
    victim's dataset."""
    out = []
    for attack in attacks:
        if attack == "knockoff":
            out += [("knockoff", q, budget) for q in knockoff_querysets]
        elif attack in JB_ATTACKS:
            out.append((attack, dataset, budget))
        else:
            raise ValueError(f"attacks: unknown {attack!r}; allowed: knockoff, {', '.join(JB_ATTACKS)}")
    return out


def row_key(victim_hash: str, attack: str, queryset: str, budget: int, epochs: int, seed: int,
            options: dict[str, Any], lr: float | None = None) -> str:
    """A row's identity. ``lr``: the clone's, when it is not the paper preset's (None: the preset's, so the rows
    measured before ``--clone-lr`` existed keep their keys)."""
    from mlflow_project.sweep.run import PROTOCOL_VERSION, stable_hash

    ident = {"victim": victim_hash, "attack": attack, "queryset": queryset, "budget": budget, "epochs": epochs,
             "seed": seed, "options": options, "protocol": PROTOCOL_VERSION}
    if lr is not None:
        ident["lr"] = lr
    return stable_hash(ident)


def parse_attack_options(text: str) -> dict[str, Any]:
    """``--attack-options``: a JSON object of :class:`attacks.AttackConfig` fields the preset's protocol leaves
    to the attack (not budget, epochs, seed or the clone's lr / batch size, which are Table 1's own)."""
    if not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--attack-options: not valid JSON ({exc}); "
                         "e.g. '{\"jb_release_augmentation\": true}'") from None
    if not isinstance(doc, dict):
        raise SystemExit(f"--attack-options: must be a JSON object; got {text!r}")
    unknown = sorted(set(doc) - ev.ATTACK_OPTIONS)
    if unknown:
        raise SystemExit(f"--attack-options: unknown {unknown}; allowed: {', '.join(sorted(ev.ATTACK_OPTIONS))}")
    return doc


def read_done(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to the CSV at ``path`` (header :data:`COLUMNS`). A file written with an older header is
    first rewritten under the current one (the columns it lacked left empty), so every row stays aligned."""
    if path.exists():
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header is not None and tuple(header) != COLUMNS:
            old = read_done(path)
            with path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
                w.writeheader()
                w.writerows(old)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def table(results: list[dict[str, Any]]) -> str:
    """Mean [min-max] over seeds per (attack, attack options, query set, budget, clone epochs and lr): the soft
    and top-1 clones and the strongest of the two per seed, next to the paper's number, and the strongest at its
    best epoch where the rows recorded one (the checkpoint the authors' release keeps: chosen on the test set, so
    an upper bound). A row with attack options or a clone training other than the paper preset's is labelled by
    them (``jbda [release]`` for ``jb_release_augmentation``, ``e50 lr0.01``)."""
    from mlflow_project.sweep.presets import PAPER_PROTOCOL

    groups: dict[tuple[str, str, str, str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        options = r.get("attack_options") or "{}"
        epochs = str(int(float(r["epochs"]))) if r.get("epochs") not in (None, "") else ""
        lr = f"{float(r.get('lr') or PAPER_PROTOCOL['clone_lr']):g}"  # rows from before the column: the preset's
        groups.setdefault((r["attack"], options, r["queryset"], str(r["budget"]), epochs, lr), []).append(r)

    def cell(mine: list[dict[str, Any]], key: str) -> str:
        if any(r.get(key) in (None, "") for r in mine):
            return "-"
        vals = [100 * float(r[key]) for r in mine]
        mean = sum(vals) / len(vals)
        return f"{mean:5.1f} [{min(vals):.1f}-{max(vals):.1f}]" if len(vals) > 1 else f"{mean:5.1f}"

    labels = {key: attack_label(key[0], key[1], key[4], key[5]) for key in groups}
    width = max([16, *map(len, labels.values())])
    lines = [f"{'attack':{width}s} {'queryset':12s} {'queries':>8s} {'seeds':>5s} {'soft %':>18s} {'top-1 %':>18s} "
             f"{'strongest %':>18s} {'paper %':>8s} {'gap (strongest)':>16s} {'best epoch %':>18s}"]
    victim = [100 * float(r["victim_accuracy"]) for r in results]
    if victim:
        lines.append(f"{'victim':{width}s} {'-':12s} {'-':>8s} {'-':>5s} {victim[0]:18.1f} {'':>18s} {'':>18s} "
                     f"{PAPER_FASHION_MNIST['victim']:8.1f}")
    for key, mine in groups.items():
        attack, _, queryset, budget = key[:4]
        paper = PAPER_FASHION_MNIST.get(attack, math.nan)
        strongest = sum(100 * float(r["attacker_accuracy_strongest"]) for r in mine) / len(mine)
        lines.append(f"{labels[key]:{width}s} {queryset:12s} {int(float(budget)):8d} "
                     f"{len(mine):5d} {cell(mine, 'attacker_accuracy_soft'):>18s} "
                     f"{cell(mine, 'attacker_accuracy_top1'):>18s} {cell(mine, 'attacker_accuracy_strongest'):>18s} "
                     f"{paper:8.1f} {strongest - paper:+16.1f} "
                     f"{cell(mine, 'attacker_accuracy_strongest_best_epoch'):>18s}")
    return "\n".join(lines)


def attack_label(attack: str, options: str, epochs: str = "", lr: str = "") -> str:
    """A row's label: the attack, ``[release]`` for the release's JB augmentation, the clone's epochs and lr
    where they are not the paper preset's, and any other attack option as ``key=value``."""
    from mlflow_project.sweep.presets import PAPER_PROTOCOL

    doc = json.loads(options) if options else {}
    if doc.pop("jb_release_augmentation", False):
        attack += " [release]"
    if epochs and int(float(epochs)) != PAPER_PROTOCOL["epochs"]:
        attack += f" e{int(float(epochs))}"
    if lr and float(lr) != PAPER_PROTOCOL["clone_lr"]:
        attack += f" lr{float(lr):g}"
    def text(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)

    return attack + "".join(f" {k}={text(v)}" for k, v in sorted(doc.items()))


def report(paths: list[str]) -> str:
    """The table of the rows of one or more table1 CSVs (nothing is run)."""
    rows = [r for path in paths for r in read_done(Path(path))]
    if not rows:
        raise SystemExit(f"--report: no rows in {', '.join(paths)}")
    return table(rows)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from mlflow_project.sweep.presets import get_preset

    p = argparse.ArgumentParser(prog="python -m mlflow_project.lab.table1", description=__doc__.split("\n")[0])
    p.add_argument("--victim", default="", help="export directory or model URI (default: the paper preset's victim)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--attacks", default="knockoff,jbda,jbself,jbtop3")
    p.add_argument("--knockoff-querysets", default="handwriting,mnist5k",
                   help="Knockoff's transfer sets (the handwriting set stands in for EMNIST)")
    p.add_argument("--budget", type=integer, default=0, help="queries per attack (default: the paper preset's, 50,000)")
    p.add_argument("--epochs", type=integer, default=0, help="clone training epochs (default: the paper preset's, 30)")
    p.add_argument("--clone-lr", type=float, default=0.0,
                   help="the clone's SGD learning rate (default 0: the paper preset's, 0.1; the release trains "
                        "Knockoff's at 0.01)")
    p.add_argument("--threads", type=integer, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--attack-options", default="",
                   help='JSON object of attack settings over the paper preset\'s (attacks.AttackConfig fields), e.g. '
                        '\'{"jb_release_augmentation": true}\' for the JB attacks as the authors\' release runs them')
    p.add_argument("--out", default="results/table1.csv", help="the CSV (appended to; rows already in it are skipped)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--report", default="", help="comma-separated table1 CSVs: print their table and run nothing")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.report:
        text = report([x for x in a.report.split(",") if x.strip()])
        print(text)
        return []
    if a.threads:
        torch.set_num_threads(a.threads)

    import mlflow

    from mlflow_project.lifecycle import tracking
    from mlflow_project.sweep.run import resolve_victim, weights_hash

    preset = get_preset("paper")
    budget, epochs = a.budget or preset.budget, a.epochs or preset.epochs
    if a.clone_lr < 0:
        raise SystemExit(f"--clone-lr: must be > 0 (or 0 for the paper preset's {preset.clone_lr}); got {a.clone_lr}")
    lr = a.clone_lr or preset.clone_lr
    key_lr = None if lr == preset.clone_lr else lr
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    if not seeds:
        raise SystemExit("--seeds: give at least one seed, e.g. 0 or 0,1,2")
    victim, victim_ref = resolve_victim(preset, a.victim, progress=not a.no_progress)
    dataset = victim.spec.dataset
    vhash = weights_hash(victim.model)
    extra = parse_attack_options(a.attack_options)
    options = {**preset.attack_options, **extra}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    done_keys = {r["key"] for r in done}
    todo = [(attack, q, b, seed) for seed in seeds for attack, q, b in
            rows(dataset, budget, [q for q in a.knockoff_querysets.split(",") if q], a.attacks.split(","))]
    tracking.setup(a.tracking_uri)
    results = [r for r in done if r["key"] in {row_key(vhash, *t[:3], epochs, t[3], options, key_lr) for t in todo}]
    with tracking.start_or_resume(f"table1-{dataset}"):
        mlflow.set_tags({"stealguard.kind": "table1"})
        for attack, queryset, b, seed in todo:
            key = row_key(vhash, attack, queryset, b, epochs, seed, options, key_lr)
            if key in done_keys:
                print(f"skip {attack} {queryset} seed {seed}: already in {out}", flush=True)
                continue
            cfg = ev.EvalConfig(dataset=dataset, victim=victim_ref, defense={"name": "identity"}, attack=attack,
                                queryset=queryset, budget=b, epochs=epochs, seed=seed, lr=lr,
                                batch_size=preset.clone_batch_size, attack_options=options, track_epochs=True)
            t0 = time.perf_counter()
            with mlflow.start_run(run_name=f"{attack}-{queryset}-{b}-seed{seed}", nested=True) as run:
                r = ev.evaluate(cfg, victim=victim, progress=not a.no_progress)
                ev.log_evaluation(r)
            row = {**r.metrics, "key": key, "attack": attack, "queryset": queryset, "budget": b, "epochs": epochs,
                   "lr": lr, "seed": seed, "paper": PAPER_FASHION_MNIST.get(attack, ""),
                   "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(), "run_id": run.info.run_id,
                   "attack_options": json.dumps(extra, sort_keys=True),
                   "per_class": json.dumps(r.per_class)}  # evaluate.class_breakdown: what the queries elicited
            append_row(out, row)
            results.append(row)
            print(ev.summary_text(r), flush=True)
        print(table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
