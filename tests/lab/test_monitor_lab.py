"""The lab's oracles run the server's monitor: a JBDA attacker (one client) is flagged by PRADA and, under
harden, gets label-only answers from then on; benign clients scored through the same monitor keep the defense's
answers; block refuses the attacker."""

from __future__ import annotations

import pytest
import torch

from mlflow_project.lab import data
from mlflow_project.lab.attacks import AttackConfig, run_attack
from mlflow_project.lab.models import build_model
from mlflow_project.lab.oracles import ClientBlocked, MonitoredOracle, lab_monitor, serve_benign


def _cfg(action):
    return {"action": action, "harden": {"name": "label_only"}, "ood": {"enabled": False}}


def test_jbda_attacker_is_flagged_and_hardened(digits_victim):
    v = digits_victim
    monitor = lab_monitor(v.model, _cfg("harden"), v.spec.num_classes)
    oracle = MonitoredOracle(v.model, None, monitor, client="thief", batch_size=32)
    pool = data.query_set("digits", v.spec)
    cfg = AttackConfig(name="jbda", budget=800, epochs=2, jb_round_epochs=2, jb_round_min_steps=10, seed=0,
                       pixel_mean=v.spec.mean, pixel_std=v.spec.std)
    res = run_attack(oracle, pool, lambda: build_model("mlp", v.spec.num_classes), cfg, progress=False)
    assert oracle.flagged_at is not None and oracle.flagged_at < 800, "PRADA flags JBDA's synthetic queries"
    [f] = monitor.store.flagged()
    assert (f.client, f.reason) == ("thief", "prada") and f.statistic < 0.95
    after = res.transfer_y[oracle.flagged_at :]
    assert torch.equal(after, torch.nn.functional.one_hot(after.argmax(1), after.shape[1]).float())  # label only
    # benign clients through the same monitor: their answers are the (identity) defense's own
    test = data.victim_data("digits", "mlp").test.x
    answers, flagged = serve_benign(v.model, None, monitor, test, clients=20)
    assert flagged == set()
    with torch.no_grad():
        assert torch.allclose(answers, torch.softmax(v.model(test), dim=1), atol=1e-6)


def test_block_refuses_the_attacker(digits_victim):
    v = digits_victim
    monitor = lab_monitor(v.model, {**_cfg("block"), "ood": {"min_queries": 32, "share": 0.01}}, 10)
    oracle = MonitoredOracle(v.model, None, monitor, batch_size=32)
    noise = torch.rand(200, *v.spec.shape) * 10  # far off the data: OOD share flags at once
    with pytest.raises(ClientBlocked, match="client 'attacker' blocked after 32 queries"):
        oracle(noise)
