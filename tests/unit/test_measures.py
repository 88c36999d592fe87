"""Per-row measures against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from plugins import distance, measures


def test_measures_by_hand():
    y = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.4, 0.5, 0.1], [0.5, 0.25, 0.25]], dtype=torch.float64)
    m = measures(y, t)
    torch.testing.assert_close(m["l1"], torch.tensor([0.6, 0.5], dtype=torch.float64))
    torch.testing.assert_close(m["l2"], torch.tensor([math.sqrt(0.18), math.sqrt(0.125)], dtype=torch.float64))
    torch.testing.assert_close(m["linf"], torch.tensor([0.3, 0.25], dtype=torch.float64))
    kl0 = 0.7 * math.log(0.7 / 0.4) + 0.2 * math.log(0.2 / 0.5)
    kl1 = 0.5 * math.log(0.5 / 0.25)  # the y = 0 entry contributes 0 log 0 = 0
    torch.testing.assert_close(m["kl"], torch.tensor([kl0, kl1], dtype=torch.float64))
    torch.testing.assert_close(m["top1_flip"], torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(m["top1_confidence_drop"], torch.tensor([0.3, 0.0], dtype=torch.float64))


def test_kl_is_finite_where_the_perturbed_row_has_zeros():
    y = torch.tensor([[0.6, 0.4]])
    t = torch.tensor([[1.0, 0.0]])
    kl = measures(y, t)["kl"]
    assert torch.isfinite(kl).all() and kl.item() > 5  # large, but finite


def test_each_row_uses_its_own_top1():
    y = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    m = measures(y, y.clone())
    assert m["top1_flip"].tolist() == [0.0, 0.0]


def test_shape_mismatch_and_unknown_norm_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        measures(torch.ones(2, 3) / 3, torch.ones(2, 4) / 4)
    with pytest.raises(ValueError, match="allowed: l1, l2, linf, kl"):
        distance(torch.ones(1, 2) / 2, torch.ones(1, 2) / 2, "l3")
