"""The real handler, initialised with a real TorchServe metrics cache over deploy/metrics.yaml, emits one
batched set of counters and one histogram observation per row, with the values its responses imply."""

from __future__ import annotations

import logging

import pytest
import torch

from plugins.measures import measures
from tests.support import metrics_log

JSON = "application/json"
DEFENSE = {"name": "mad", "epsilon": 0.1, "norm": "l2"}


def _rows(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def lines(serve, caplog):
    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    s = serve(DEFENSE, surrogate="random", version={"name": "sg", "version": "9"})
    a, b = _rows(3, 1), _rows(2, 2)
    answers = s.batch([(a.tolist(), JSON), ([[1.0]], JSON), (b.tolist(), JSON)])
    return s, torch.cat([a, b]), answers, metrics_log.emitted(caplog)


def _values(lines, name):
    return [float(ln["value"]) for ln in lines if ln["name"] == name]


def test_info_and_labels(lines):
    _, _, _, emitted = lines
    info = [ln for ln in emitted if ln["name"] == "stealguard_defense_info"]
    assert len(info) == 1 and float(info[0]["value"]) == 1
    assert info[0]["labels"] == {
        "model_name": "victim",
        "defense": "mad",
        "defense_version": "sg/9",
        "budget": "l2<=0.1",
        "secret_fingerprint": "none",  # mad with the extreme oracle draws no keyed randomness
    }
    for ln in emitted:
        assert ln["labels"]["defense_version"] == "sg/9"


def test_one_batch_one_counter_update_and_one_observation_per_row(lines):
    s, x, answers, emitted = lines
    assert [a.status for a in answers] == [200, 400, 200]
    got = torch.cat(
        [torch.tensor([p["probabilities"] for p in a.json["predictions"]]) for a in (answers[0], answers[2])]
    )
    y = s.victim_probs(x)
    expected = measures(y, got.to(torch.float64))
    assert _values(emitted, "stealguard_rows_total") == [5.0]  # the two good requests: one defended batch
    assert _values(emitted, "stealguard_top1_flips_total") == [float(expected["top1_flip"].sum())]
    assert _values(emitted, "stealguard_budget_violations_total") == [0.0]
    assert _values(emitted, "stealguard_ood_queries_total") == [float((1 - y.amax(1) > 0.5).sum())]
    assert _values(emitted, "stealguard_perturbation_l1") == pytest.approx(expected["l1"].tolist(), abs=1e-5)
    assert _values(emitted, "stealguard_perturbation_l2") == pytest.approx(expected["l2"].tolist(), abs=1e-5)
    assert all(v <= 0.1 + 1e-6 for v in _values(emitted, "stealguard_perturbation_l2"))
    assert len(_values(emitted, "stealguard_top1_confidence_drop")) == 5
    angles = _values(emitted, "stealguard_angular_deviation_radians")
    assert len(angles) == 5 and all(0 <= a <= torch.pi for a in angles)
    latency = _values(emitted, "stealguard_defense_latency_seconds")
    assert len(latency) == 1 and 0 < latency[0] < 10
    errors = [(ln["labels"]["reason"], float(ln["value"])) for ln in emitted if "errors" in ln["name"]]
    assert errors == [("bad_input", 1.0)]
    assert _values(emitted, "stealguard_perturbation_kl") == []


def test_per_stage_latency_one_observation_per_stage_in_the_batch_record_summing_to_the_handler_total(lines):
    _, _, _, emitted = lines
    stages = {ln["labels"]["stage"]: float(ln["value"]) for ln in emitted
              if ln["name"] == "stealguard_stage_latency_milliseconds"}
    assert set(stages) == {"decode", "victim", "surrogate", "defense", "encode", "metrics"}
    assert len([ln for ln in emitted if ln["name"] == "stealguard_stage_latency_milliseconds"]) == 6  # one batch
    (total,) = _values(emitted, "stealguard_handler_latency_milliseconds")
    assert all(v >= 0 for v in stages.values()) and stages["victim"] > 0 and stages["surrogate"] > 0
    assert sum(stages.values()) <= total * 1.0001  # the stages are disjoint parts of the handler's time
    assert sum(stages.values()) >= 0.999 * total, (stages, total)  # ... and they partition it
    # the defense's latency metric covers its call, surrogate forward included: surrogate <= that
    (defense_s,) = _values(emitted, "stealguard_defense_latency_seconds")
    assert stages["surrogate"] <= 1000 * defense_s


def test_surrogate_time_is_what_the_defense_spends_in_its_surrogate(serve, caplog):
    """A surrogate that sleeps 30 ms per forward: the surrogate stage shows at least those 30 ms, and they are part
    of the defense's call (stealguard_defense_latency_seconds), not counted again in the defense stage."""
    import time

    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    s = serve(DEFENSE, surrogate="random")
    surrogate = s.handler.model.defense.surrogate
    real = surrogate.forward
    surrogate.forward = lambda x: (time.sleep(0.03), real(x))[1]
    s.one(_rows(2, 5).tolist())
    emitted = metrics_log.emitted(caplog)
    stages = {ln["labels"]["stage"]: float(ln["value"]) for ln in emitted
              if ln["name"] == "stealguard_stage_latency_milliseconds"}
    (defense_s,) = _values(emitted, "stealguard_defense_latency_seconds")
    assert 30.0 <= stages["surrogate"] <= 1000 * defense_s
    (total,) = _values(emitted, "stealguard_handler_latency_milliseconds")
    assert sum(stages.values()) <= total * 1.0001  # the 30 ms are counted once


def test_a_stall_between_the_pipelines_timers_shows_in_a_stage_not_in_a_gap(serve, caplog):
    """A 30 ms stall after the pipeline returns (where a preempted worker on a loaded host loses time): the
    stages still add up to the handler's total, and the stall lands in the defended section's `defense` stage."""
    import time

    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    s = serve(DEFENSE, surrogate="random")
    real = s.handler.model.defend
    s.handler.model.defend = lambda x: (real(x), time.sleep(0.03))[0]
    s.one(_rows(2, 5).tolist())
    emitted = metrics_log.emitted(caplog)
    stages = {ln["labels"]["stage"]: float(ln["value"]) for ln in emitted
              if ln["name"] == "stealguard_stage_latency_milliseconds"}
    (total,) = _values(emitted, "stealguard_handler_latency_milliseconds")
    assert stages["defense"] >= 30.0, stages
    assert 0.999 * total <= sum(stages.values()) <= total * 1.0001, (stages, total)
