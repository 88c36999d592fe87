"""mlflow_project/ops/metrics_exporter.py serves the server's metric names from prometheus-client on 127.0.0.1."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import requests
import torch

from handlers.metrics import METRIC_SPECS
from mlflow_project.ops.metrics_exporter import (
    TORCHSERVE_BUCKETS,
    MetricsExporter,
    budget_of,
    evaluation_observer,
    victim_label,
)
from plugins.base import Budget

SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def _samples(text: str) -> list[tuple[str, dict, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = SAMPLE.match(line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"] or ""))
        out.append((m["name"], labels, float(m["value"])))
    return out


def test_exporter_serves_the_server_names_on_loopback():
    y = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]], dtype=torch.float64)
    yt = 0.7 * y + 0.3 * torch.roll(y, 1, dims=1)
    with MetricsExporter(port=0) as ex:
        assert ex.url.startswith("http://127.0.0.1:")
        m = ex.defense_metrics("mnist", "mad", "4", Budget("l2", 0.5))
        m.record_batch(y, yt, torch.tensor([0.3, 0.6]), 0.02)
        m.record_batch(y, yt, torch.tensor([0.3, 0.6]), 0.03)
        m.record_error("bad_input")
        samples = _samples(requests.get(ex.url, timeout=10).text)
    ours = [(n, lab, v) for n, lab, v in samples if n.startswith("stealguard_")]
    allowed = set()
    for s in METRIC_SPECS.values():
        base = s.name.removesuffix("_total") if s.kind == "counter" else s.name
        allowed |= {s.name, base + "_created"}
        if s.kind == "histogram":
            allowed |= {s.name + "_bucket", s.name + "_count", s.name + "_sum"}
    assert {n for n, _, _ in ours} <= allowed

    def value(name, **want):
        hits = [v for n, lab, v in ours if n == name and all(lab.get(k) == w for k, w in want.items())]
        assert len(hits) == 1, (name, want, hits)
        return hits[0]

    assert value("stealguard_rows_total") == 4
    assert value("stealguard_top1_flips_total") == 2
    assert value("stealguard_ood_queries_total") == 2  # the 0.4-confident row, twice
    assert value("stealguard_perturbation_l1_count") == 4
    assert value("stealguard_perturbation_l1_sum") == pytest.approx(2 * (0.36 + 0.09))
    assert value("stealguard_perturbation_l2_count") == 4
    assert value("stealguard_perturbation_l1_bucket", le="0.1") == 2  # the two 0.09 rows
    assert value("stealguard_angular_deviation_radians_count") == 4
    assert value("stealguard_defense_latency_seconds_count") == 2
    assert value("stealguard_budget_violations_total") == 0
    assert value("stealguard_errors_total", reason="bad_input") == 1
    assert value("stealguard_defense_info", budget="l2<=0.5", defense="mad", defense_version="4") == 1
    rows = next(lab for n, lab, _ in ours if n == "stealguard_rows_total")
    assert {"model_name", "defense", "defense_version", "Hostname"} == set(rows)
    les = {lab["le"] for n, lab, _ in ours if n == "stealguard_perturbation_l1_bucket"}
    assert len(les) == len(TORCHSERVE_BUCKETS)


def test_exporter_refuses_a_bad_port_and_closes_twice():
    with pytest.raises(ValueError, match="port"):
        MetricsExporter(port=70000)
    ex = MetricsExporter(port=0)
    ex.close()
    ex.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(ex.url, timeout=2)


def test_budget_of_reads_the_declared_budget_from_the_config_alone():
    assert budget_of({"name": "mad", "epsilon": 0.1, "norm": "l2"}) == Budget("l2", 0.1)
    assert budget_of({"name": "mad_argmax", "epsilon": 0.5}) == Budget("l1", 0.5)
    assert budget_of({"name": "random_noise", "epsilon": 0.3}).space == "logits"
    assert budget_of({"name": "identity"}) == Budget("l1", 0.0)
    with pytest.raises(ValueError, match="unknown defense"):
        budget_of({"name": "nope"})


def test_victim_label():
    assert victim_label("artifacts/victims/fmnist_lenet/") == "fmnist_lenet"
    assert victim_label("models:/fmnist-victim/3") == "fmnist-victim/3"


def test_evaluation_observer_is_the_evaluate_hook():
    defense = {"name": "mad", "epsilon": 0.1, "norm": "l2"}
    cfg = SimpleNamespace(victim="artifacts/victims/fm_lenet", defense=defense)
    observe = evaluation_observer(0, cfg)
    try:
        y = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]], dtype=torch.float64)
        yt = 0.7 * y + 0.3 * torch.roll(y, 1, dims=1)  # l2 0.2345 and 0.0561: one row over epsilon 0.1
        observe("defense_batch", {"probs": y, "perturbed": yt, "angular_deviation": None, "latency_s": 0.5})
        observe("defender", {"victim_accuracy": 0.9})  # other stages are not metrics of the defense
        samples = _samples(requests.get(observe.exporter.url, timeout=10).text)
    finally:
        observe.exporter.close()
    got = {(n, lab.get("le", "")): v for n, lab, v in samples if n.startswith("stealguard_")}
    assert got[("stealguard_rows_total", "")] == 2
    assert got[("stealguard_budget_violations_total", "")] == 1
    assert got[("stealguard_perturbation_l2_count", "")] == 2
    assert got[("stealguard_defense_latency_seconds_count", "")] == 1
    info = [lab for n, lab, _ in samples if n == "stealguard_defense_info"]
    assert info == [
        {"model_name": "fm_lenet", "defense": "mad", "defense_version": "lab", "budget": "l2<=0.1",
         "secret_fingerprint": "none", "Hostname": info[0]["Hostname"]}
    ]


def test_evaluate_metrics_port_hook_finds_the_observer():
    from mlflow_project.lab.evaluate import EvalConfig, metrics_observer

    cfg = EvalConfig(victim="artifacts/victims/v", defense={"name": "mad_argmax", "epsilon": 0.5})
    observe = metrics_observer(0, cfg)
    try:
        text = requests.get(observe.exporter.url, timeout=10).text
    finally:
        observe.exporter.close()
    info = [lab for n, lab, _ in _samples(text) if n == "stealguard_defense_info"]
    assert len(info) == 1 and info[0]["defense"] == "mad_argmax" and info[0]["budget"] == "l1<=0.5"
