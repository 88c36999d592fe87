"""Small batched helpers for probability vectors (rows of a B x K tensor)."""

from __future__ import annotations

import torch

LOG_FLOOR = 1e-12  # smallest probability used where a logarithm is taken


def renormalise(y: torch.Tensor) -> torch.Tensor:
    """Clip negatives to 0 and rescale each row to sum to 1. Rows that are all zero become uniform."""
    y = y.clamp_min(0)
    total = y.sum(dim=1, keepdim=True)
    uniform = torch.full_like(y, 1.0 / y.shape[1])
    return torch.where(total > 0, y / total.clamp_min(torch.finfo(y.dtype).tiny), uniform)


def safe_log(y: torch.Tensor) -> torch.Tensor:
    """log(y) with y floored at LOG_FLOOR, so a zero probability gives a large negative, finite number."""
    return torch.log(y.clamp_min(LOG_FLOOR))


def top1(y: torch.Tensor) -> torch.Tensor:
    """Each row's own top-1 class (B,)."""
    return y.argmax(dim=1)


def one_hot_rows(index: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot rows (B x K) for a batch of class indices, each row with its own index."""
    out = torch.zeros(index.shape[0], num_classes, dtype=dtype, device=index.device)
    return out.scatter_(1, index.unsqueeze(1), 1.0)


def project_l1_ball(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` onto the l1 ball of the given radius (Duchi et al. 2008)."""
    if radius <= 0:
        return torch.zeros_like(v)
    a = v.abs()
    inside = a.sum(dim=1, keepdim=True) <= radius
    mu, _ = a.sort(dim=1, descending=True)
    cumsum = mu.cumsum(dim=1)
    ks = torch.arange(1, v.shape[1] + 1, dtype=v.dtype, device=v.device)
    cond = mu - (cumsum - radius) / ks > 0
    rho = cond.to(torch.int64).cumsum(dim=1).argmax(dim=1, keepdim=True)  # last index where cond holds
    theta = (cumsum.gather(1, rho) - radius) / (rho + 1).to(v.dtype)
    projected = torch.sign(v) * (a - theta).clamp_min(0)
    return torch.where(inside, v, projected)


def project_l2_ball(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each row of ``v`` onto the l2 ball of the given radius (rows inside are unchanged)."""
    norm = v.norm(dim=1, keepdim=True)
    scale = torch.where(norm > radius, radius / norm.clamp_min(torch.finfo(v.dtype).tiny), torch.ones_like(norm))
    return v * scale
