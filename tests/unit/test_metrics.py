"""handlers/metrics.py: the batch measurements, the TorchServe emission and deploy/metrics.yaml agree."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
import ts
import yaml
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers.metrics import (
    BUDGET_TOLERANCE,
    METRIC_SPECS,
    DefenseMetrics,
    budget_label,
    label_value,
    observe_batch,
)
from plugins.base import Budget
from tests.support import metrics_log

ROOT = Path(__file__).resolve().parents[2]
METRICS_YAML = ROOT / "deploy" / "metrics.yaml"
TS_DEFAULT_YAML = Path(ts.__file__).parent / "configs" / "metrics.yaml"

# y and a hand-perturbed y~ (0.7 y + 0.3 roll(y)): l1 = 0.36 and 0.09, row 2 flips its top-1 class,
# top-1 confidence drops 0.18 and 0.045.
Y = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]], dtype=torch.float64)
YT = 0.7 * Y + 0.3 * torch.roll(Y, 1, dims=1)

NUMBER = re.compile(r"^-?[0-9.]+(e-?[0-9]+)?$")


def _cache(path: Path = METRICS_YAML) -> MetricsCacheYamlImpl:
    cache = MetricsCacheYamlImpl(config_file_path=str(path))
    cache.initialize_cache()
    return cache


def test_yaml_declares_exactly_the_specs_and_keeps_torchserve_defaults():
    doc = yaml.safe_load(METRICS_YAML.read_text())
    declared = {}
    for kind, entries in doc["model_metrics"].items():
        for e in entries:
            if e["name"].startswith("stealguard_"):
                declared[e["name"]] = (kind, e["unit"], tuple(e["dimensions"]))
    expected = {s.name: (s.kind, s.unit, s.labels) for s in METRIC_SPECS.values()}
    assert declared == expected
    default = yaml.safe_load(TS_DEFAULT_YAML.read_text())
    assert doc["ts_metrics"] == default["ts_metrics"]
    assert doc["dimensions"] == default["dimensions"]
    for kind, entries in default["model_metrics"].items():
        for e in entries:
            assert e in doc["model_metrics"][kind], f"TorchServe default model metric {e['name']} was dropped"
    # TorchServe's own cache accepts the file and finds every metric under its declared type
    cache = _cache()
    for s in METRIC_SPECS.values():
        assert f"{s.kind}:{s.name}" in cache.cache_keys()


def test_issue_names_are_all_declared():
    names = {
        "stealguard_rows_total", "stealguard_perturbation_l1", "stealguard_perturbation_l2",
        "stealguard_perturbation_kl", "stealguard_perturbation_linf", "stealguard_top1_flips_total",
        "stealguard_top1_confidence_drop", "stealguard_angular_deviation_radians",
        "stealguard_defense_latency_seconds", "stealguard_budget_violations_total", "stealguard_errors_total",
        "stealguard_defense_info", "stealguard_ood_queries_total", "stealguard_error_rows_total",
        "stealguard_clients_flagged", "stealguard_client_flags_total", "stealguard_monitor_errors_total",
        "stealguard_stage_latency_milliseconds", "stealguard_handler_latency_milliseconds",  # issue 20
    }
    assert names == set(METRIC_SPECS)
    for s in METRIC_SPECS.values():
        assert s.labels[:3] == ("model_name", "defense", "defense_version")
    assert "reason" in METRIC_SPECS["stealguard_errors_total"].labels
    assert "budget" in METRIC_SPECS["stealguard_defense_info"].labels
    assert METRIC_SPECS["stealguard_client_flags_total"].labels[3:] == ("reason",)  # never a client label
    assert METRIC_SPECS["stealguard_clients_flagged"].kind == "gauge"


def test_observe_batch_hand_computed():
    obs = observe_batch(Y, YT, torch.tensor([0.25, 1.5]), 0.012, Budget("l1", 0.3), "l2")
    assert obs.rows == 2
    assert obs.counters["stealguard_rows_total"] == 2
    assert obs.counters["stealguard_top1_flips_total"] == 1
    assert obs.counters["stealguard_budget_violations_total"] == 1  # 0.36 > 0.3, 0.09 <= 0.3
    assert obs.histograms["stealguard_perturbation_l1"] == pytest.approx([0.36, 0.09])
    l2 = [math.sqrt(0.18**2 + 0.15**2 + 0.03**2), math.sqrt(0.045**2 + 0.015**2 + 0.03**2)]
    assert obs.histograms["stealguard_perturbation_l2"] == pytest.approx(l2)
    assert obs.histograms["stealguard_top1_confidence_drop"] == pytest.approx([0.18, 0.045])
    assert obs.histograms["stealguard_angular_deviation_radians"] == pytest.approx([0.25, 1.5])
    assert obs.histograms["stealguard_defense_latency_seconds"] == [0.012]
    assert "stealguard_perturbation_kl" not in obs.histograms
    assert obs.dropped_nonfinite == 0
    # OOD scores 1 - max y: 0.3 and 0.6; the default threshold 0.5 counts the second row only
    assert obs.counters["stealguard_ood_queries_total"] == 1


def test_ood_queries_follow_the_threshold():
    assert observe_batch(Y, YT, None, None, ood_threshold=0.25).counters["stealguard_ood_queries_total"] == 2
    assert observe_batch(Y, YT, None, None, ood_threshold=0.6).counters["stealguard_ood_queries_total"] == 0
    assert DefenseMetrics(None, "m", "mad", "1").ood_threshold == 0.5
    with pytest.raises(ValueError, match="ood_threshold"):
        DefenseMetrics(None, "m", "mad", "1", ood_threshold=1.0)


def test_budget_violation_edges():
    at = observe_batch(Y, YT, None, None, Budget("l1", 0.36))
    assert at.counters["stealguard_budget_violations_total"] == 0
    over = observe_batch(Y, YT, None, None, Budget("l1", 0.36 - 10 * BUDGET_TOLERANCE))
    assert over.counters["stealguard_budget_violations_total"] == 1
    kl = observe_batch(Y, YT, None, None, Budget("kl", 1e-4))
    assert kl.counters["stealguard_budget_violations_total"] == 2
    logits = observe_batch(Y, YT, None, None, Budget("l1", 1e-9, space="logits"))
    assert logits.counters["stealguard_budget_violations_total"] == 0  # not checkable on probabilities
    none = observe_batch(Y, YT, None, None, None)
    assert none.counters["stealguard_budget_violations_total"] == 0
    assert "stealguard_angular_deviation_radians" not in none.histograms


def test_negative_confidence_drop_is_observed_as_zero():
    y = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    t = torch.tensor([[0.8, 0.1, 0.1]], dtype=torch.float64)
    obs = observe_batch(y, t, None, None)
    assert obs.histograms["stealguard_top1_confidence_drop"] == [0.0]
    assert obs.counters["stealguard_top1_flips_total"] == 0


def test_nonfinite_values_are_never_observed():
    obs = observe_batch(Y, YT, torch.tensor([float("nan"), 0.5]), float("inf"))
    assert obs.histograms["stealguard_angular_deviation_radians"] == [0.5]
    assert "stealguard_defense_latency_seconds" not in obs.histograms
    assert obs.dropped_nonfinite == 2


def test_labels_are_safe_for_torchserve_log_lines():
    assert label_value("a,b:c|d#e f") == "a_b_c_d_e_f"
    assert label_value("") == "none"
    assert budget_label(Budget("l1", 0.5)) == "l1<=0.5"
    assert budget_label(Budget("l2", 0.1, space="logits")) == "logits_l2<=0.1"
    assert budget_label(None) == "none"


def test_torchserve_emission_one_observation_per_row(caplog):
    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    m = DefenseMetrics(_cache(), model_name="mnist", defense_name="mad", defense_version=3,
                       budget=Budget("l1", 0.3), extra_norm="kl")
    m.record_info()
    y = torch.cat([Y, Y, Y])
    yt = torch.cat([YT, YT, YT])
    m.record_batch(y, yt, torch.tensor([0.1, float("nan"), 0.2, 0.3, 0.4, 0.5]), 0.004)
    m.record_error("bad_input", rows=2)
    m.record_error("defense_failed")
    m.record_error("ignored", requests=0, rows=0)
    lines = metrics_log.emitted(caplog)
    base = {"model_name": "mnist", "defense": "mad", "defense_version": "3"}
    for ln in lines:
        assert NUMBER.match(ln["value"]), ln  # never nan / inf, always a number TorchServe parses
        assert {k: ln["labels"][k] for k in base} == base

    def values(name):
        return [float(ln["value"]) for ln in lines if ln["name"] == name]

    assert values("stealguard_defense_info") == [1.0]
    info = next(ln for ln in lines if ln["name"] == "stealguard_defense_info")
    assert info["labels"]["budget"] == "l1<=0.3" and info["type"] == "GAUGE"
    assert values("stealguard_rows_total") == [6.0]
    assert values("stealguard_top1_flips_total") == [3.0]
    assert values("stealguard_ood_queries_total") == [3.0]  # the three copies of the 0.4-confident row
    assert values("stealguard_budget_violations_total") == [3.0]
    assert values("stealguard_perturbation_l1") == pytest.approx([0.36, 0.09] * 3)
    assert len(values("stealguard_perturbation_kl")) == 6
    assert values("stealguard_perturbation_l2") == []  # neither l1 nor the configured norm
    assert values("stealguard_angular_deviation_radians") == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert values("stealguard_defense_latency_seconds") == [0.004]
    def by_reason(name):
        return {ln["labels"]["reason"]: float(ln["value"]) for ln in lines if ln["name"] == name}

    assert by_reason("stealguard_errors_total") == {"nonfinite_measure": 1.0, "bad_input": 1.0, "defense_failed": 1.0}
    assert by_reason("stealguard_error_rows_total") == {"nonfinite_measure": 1.0, "bad_input": 2.0,
                                                        "defense_failed": 1.0}
    assert info["labels"]["secret_fingerprint"] == "none"
    types = {ln["name"]: ln["type"] for ln in lines}
    for name, t in types.items():
        assert t == METRIC_SPECS[name].kind.upper()


def test_one_record_per_batch_with_exactly_the_lines_torchserves_own_api_writes(caplog, monkeypatch):
    """TorchServeSink writes a batch as one multi-line record; each line must be what TorchServe's own
    CachingMetric.add_or_update writes for the same value (the frontend parses stdout line by line)."""
    import ts.metrics.caching_metric as caching_metric
    from ts.metrics.metric_type_enum import MetricTypes

    monkeypatch.setattr(caching_metric.time, "time", lambda: 1_700_000_000.4)
    monkeypatch.setattr("handlers.metrics.time.time", lambda: 1_700_000_000.4)
    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    cache = _cache()
    m = DefenseMetrics(cache, model_name="mnist", defense_name="mad", defense_version=3, budget=Budget("l1", 0.3))
    caplog.clear()
    m.record_batch(torch.cat([Y, Y]), torch.cat([YT, YT]), torch.tensor([0.1, 0.2, 0.3, 0.4]), 0.004)
    assert len(caplog.records) == 1, "one log record per batch"
    ours = caplog.records[0].getMessage().splitlines()
    assert len(ours) == len(metrics_log.emitted(caplog)) == 4 + 4 * 3 + 1  # 4 counters, 3 per-row histograms, latency
    caplog.clear()
    labels = ["mnist", "mad", "3"]
    for line in ours:
        parsed = metrics_log.LINE.search(line).groupdict()
        metric = cache.get_metric(parsed["name"], MetricTypes(METRIC_SPECS[parsed["name"]].kind))
        metric.add_or_update(float(parsed["value"]), labels)
    theirs = [r.getMessage() for r in caplog.records]
    assert ours == theirs


def test_extra_norm_defaults_to_the_budget_norm_and_is_validated():
    assert DefenseMetrics(None, "m", "mad", "1", Budget("kl", 0.1)).extra_norm == "kl"
    assert DefenseMetrics(None, "m", "mad", "1", Budget("l2", 0.1), extra_norm="linf").extra_norm == "linf"
    with pytest.raises(ValueError, match="extra_norm"):
        DefenseMetrics(None, "m", "mad", "1", None, extra_norm="l3")


def test_without_metrics_every_call_is_a_noop():
    m = DefenseMetrics(None, "m", "identity", None)
    m.record_info()
    assert m.record_batch(Y, YT, None, 0.1) is None
    m.record_error("bad_input")
    assert m.labels == ("m", "identity", "unversioned")


def test_record_batch_never_raises(caplog):
    m = DefenseMetrics(_cache(), "m", "mad", "1")
    assert m.record_batch(Y, YT[:, :2], None, 0.1) is None  # shapes disagree
    assert "recording a batch failed" in caplog.text


def test_undeclared_metrics_warn_and_mismatched_dimensions_raise(tmp_path, caplog):
    cache = _cache(TS_DEFAULT_YAML)  # TorchServe's stock yaml: no stealguard metric declared
    with caplog.at_level(logging.WARNING):
        DefenseMetrics(cache, "m", "mad", "1").record_info()
    assert "not declared in the TorchServe metrics yaml" in caplog.text
    doc = yaml.safe_load(METRICS_YAML.read_text())
    for e in doc["model_metrics"]["counter"]:
        if e["name"] == "stealguard_rows_total":
            e["dimensions"] = ["model_name"]
    bad = tmp_path / "metrics.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="stealguard_rows_total"):
        DefenseMetrics(_cache(bad), "m", "mad", "1")
