"""Per-row measures of what a defense cost: pure functions shared by the server's metrics and the lab."""

from __future__ import annotations

import torch

from plugins.simplex import LOG_FLOOR

MEASURE_NAMES = ("l1", "l2", "linf", "kl", "top1_flip", "top1_confidence_drop")


def kl_divergence(y: torch.Tensor, y_tilde: torch.Tensor) -> torch.Tensor:
    """KL(y || y~) per row, finite even where y~ has zeros (y~ is floored at LOG_FLOOR; 0 log 0 = 0)."""
    y64, t64 = y.to(torch.float64), y_tilde.to(torch.float64)
    kl = torch.xlogy(y64, y64) - torch.xlogy(y64, t64.clamp_min(LOG_FLOOR))
    return kl.sum(dim=1).clamp_min(0)


def distance(y: torch.Tensor, y_tilde: torch.Tensor, norm: str) -> torch.Tensor:
    """dist(y~, y) per row for norm in l1, l2, linf, kl (KL(y || y~))."""
    if norm == "kl":
        return kl_divergence(y, y_tilde)
    diff = (y_tilde.to(torch.float64) - y.to(torch.float64)).abs()
    if norm == "l1":
        return diff.sum(dim=1)
    if norm == "l2":
        return diff.pow(2).sum(dim=1).sqrt()
    if norm == "linf":
        return diff.amax(dim=1)
    raise ValueError(f"norm: unknown {norm!r}; allowed: l1, l2, linf, kl")


def measures(y: torch.Tensor, y_tilde: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row (B,) float64 measures between victim probabilities ``y`` and perturbed ``y_tilde``.

    l1, l2, linf: distances; kl: KL(y || y~); top1_flip: 1.0 where the top-1 class changed;
    top1_confidence_drop: y[c] - y~[c] for the victim's top class c (negative when the defense raised it).
    """
    if y.shape != y_tilde.shape or y.dim() != 2:
        shapes = f"{tuple(y.shape)} and {tuple(y_tilde.shape)}"
        raise ValueError(f"measures needs two B x K tensors of one shape; got {shapes}")
    y64, t64 = y.to(torch.float64), y_tilde.to(torch.float64)
    top = y64.argmax(dim=1, keepdim=True)
    return {
        "l1": distance(y64, t64, "l1"),
        "l2": distance(y64, t64, "l2"),
        "linf": distance(y64, t64, "linf"),
        "kl": kl_divergence(y64, t64),
        "top1_flip": (t64.argmax(dim=1, keepdim=True) != top).squeeze(1).to(torch.float64),
        "top1_confidence_drop": (y64.gather(1, top) - t64.gather(1, top)).squeeze(1),
    }


# ------------------------------------------------------------------------------------------------ calibration

ECE_BINS = 15


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over rows of ``-log probs[label]`` (probabilities floored at LOG_FLOOR, so a zero costs
    ``-log LOG_FLOOR`` instead of inf): the returned probabilities' NLL on labelled data."""
    p = _check_labelled(probs, labels)
    picked = p.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return float(-picked.clamp_min(LOG_FLOOR).log().mean()) if len(p) else float("nan")


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 confidence (Guo et al. 2017): rows are put in ``bins`` equal-width
    confidence bins ``(i/bins, (i+1)/bins]`` (a confidence of exactly 0 goes to the first); ECE is
    ``sum_b |B_b|/n * |accuracy(B_b) - mean confidence(B_b)|``."""
    if bins < 1:
        raise ValueError(f"bins: must be >= 1; got {bins}")
    p = _check_labelled(probs, labels)
    if len(p) == 0:
        return float("nan")
    conf, pred = p.max(dim=1)
    correct = (pred == labels.long()).to(torch.float64)
    b = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, b, conf)
    correct_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, b, correct)
    return float((conf_sum - correct_sum).abs().sum() / len(p))


def _check_labelled(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if probs.dim() != 2 or labels.dim() != 1 or len(probs) != len(labels):
        raise ValueError(f"calibration needs B x K probabilities and B labels; got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")
    return probs.to(torch.float64)
