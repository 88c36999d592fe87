"""Detection and ownership figures for RESULTS.md (issue 19), in-process through the lab's oracles, which run
the server's monitor code (handlers/monitor.py) over an in-process store:

- false positives: the Fashion-MNIST test set replayed by 20 benign clients (500 images each, batches of 16,
  round-robin), default monitor config (PRADA delta 0.95 + OOD share 0.4);
- queries until flagged: each attack's query stream (mlflow_project/lab/attacks.py) from one client, action
  observe, budget --budget: Knockoff on the victim's own train split (in distribution) and on mnist5k (OOD),
  JBDA, JB-self, JB-top3 (seeded from the Fashion-MNIST train split);
- watermark: a Knockoff clone (soft labels, --wm-budget queries answered with the DAWN watermark at 0.5 %) and a
  model trained independently on the victim's own data, both tested by mlflow_project.lifecycle.verify.verify;
  with ``--wm-attacks`` (e.g. jbda,jbself,jbtop3) also each of those attacks run end to end (the lab's
  run_attack: its own query synthesis, its soft clone and top-1 twin, ``--wm-clone-epochs``) against the victim
  whose answers carry the watermark, at every budget of ``--wm-budgets``; both clones are verified.

    OMP_NUM_THREADS=1 python bench/monitor_detection.py --victim-epochs 2 --budget 2000 --wm-budget 5000
    OMP_NUM_THREADS=1 python bench/monitor_detection.py --attacks "" --skip-benign --skip-knockoff-watermark \
        --wm-attacks jbda,jbself,jbtop3 --wm-budgets 5000,20000 --wm-clone-epochs 15

The victims are small (2-epoch LeNet, 2-epoch clones) because the machine is shared; say so next to the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow_project.lab import data  # noqa: E402
from mlflow_project.lab.attacks import AttackConfig, run_attack  # noqa: E402
from mlflow_project.lab.models import build_model  # noqa: E402
from mlflow_project.lab.oracles import LocalOracle, MonitoredOracle, lab_monitor, serve_benign  # noqa: E402
from mlflow_project.lab.train_victim import train_victim  # noqa: E402
from mlflow_project.lab.training import TrainConfig, train_classifier  # noqa: E402
from mlflow_project.lifecycle.verify import verify  # noqa: E402
from plugins.monitor.watermark import Watermark  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--victim-epochs", type=int, default=2)
    p.add_argument("--budget", type=int, default=2000)
    p.add_argument("--wm-budget", type=int, default=5000)
    p.add_argument("--clone-epochs", type=int, default=2)
    p.add_argument("--wm-clone-epochs", type=int, default=10)
    p.add_argument("--attacks", default="knockoff,knockoff_ood,jbda,jbself,jbtop3")
    p.add_argument("--skip-watermark", action="store_true")
    p.add_argument("--skip-benign", action="store_true")
    p.add_argument("--monitor", default="{}", help="JSON monitor config for the benign and attack runs")
    p.add_argument("--wm-attacks", default="", help="attacks run end to end against the watermarked victim")
    p.add_argument("--wm-budgets", default="5000", help="their budgets, comma-separated")
    p.add_argument("--skip-knockoff-watermark", action="store_true", help="only the --wm-attacks watermark runs")
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    victim = train_victim("fashion_mnist", "lenet", epochs=a.victim_epochs, seed=0, progress=False)
    v, spec = victim.model, victim.spec
    print(f"victim: fashion_mnist lenet, {a.victim_epochs} epochs, test accuracy {victim.test_accuracy:.4f}")
    vd = data.victim_data("fashion_mnist", "lenet")
    out: dict = {"victim_test_accuracy": victim.test_accuracy}

    mcfg = json.loads(a.monitor)
    out["monitor"] = mcfg
    if not a.skip_benign:
        monitor = lab_monitor(v, mcfg, spec.num_classes)
        answers, flagged = serve_benign(v, None, monitor, vd.test.x, clients=20, batch_size=16)
        out["benign"] = {"clients": 20, "flagged": sorted(flagged), "rows": len(vd.test.x)}
        w = {c: s for c, s in ((f.client, f.statistic) for f in monitor.store.flagged())}
        print(f"benign: {len(flagged)}/20 clients flagged {sorted(flagged)} {w}")

    pools = {"knockoff": data.query_set("fashion_mnist", spec), "knockoff_ood": data.query_set("mnist5k", spec)}
    for name in filter(None, a.attacks.split(",")):
        attack = "knockoff" if name.startswith("knockoff") else name
        pool = pools.get(name, pools["knockoff"])
        mon = lab_monitor(v, mcfg, spec.num_classes)
        oracle = MonitoredOracle(v, None, mon, client=name, batch_size=64)
        cfg = AttackConfig(name=attack, budget=a.budget, epochs=a.clone_epochs, jb_round_epochs=a.clone_epochs,
                           jb_round_min_steps=20, seed=0, pixel_mean=spec.mean, pixel_std=spec.std)
        run_attack(oracle, pool, lambda: build_model("lenet", spec.num_classes), cfg, progress=False)
        reason = next((f.reason for f in mon.store.flagged()), None)
        s = mon.store._summaries.get(name, {})
        out[name] = {"flagged_at": oracle.flagged_at, "reason": reason, "queries": oracle.queries,
                     "final_W": s.get("w"), "ood_share": s.get("ood", 0) / max(1, s.get("n", 1))}
        print(f"{name}: flagged at {oracle.flagged_at} ({reason}) of {oracle.queries} queries; "
              f"final W {s.get('w')}, OOD share {out[name]['ood_share']:.3f}")

    key = b"RESULTS.md measurement key (bench only)"
    knockoff_wm = not a.skip_watermark and not a.skip_knockoff_watermark
    wm_attacks = [n for n in a.wm_attacks.split(",") if n] if not a.skip_watermark else []
    independent = None  # the false-positive side: a model trained on the victim's own data only, trained once

    def independent_model():
        nonlocal independent
        if independent is None:  # trained after the Knockoff clone (the global RNG's order of the figures)
            independent = train_victim("fashion_mnist", "lenet", epochs=a.victim_epochs, seed=1, progress=False).model
        return independent

    if knockoff_wm:
        pool = pools["knockoff"]
        idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[: a.wm_budget]
        x = pool[idx]
        with torch.no_grad():
            y = torch.softmax(v(x).double(), dim=1)
        answered, records, _ = Watermark(key, 0.005).apply(x, y, y, 0.0)
        clone = build_model("lenet", spec.num_classes)
        train_classifier(clone, x, answered.float(), TrainConfig(epochs=a.wm_clone_epochs, lr=0.05), progress=False)
        for who, model in (("clone", clone), ("independent", independent_model())):
            out[f"wm_{who}"] = verified(records, model, vd.test, spec.num_classes, f"watermark {who}")
        benign_cost = float((answered.argmax(1) != y.argmax(1)).double().mean())
        out["wm_top1_cost"] = benign_cost
        print(f"watermark top-1 cost on the {len(x)} answered queries: {benign_cost:.4%}")
    if wm_attacks:
        independent_model()  # before the attacks, as the figures were measured
    for name in wm_attacks:
        for budget in (int(b) for b in a.wm_budgets.split(",")):
            oracle = WatermarkedOracle(v, Watermark(key, 0.005))
            cfg = AttackConfig(name=name, budget=budget, epochs=a.wm_clone_epochs, jb_round_epochs=a.clone_epochs,
                               jb_round_min_steps=20, seed=0, pixel_mean=spec.mean, pixel_std=spec.std)
            t1 = time.time()
            res = run_attack(oracle, pools["knockoff"], lambda: build_model("lenet", spec.num_classes), cfg,
                             progress=False)
            if not oracle.records:
                print(f"watermark {name} {budget} queries: no answer was watermarked; nothing to verify")
                continue
            suspects = (("soft clone", res.clone), ("top-1 clone", res.top1_clone), ("independent", independent))
            for who, model in suspects:
                what = f"watermark {name} {budget} queries ({res.queries} answered, {time.time() - t1:.0f}s), {who}"
                out[f"wm_{name}_{budget}_{who.split()[0]}"] = {
                    **verified(oracle.records, model, vd.test, spec.num_classes, what), "queries": res.queries}
    print(json.dumps(out, default=float))
    print(f"seconds: {time.time() - t0:.0f}")


def verified(records, model, test, num_classes: int, what: str) -> dict:
    """``verify`` of ``model`` against the watermark ``records`` (estimated and conservative null), with its
    test accuracy; printed as one line headed ``what``."""
    q = torch.from_numpy(np.stack([r.query for r in records]))
    labels = np.array([r.label for r in records])
    victim_labels = np.array([r.victim_label for r in records])
    model = model.eval()
    with torch.no_grad():
        preds = model(q).argmax(1).numpy()
        acc = float((model(test.x).argmax(1) == test.y).float().mean())
    r = verify(labels, victim_labels, preds, num_classes)
    rc = verify(labels, victim_labels, preds, num_classes, "conservative")
    print(f"{what}: {r['agreed']}/{r['watermarks']} agree, p {r['p_value']:.3g} (null {r['null_rate']:.4f}; "
          f"conservative 1/9: p {rc['p_value']:.3g}), test acc {acc:.4f}", flush=True)
    return {**r, "p_value_conservative": rc["p_value"], "test_accuracy": acc}


class WatermarkedOracle(LocalOracle):
    """The undefended victim whose answers carry the DAWN watermark (``watermark.apply`` on every batch, as the
    server's monitor applies it after its action); the watermarked rows' records collect in ``records``."""

    def __init__(self, victim, watermark: Watermark) -> None:
        super().__init__(victim)
        self.watermark = watermark
        self.records: list = []

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        y = super()._answer(x).double()
        answered, records, _ = self.watermark.apply(x, y, y, 0.0)
        self.records += records
        return answered.float()


if __name__ == "__main__":
    main()
