"""Issue 19's acceptance over HTTP: the lab's JB-top3 extraction against a real TorchServe archive (monitor in
observe mode, the thief one X-Client-Id) is flagged, and a real Prometheus loading deploy/alerts.yml fires
StealGuardExtractionSuspected; 20 benign clients, each replaying the whole digits test set in its own order
(359 queries each, past PRADA's 100-distance minimum), are not flagged and raise no alert.

The rule has no ``for:`` (it pages at once), so the test waits for the alert itself in Prometheus' alerts API.
A digits MLP victim (trained here in seconds) and a 300-query budget keep TorchServe's time to ~20 s."""

from __future__ import annotations

import json
import time

import pytest
import requests
import torch
import yaml

from mlflow_project.lab import data
from mlflow_project.lab.attacks import AttackConfig, run_attack
from mlflow_project.lab.models import build_model
from mlflow_project.lab.oracles import HTTPOracle
from mlflow_project.lab.train_victim import train_victim
from mlflow_project.lifecycle.package import build_archive, stage
from mlflow_project.ops import monitor_clients
from mlflow_project.ops.prometheus import ALERTS, Prometheus, scrape_config
from tests.support.torchserve import TorchServe
from tests.support.victims import export

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "sgextract"
ALERT = "StealGuardExtractionSuspected"


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    work = tmp_path_factory.mktemp("extraction_alert")
    victim = train_victim("digits", "mlp", epochs=8, lr=0.05, seed=0, batch_size=32, progress=False)
    store_url = f"sqlite:///{work / 'monitor.sqlite'}"
    staged = stage(work / "staged", victim=export(victim.model, "eager", work / "victim", "mlp"),
                   defense={"name": "identity"}, input_spec={"shape": [64], "max_rows": 64},
                   monitor={"store": store_url, "action": "observe"}, batch_size=4, max_batch_delay_ms=10)
    build_archive(MODEL, staged, work / "store")
    ts = TorchServe(work / "store", work / "ts", models=[MODEL])
    ts.start(timeout=240)
    prom = None
    try:
        prom = Prometheus(work / "prom", scrape_config([f"127.0.0.1:{ts.ports['metrics']}"], 1)).start()
        yield victim, ts, prom, store_url
    finally:
        if prom is not None:
            prom.stop()
        ts.stop()


def firing(prom: Prometheus) -> list[dict]:
    r = requests.get(f"{prom.url}/api/v1/alerts", timeout=10)
    r.raise_for_status()
    return [a for a in r.json()["data"]["alerts"] if a["labels"]["alertname"] == ALERT and a["state"] == "firing"]


def flagged(store_url: str, capsys) -> list[str]:
    capsys.readouterr()
    assert monitor_clients.main(["--store", store_url, "--model", MODEL, "--json"]) == 0
    return sorted(c["client"] for c in json.loads(capsys.readouterr().out))


def test_jbtop3_thief_is_flagged_and_alerted_benign_clients_are_not(served, capsys):
    victim, ts, prom, store_url = served
    [rule] = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if r.get("alert") == ALERT]
    assert "for" not in rule, "the rule gained a for: duration; wait that long below (or query its expression)"
    url = f"{ts.inference_url}/predictions/{MODEL}"
    test_x = data.victim_data("digits", "mlp").test.x
    for c in range(20):  # benign: the whole test set each, in the client's own order, 36 rows a request
        order = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(c))
        got = HTTPOracle(url, batch_size=36, headers={"X-Client-Id": f"benign-{c}"})(test_x[order])
        with torch.no_grad():
            assert torch.allclose(got, torch.softmax(victim.model(test_x[order]), dim=1), atol=1e-5)  # observe
    assert flagged(store_url, capsys) == []
    assert prom.wait_for(f'max(stealguard_clients_flagged{{model_name="{MODEL}"}})', 0.0) == 0.0
    assert firing(prom) == []

    thief = HTTPOracle(url, budget=300, batch_size=64, headers={"X-Client-Id": "thief-7"})
    cfg = AttackConfig(name="jbtop3", budget=300, epochs=1, jb_round_epochs=1, jb_round_min_steps=10, seed=0,
                       pixel_mean=victim.spec.mean, pixel_std=victim.spec.std)
    run_attack(thief, data.query_set("digits", victim.spec), lambda: build_model("mlp", 10), cfg, progress=False)
    assert thief.queries == 300
    assert flagged(store_url, capsys) == ["thief-7"]  # flagged, and the only one
    assert ts.wait_log(r"client 'thief-7' flagged for prada")
    deadline = time.monotonic() + 60
    while not firing(prom) and time.monotonic() < deadline:
        time.sleep(0.5)
    [alert] = firing(prom)
    assert alert["labels"]["model_name"] == MODEL and alert["labels"]["severity"] == "page"
    assert float(alert["value"]) == 1.0  # one client flagged
    assert prom.scalar(f'sum(stealguard_client_flags_total{{model_name="{MODEL}",reason="prada"}})') == 1.0
