"""Per-row out-of-distribution (OOD) scores of a query, from the victim's own posterior: pure, batched functions.

Model thieves mostly query with data that is not the victim's; a classifier is usually less confident on such
data (the maximum-softmax-probability baseline of Hendrycks & Gimpel, ICLR 2017). StealGuard scores each row
by

    ood_score = 1 - max_k y_k                       in [0, 1 - 1/K]; higher = looks more out-of-distribution

where ``y`` is the victim's (undefended) probability vector. A row "looks OOD" when ``ood_score >
threshold``; :data:`DEFAULT_OOD_THRESHOLD` is 0.5, i.e. the victim gives its top class less than one half.
(Measured on the lab's Fashion-MNIST LeNet: see docs/operations.md, StealGuardOODQueryRatioHigh.)

``adaptive_misinformation`` gates its misinformation with the same statistic,
``gate = sigmoid(nu * (tau - max_k y_k))``; :func:`ood_measures` reports that gate too when a defense's
output carries it (``extras["gate"]``), so the server and the lab see both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

DEFAULT_OOD_THRESHOLD = 0.5
OOD_MEASURE_NAMES = ("max_prob", "ood_score")


def max_prob(y: torch.Tensor) -> torch.Tensor:
    """max_k y_k per row (B,), float64: the victim's confidence in its top class."""
    if y.dim() != 2:
        raise ValueError(f"probabilities must be a B x K batch; got shape {tuple(y.shape)}")
    return y.to(torch.float64).amax(dim=1)


def ood_score(y: torch.Tensor) -> torch.Tensor:
    """1 - max_k y_k per row (B,), float64; higher means the query looks more out-of-distribution."""
    return 1.0 - max_prob(y)


def is_ood(y: torch.Tensor, threshold: float = DEFAULT_OOD_THRESHOLD) -> torch.Tensor:
    """Rows whose OOD score is strictly above ``threshold`` (B,), bool."""
    check_threshold(threshold)
    return ood_score(y) > threshold


def check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not 0.0 <= t < 1.0:
        raise ValueError(f"ood_threshold: must be in [0, 1) (an OOD score is 1 - max probability); got {threshold}")
    return t


def confidence_gate(y: torch.Tensor, tau: float, nu: float) -> torch.Tensor:
    """sigmoid(nu * (tau - max_k y_k)) per row (B,), float64: ~1 when the victim is less confident than tau."""
    return torch.sigmoid(nu * (tau - max_prob(y)))


def ood_measures(y: torch.Tensor, extras: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-row (B,) float64 OOD measures of the victim's probabilities ``y``: ``max_prob``, ``ood_score`` and,
    when the defense's ``extras`` carry it, its ``gate`` (adaptive_misinformation's h)."""
    out = {"max_prob": max_prob(y)}
    out["ood_score"] = 1.0 - out["max_prob"]
    if extras is not None and extras.get("gate") is not None:
        gate = torch.as_tensor(extras["gate"]).to(torch.float64).reshape(-1)
        if gate.shape[0] != y.shape[0]:
            raise ValueError(f"extras['gate'] must have one value per row ({y.shape[0]}); got {gate.shape[0]}")
        out["gate"] = gate
    return out
