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
