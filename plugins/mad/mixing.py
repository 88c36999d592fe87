"""Mixing: y~ = (1 - a) y + a y* with the largest a in [0, 1] such that dist(y~, y) <= epsilon.

- l1, l2: ``dist(y~, y) = a ||y* - y||``, so ``a = min(1, epsilon / ||y* - y||)`` in closed form.
- kl: ``KL(y || (1 - a) y + a y*)`` is convex in a and 0 at a = 0, hence non-decreasing on [0, 1]. a = 1 when
  the target itself is within epsilon; otherwise a batched bisection (a multisection: KL_POINTS - 1 points of
  every row's bracket per pass) keeps, per row, a feasible ``lo`` and an infeasible ``hi`` and stops when
  every row has ``epsilon - KL(lo) <= KL_TOL`` (or hi - lo is at float64 resolution). The KL is computed as
  ``plugins.measures.kl_divergence`` does, so the budget holds for the measure the server and the lab report.

``top_margin_cap`` bounds a for mad_argmax so that the victim's top class c stays strictly on top.
"""

from __future__ import annotations

import functools

import torch

from plugins.measures import kl_divergence
from plugins.simplex import LOG_FLOOR

KL_TOL = 1e-10  # bisection stops once KL(y~) is within this of epsilon (the contract asks for 1e-4)
KL_MAX_ITERS = 20  # passes of the multisection; 16 points per pass shrink the bracket 16x
KL_POINTS = 16
TOP_MARGIN = 1e-6  # mad_argmax keeps y~[c] - max_{j != c} y~[j] >= TOP_MARGIN (survives a cast to float32)


def mix(y: torch.Tensor, target: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(1 - a) y + a y* per row; rows with a == 1 are exactly the target."""
    a = a.unsqueeze(1)
    return torch.where(a >= 1, target, (1 - a) * y + a * target)


def coefficient(y: torch.Tensor, target: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """The largest a in [0, 1] per row with dist((1 - a) y + a y*, y) <= epsilon (B,)."""
    if norm in ("l1", "l2"):
        diff = target - y
        d = diff.abs().sum(1) if norm == "l1" else diff.square().sum(1).sqrt()
        return torch.where(d <= epsilon, 1.0, epsilon / d.clamp_min(torch.finfo(d.dtype).tiny))
    if norm == "kl":
        return kl_coefficient(y, target, epsilon)
    raise ValueError(f"norm: unknown {norm!r}; allowed: l1, l2, kl")


def _kl_rows(y: torch.Tensor, y_tilde: torch.Tensor, entropy_term: torch.Tensor) -> torch.Tensor:
    """KL(y || y~) over the last dimension, with plugins.measures.kl_divergence's floor and clamp;
    ``entropy_term`` is sum(y log y) (0 log 0 = 0), computed once per row."""
    return (entropy_term - (y * y_tilde.clamp_min(LOG_FLOOR).log()).sum(-1)).clamp_min(0)


def kl_coefficient(y: torch.Tensor, target: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Largest feasible a per row by multisection: each pass evaluates KL_POINTS - 1 interior points of every
    row's bracket [lo, hi] at once, keeps the largest feasible one as lo and the smallest infeasible one
    as hi (so lo is always a point whose KL was computed to be <= epsilon).

    Rows whose target is within budget (``done``, answered a = 1) get the empty bracket [0, 0], so they
    always meet the stopping rule and never change another row's answer. The passes run in inference mode
    (only ``lo`` leaves the loop)."""
    done = kl_divergence(y, target) <= epsilon  # the target itself is within budget: a = 1
    if bool(done.all()):
        return torch.ones_like(done, dtype=y.dtype)
    with torch.inference_mode():
        lo = torch.zeros(done.shape, dtype=y.dtype)
        hi = torch.where(done, 0.0, 1.0).to(y.dtype)
        f_lo = torch.zeros_like(lo)
        steps = _multisection_steps(y.dtype)
        y3, t3 = y.unsqueeze(1), target.unsqueeze(1)
        entropy_term = torch.xlogy(y, y).sum(1, keepdim=True)
        for _ in range(KL_MAX_ITERS):
            grid = lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * steps  # B x (KL_POINTS - 1)
            a3 = grid.unsqueeze(2)
            f = _kl_rows(y3, (1 - a3) * y3 + a3 * t3, entropy_term)
            feasible = f <= epsilon
            infeasible = ~feasible
            grid_lo = grid.masked_fill(infeasible, -1.0).amax(dim=1)
            f_grid_lo = f.masked_fill(infeasible, -1.0).amax(dim=1)  # f is non-decreasing in a
            grid_hi = grid.masked_fill(feasible, 2.0).amin(dim=1)
            better = grid_lo > lo
            lo = torch.where(better, grid_lo, lo)
            f_lo = torch.where(better, f_grid_lo, f_lo)
            hi = torch.minimum(hi, grid_hi)
            if bool(((epsilon - f_lo <= KL_TOL) | (hi - lo <= 1e-14)).all()):
                break
    return torch.where(done, 1.0, lo)


@functools.lru_cache(maxsize=4)
def _multisection_steps(dtype: torch.dtype) -> torch.Tensor:
    """The interior points 1/KL_POINTS, ..., (KL_POINTS - 1)/KL_POINTS of [0, 1] (shared: never modified)."""
    with torch.inference_mode(False):
        return torch.arange(1, KL_POINTS, dtype=dtype) / KL_POINTS


def top_margin_cap(y: torch.Tensor, target: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The largest a in [0, 1] per row keeping y~[c] >= y~[j] + TOP_MARGIN for every j != c (B,).

    For a target uniform over S (c in S): j outside S only gains distance from c as a grows; j in S has
    y~[c] - y~[j] = (1 - a) (y[c] - y[j]), so a <= 1 - TOP_MARGIN / (y[c] - y[j]). Rows whose own top is not
    strict by more than TOP_MARGIN (ties) get a = 0: they are returned unchanged, c still an argmax.
    """
    top1 = top.unsqueeze(1)
    gap = y.gather(1, top1) - y
    in_s = (target > 0).scatter_(1, top1, False)
    d_min = torch.where(in_s, gap, torch.inf).amin(dim=1)
    cap = (1 - TOP_MARGIN / d_min.clamp_min(TOP_MARGIN)).clamp(0.0, 1.0)
    return torch.where(torch.isinf(d_min), 1.0, cap)
