"""Calibration measures (NLL, 15-bin ECE) against slow, obviously correct per-row references."""

from __future__ import annotations

import math

import pytest
import torch

from plugins.measures import ECE_BINS, expected_calibration_error, negative_log_likelihood
from plugins.simplex import LOG_FLOOR


def reference_nll(probs, labels):
    total = 0.0
    for row, label in zip(probs.tolist(), labels.tolist(), strict=True):
        total += -math.log(max(row[label], LOG_FLOOR))
    return total / len(labels)


def reference_ece(probs, labels, bins=ECE_BINS):
    members = [[] for _ in range(bins)]
    for row, label in zip(probs.tolist(), labels.tolist(), strict=True):
        conf = max(row)
        pred = row.index(conf)
        for b in range(bins):
            lo, hi = b / bins, (b + 1) / bins
            if lo < conf <= hi or (b == 0 and conf == 0):
                members[b].append((conf, pred == label))
                break
    n = len(labels)
    ece = 0.0
    for m in members:
        if m:
            acc = sum(ok for _, ok in m) / len(m)
            mean_conf = sum(c for c, _ in m) / len(m)
            ece += len(m) / n * abs(acc - mean_conf)
    return ece


@pytest.mark.parametrize("seed", range(5))
def test_against_the_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(4 * torch.randn(500, 10, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 10, (500,), generator=gen)
    assert negative_log_likelihood(probs, labels) == pytest.approx(reference_nll(probs, labels), rel=1e-12)
    assert expected_calibration_error(probs, labels) == pytest.approx(reference_ece(probs, labels), abs=1e-12)
    assert expected_calibration_error(probs, labels, bins=4) == pytest.approx(reference_ece(probs, labels, 4),
                                                                             abs=1e-12)


def test_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    # NLL: -log 0.9, -log 0.4, -log 0.7, -log(floor)
    expected = (-math.log(0.9) - math.log(0.4) - math.log(0.7) - math.log(LOG_FLOOR)) / 4
    assert negative_log_likelihood(probs, labels) == pytest.approx(expected)
    # 2 bins: (0, 0.5] empty; (0.5, 1]: confidences 0.9, 0.6, 0.7, 1.0 (mean 0.8), accuracy 2/4
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(0.3)


def test_one_hot_correct_rows_are_perfectly_calibrated():
    labels = torch.tensor([0, 2, 1])
    probs = torch.nn.functional.one_hot(labels, 3).double()
    assert expected_calibration_error(probs, labels) == 0.0
    assert negative_log_likelihood(probs, labels) == pytest.approx(0.0)


def test_shape_errors_say_what_was_wrong():
    with pytest.raises(ValueError, match="B x K probabilities and B labels"):
        expected_calibration_error(torch.rand(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(torch.rand(3, 2), torch.tensor([0, 1, 1]), bins=0)
